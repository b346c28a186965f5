package qga

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// fakeConn answers guest-ping with a scripted sequence of results and,
// like libvirt when qemu-ga opens its port, sends an "agent connected"
// event after each failed ping, so WaitReady retries without waiting for
// its ticker. It stands in for the real guest only for libvirt errors that
// a healthy guest does not produce on demand.
type fakeConn struct {
	dom libvirt.Domain

	// quiet: send no events, so WaitReady falls back to its ticker.
	quiet bool

	mu      sync.Mutex
	results []error // nil: success; after the last, repeat it
	pings   int
	events  chan any
	closed  bool
}

func (f *fakeConn) DomainLookupByName(name string) (libvirt.Domain, error) {
	if name != f.dom.Name {
		return libvirt.Domain{}, libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "Domain not found"}
	}
	return f.dom, nil
}

func (f *fakeConn) QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.results[min(f.pings, len(f.results)-1)]
	f.pings++
	if err != nil {
		if f.events != nil && !f.closed && !f.quiet {
			f.events <- &libvirt.DomainEventCallbackAgentLifecycleMsg{
				Dom:   f.dom,
				State: int32(libvirt.ConnectDomainEventAgentLifecycleStateConnected),
			}
		}
		return nil, err
	}
	return libvirt.OptString{`{"return":{}}`}, nil
}

func (f *fakeConn) SubscribeEvents(ctx context.Context, id libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan any, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = make(chan any, 64)
	go func() { // like go-libvirt's relay: close once ctx ends
		<-ctx.Done()
		f.mu.Lock()
		defer f.mu.Unlock()
		f.closed = true
		close(f.events)
	}()
	return f.events, nil
}

func TestWaitReadyRetries(t *testing.T) {
	lv := func(code libvirt.ErrorNumber, msg string) error {
		return libvirt.Error{Code: uint32(code), Message: msg}
	}
	notConnected := lv(libvirt.ErrAgentUnresponsive, "Guest agent is not responding: QEMU guest agent is not connected")
	tests := []struct {
		name      string
		results   []error
		want      error // nil: ready
		wantPings int
	}{
		{"ready at once", []error{nil}, nil, 1},
		{"not connected, then ready", []error{notConnected, notConnected, nil}, nil, 3},
		{"agent starting up", []error{notConnected, lv(libvirt.ErrInternalError, "internal error: Missing agent reply object"), lv(libvirt.ErrInternalError, "internal error: Error while processing agent IO"), nil}, nil, 4},
		{"domain stopped", []error{notConnected, lv(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")}, ErrDomainNotRunning, 2},
		{"agent answered with an error", []error{lv(libvirt.ErrInternalError, "internal error: unable to execute QEMU agent command 'guest-ping': The command guest-ping has been disabled for this instance")}, ErrCommandFailed, 1},
		{"connection lost", []error{notConnected, io.ErrUnexpectedEOF}, io.ErrUnexpectedEOF, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeConn{dom: libvirt.Domain{Name: "stretchy-fake", UUID: libvirt.UUID{1}}, results: tt.results}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			start := time.Now()
			err := New(f, Options{}).WaitReady(ctx, "stretchy-fake")
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("WaitReady = %v, want %v", err, tt.want)
			}
			if errors.Is(err, ErrAgentTimeout) {
				t.Errorf("WaitReady = %v, want no timeout", err)
			}
			if f.pings != tt.wantPings {
				t.Errorf("%d pings, want %d", f.pings, tt.wantPings)
			}
			// The events wake WaitReady; it never waits for its ticker.
			if d := time.Since(start); d > readyPollWithEvents/2 {
				t.Errorf("WaitReady took %v", d)
			}
		})
	}
}

func TestWaitReadyContextEnds(t *testing.T) {
	notConnected := libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "QEMU guest agent is not connected"}
	tests := []struct {
		name    string
		ctx     func() (context.Context, context.CancelFunc)
		wantCtx error
		wantIn  string
	}{
		{
			name: "deadline while not connected",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(t.Context(), 100*time.Millisecond)
			},
			wantCtx: context.DeadlineExceeded,
			wantIn:  "QEMU guest agent is not connected",
		},
		{
			name: "canceled before the start",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(t.Context())
				cancel()
				return ctx, cancel
			},
			wantCtx: context.Canceled,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeConn{dom: libvirt.Domain{Name: "stretchy-fake"}, results: []error{notConnected}, quiet: true}
			ctx, cancel := tt.ctx()
			defer cancel()
			err := New(f, Options{}).WaitReady(ctx, "stretchy-fake")
			if !errors.Is(err, ErrAgentTimeout) || !errors.Is(err, tt.wantCtx) {
				t.Fatalf("WaitReady = %v, want ErrAgentTimeout wrapping %v", err, tt.wantCtx)
			}
			if !strings.Contains(err.Error(), "stretchy-fake") || !strings.Contains(err.Error(), tt.wantIn) {
				t.Errorf("error %q does not name the domain or lacks %q", err, tt.wantIn)
			}
		})
	}
}

//go:build soak

package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// memDomains is libvirt's test driver as the fake agent uses it: domains
// with a state and metadata, and libvirt's error codes.
type memDomains struct {
	state map[string]libvirt.DomainState
	meta  map[string]string
}

func (m *memDomains) DomainLookupByName(name string) (libvirt.Domain, error) {
	if _, ok := m.state[name]; !ok {
		return libvirt.Domain{}, libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "no domain " + name}
	}
	return libvirt.Domain{Name: name}, nil
}

func (m *memDomains) DomainGetState(d libvirt.Domain, _ uint32) (int32, int32, error) {
	return int32(m.state[d.Name]), 0, nil
}

func (m *memDomains) DomainGetMetadata(d libvirt.Domain, _ int32, _ libvirt.OptString, _ libvirt.DomainModificationImpact) (string, error) {
	s, ok := m.meta[d.Name]
	if !ok {
		return "", libvirt.Error{Code: uint32(libvirt.ErrNoDomainMetadata), Message: "no metadata"}
	}
	return s, nil
}

func (m *memDomains) DomainSetMetadata(d libvirt.Domain, _ int32, md libvirt.OptString, _ libvirt.OptString, _ libvirt.OptString, _ libvirt.DomainModificationImpact) error {
	m.meta[d.Name] = md[0]
	return nil
}

func TestParseFakeJob(t *testing.T) {
	for _, tc := range []struct {
		domain string
		want   fakeJob
	}{
		{"stretchy-k1-42", fakeJob{run: time.Second}},
		{"stretchy-k1-42-r250", fakeJob{run: 250 * time.Millisecond}},
		{"stretchy-k1-42-r0-x3", fakeJob{exit: 3}},
		{"stretchy-k1-42-hang", fakeJob{run: time.Second, hang: true}},
		{"stretchy-k1-r2000-rx", fakeJob{run: 2 * time.Second}},
	} {
		t.Run(tc.domain, func(t *testing.T) {
			if got := parseFakeJob(tc.domain); got != tc.want {
				t.Errorf("parseFakeJob(%q) = %+v, want %+v", tc.domain, got, tc.want)
			}
		})
	}
}

// TestFakeAgentRunner follows a runner through the fake agent: it runs as
// long as its job id says, its exit is reported once with its code, and a
// new agent (a restarted worker) finds it through the domain.
func TestFakeAgentRunner(t *testing.T) {
	const dom = "stretchy-j-7-r500-x3"
	now := time.Unix(1000, 0)
	doms := &memDomains{state: map[string]libvirt.DomainState{dom: libvirt.DomainRunning}, meta: map[string]string{}}
	a := &fakeAgent{doms: doms, now: func() time.Time { return now }}
	ctx := context.Background()
	if err := a.WaitReady(ctx, dom); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Run(ctx, dom, qga.ExecRequest{Path: "/bin/sh"}); err != nil {
		t.Fatal(err)
	}
	pid, err := a.Start(ctx, dom, qga.ExecRequest{Path: "/bin/sh"})
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(499 * time.Millisecond)
	if st, err := a.Status(ctx, dom, pid); err != nil || st.Exited {
		t.Fatalf("Status before its time = %+v, %v; want running", st, err)
	}
	restarted := &fakeAgent{doms: doms, now: func() time.Time { return now }}
	now = now.Add(time.Millisecond)
	st, err := restarted.Status(ctx, dom, pid)
	if err != nil || !st.Exited || st.ExitCode != 3 {
		t.Fatalf("Status at its time = %+v, %v; want exited with 3", st, err)
	}
	if _, err := a.Status(ctx, dom, pid); !errors.Is(err, qga.ErrCommandFailed) {
		t.Fatalf("Status after the exit was reported: %v, want ErrCommandFailed", err)
	}
	if _, err := a.Status(ctx, dom, pid+1); !errors.Is(err, qga.ErrCommandFailed) {
		t.Fatalf("Status of another pid: %v, want ErrCommandFailed", err)
	}
}

func TestFakeAgentDomainGone(t *testing.T) {
	doms := &memDomains{state: map[string]libvirt.DomainState{
		"stretchy-off": libvirt.DomainShutoff, "stretchy-paused": libvirt.DomainPaused,
	}, meta: map[string]string{}}
	a := &fakeAgent{doms: doms, now: time.Now}
	for _, tc := range []struct {
		domain string
		want   error
	}{
		{"stretchy-missing", qga.ErrDomainNotFound},
		{"stretchy-off", qga.ErrDomainNotRunning},
		{"stretchy-paused", qga.ErrDomainNotRunning},
	} {
		t.Run(tc.domain, func(t *testing.T) {
			ctx := context.Background()
			if err := a.WaitReady(ctx, tc.domain); !errors.Is(err, tc.want) {
				t.Errorf("WaitReady: %v, want %v", err, tc.want)
			}
			if _, err := a.Start(ctx, tc.domain, qga.ExecRequest{}); !errors.Is(err, tc.want) {
				t.Errorf("Start: %v, want %v", err, tc.want)
			}
			if _, err := a.Status(ctx, tc.domain, 1); !errors.Is(err, tc.want) {
				t.Errorf("Status: %v, want %v", err, tc.want)
			}
		})
	}
}

func TestFakeAgentHang(t *testing.T) {
	const dom = "stretchy-j-hang"
	doms := &memDomains{state: map[string]libvirt.DomainState{dom: libvirt.DomainRunning}, meta: map[string]string{}}
	a := &fakeAgent{doms: doms, now: time.Now}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.WaitReady(ctx, dom); !errors.Is(err, qga.ErrAgentTimeout) {
		t.Fatalf("WaitReady of a hanging agent: %v, want ErrAgentTimeout", err)
	}
}

func TestFakeGuestAgentEnv(t *testing.T) {
	for _, tc := range []struct {
		value    string
		wantFake bool
		wantErr  bool
	}{
		{"", false, false},
		{"fake", true, false},
		{"qga", false, true},
	} {
		t.Run(tc.value, func(t *testing.T) {
			t.Setenv(fakeAgentEnv, tc.value)
			a, err := fakeGuestAgent(nil, nil)
			if (err != nil) != tc.wantErr || (a != nil) != tc.wantFake {
				t.Errorf("fakeGuestAgent with %s=%q = %v, %v", fakeAgentEnv, tc.value, a, err)
			}
		})
	}
}

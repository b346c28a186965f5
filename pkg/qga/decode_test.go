package qga

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// The cases here cannot come from the real guest: output past qemu-ga's
// 16 MiB limit would not fit through libvirt's RPC, and libvirt's other
// error codes need another libvirt version or a broken guest.

func TestDecodeStatus(t *testing.T) {
	tests := []struct {
		name    string
		reply   string
		want    Status
		wantErr bool
	}{
		{
			name:  "running",
			reply: `{"exited":false}`,
			want:  Status{ExitCode: -1},
		},
		{
			name:  "exited with output",
			reply: `{"exitcode":0,"err-data":"b29wcwo=","out-data":"aGVsbG8K","err-truncated":false,"out-truncated":false,"exited":true}`,
			want:  Status{Exited: true, Stdout: []byte("hello\n"), Stderr: []byte("oops\n")},
		},
		{
			name:  "killed by a signal",
			reply: `{"signal":9,"exited":true}`,
			want:  Status{Exited: true, ExitCode: -1, Signal: 9},
		},
		{
			name:  "truncated output",
			reply: `{"exitcode":1,"out-data":"eA==","err-data":"eQ==","out-truncated":true,"err-truncated":true,"exited":true}`,
			want:  Status{Exited: true, ExitCode: 1, Stdout: []byte("x"), Stderr: []byte("y"), StdoutTruncated: true, StderrTruncated: true},
		},
		{
			name:  "only stderr truncated",
			reply: `{"exitcode":0,"err-truncated":true,"exited":true}`,
			want:  Status{Exited: true, StderrTruncated: true},
		},
		{
			name:    "bad base64",
			reply:   `{"exitcode":0,"out-data":"!!","exited":true}`,
			wantErr: true,
		},
		{
			name:    "not an object",
			reply:   `[]`,
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeStatus([]byte(tt.reply))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if !tt.wantErr && !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestClassify(t *testing.T) {
	lv := func(code libvirt.ErrorNumber, msg string) error {
		return libvirt.Error{Code: uint32(code), Message: msg}
	}
	tests := []struct {
		name string
		err  error
		want error
	}{
		{"agent not connected", lv(libvirt.ErrAgentUnresponsive, "Guest agent is not responding: QEMU guest agent is not connected"), ErrAgentUnavailable},
		{"agent command timeout", lv(libvirt.ErrAgentCommandTimeout, "Guest agent didn't respond to command within timeout"), ErrAgentUnavailable},
		{"no agent channel", lv(libvirt.ErrArgumentUnsupported, "argument unsupported: QEMU guest agent is not configured"), ErrAgentNotConfigured},
		{"not running", lv(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running"), ErrDomainNotRunning},
		{"no domain", lv(libvirt.ErrNoDomain, "Domain not found"), ErrDomainNotFound},
		{"agent error, newer libvirt", lv(libvirt.ErrAgentCommandFailed, "unable to execute QEMU agent command 'guest-exec': ..."), ErrCommandFailed},
		{"agent error, libvirt 9.0", lv(libvirt.ErrInternalError, "internal error: unable to execute QEMU agent command 'guest-exec-status': Invalid parameter 'pid'"), ErrCommandFailed},
		{"other internal error", lv(libvirt.ErrInternalError, "something else"), nil},
		{"wrapped", fmt.Errorf("outer: %w", lv(libvirt.ErrNoDomain, "Domain not found")), ErrDomainNotFound},
		{"not libvirt's", io.ErrUnexpectedEOF, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classify(tt.err); got != tt.want {
				t.Errorf("classify = %v, want %v", got, tt.want)
			}
			err := withSentinel(tt.err)
			var e libvirt.Error
			if errors.As(tt.err, &e) && !errors.As(err, &e) {
				t.Errorf("withSentinel hides the libvirt.Error: %v", err)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("withSentinel = %v, want it to wrap %v", err, tt.want)
			}
		})
	}
}

func TestScrub(t *testing.T) {
	secret := "c2VjcmV0LXRva2Vu"
	// A program's input as a libvirt message could quote it: escaped.
	input := `pass word/"1"`
	tests := []struct {
		name     string
		err      error
		withheld bool
	}{
		{"quotes the secret", libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "bad command {\"input-data\":\"" + secret + "\"}"}, true},
		{"plain error quoting it", errors.New("x " + secret), true},
		{"clean", libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "not connected"}, false},
		{"quotes the input JSON-escaped", errors.New(`bad argument "pass word/\"1\""`), true},
		{"quotes the input percent-encoded", errors.New("url " + url.QueryEscape(input)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := scrub(tt.err, "", secret, input)
			if strings.Contains(got.Error(), secret) {
				t.Errorf("scrub left the secret in %q", got)
			}
			if withheld := got != tt.err; withheld != tt.withheld {
				t.Errorf("withheld = %v, want %v", withheld, tt.withheld)
			}
			var in, out libvirt.Error
			if errors.As(tt.err, &in) && (!errors.As(got, &out) || in.Code != out.Code) {
				t.Errorf("scrub lost the libvirt code: %v", got)
			}
		})
	}
}

func TestStderrTail(t *testing.T) {
	long := strings.Repeat("a", 600) + "END"
	tests := []struct {
		name          string
		stderr, stdin string
		want          string
	}{
		{"short", "oops\n", "", "oops"},
		{"long keeps the end", long, "", "…" + long[len(long)-maxStderrTail:]},
		{"input removed", "got s3cr3t-value here", "s3cr3t-value", "got [REDACTED] here"},
		{"input line removed", "line: s3cr3t-value", "user\ns3cr3t-value\n", "line: [REDACTED]"},
		{"short input lines kept", "user", "user\n", "user"},
		{"input echoed in base64", "got " + base64.StdEncoding.EncodeToString([]byte("s3cr3t-value\n")), "s3cr3t-value\n", "got [REDACTED]"},
		{"input line echoed percent-encoded", "GET /?t=" + url.QueryEscape("s3cr3t value"), "user\ns3cr3t value\n", "GET /?t=[REDACTED]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := stderrTail([]byte(tt.stderr), []byte(tt.stdin)); got != tt.want {
				t.Errorf("stderrTail = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSeconds(t *testing.T) {
	tests := []struct {
		name    string
		timeout time.Duration
		left    time.Duration // 0: no deadline
		want    int32
	}{
		{"no deadline", 10 * time.Second, 0, 10},
		{"deadline later", 3 * time.Second, time.Minute, 3},
		{"deadline sooner", 10 * time.Second, 1500 * time.Millisecond, 2},
		{"deadline passed", 10 * time.Second, -time.Second, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.left != 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithDeadline(ctx, time.Now().Add(tt.left))
				defer cancel()
			}
			if got := seconds(ctx, tt.timeout); got != tt.want {
				t.Errorf("seconds = %d, want %d", got, tt.want)
			}
		})
	}
}

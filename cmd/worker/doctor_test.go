package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

func TestAgentVersion(t *testing.T) {
	tests := []struct {
		in           string
		major, minor int
		valid        bool
	}{
		{"7.2.22", 7, 2, true},
		{"8.0", 8, 0, true},
		{" 10.1.0\n", 10, 1, true},
		{"9", 0, 0, false},
		{"", 0, 0, false},
		{"v8.1.0", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			major, minor, valid := agentVersion(tt.in)
			if major != tt.major || minor != tt.minor || valid != tt.valid {
				t.Errorf("agentVersion(%q) = %d, %d, %v; want %d, %d, %v", tt.in, major, minor, valid, tt.major, tt.minor, tt.valid)
			}
		})
	}
}

// TestVersionAnswer pins what a runner's check says about its version
// call: the first line printed, or why there is none.
func TestVersionAnswer(t *testing.T) {
	exited := func(code int, stdout, stderr string) (qga.Status, error) {
		st := qga.Status{Exited: true, ExitCode: code, Stdout: []byte(stdout), Stderr: []byte(stderr)}
		if code != 0 {
			return st, &qga.ExitError{Domain: "d", Path: "/bin/sh", Status: st}
		}
		return st, nil
	}
	tests := []struct {
		name string
		run  func() (qga.Status, error)
		want string
	}{
		{"forgejo-runner", func() (qga.Status, error) { return exited(0, "forgejo-runner version v12.8.0\n", "") },
			`version "forgejo-runner version v12.8.0"`},
		{"first non-blank line", func() (qga.Status, error) { return exited(0, "\n  2.330.0 \r\nmore\n", "") },
			`version "2.330.0"`},
		{"control characters dropped", func() (qga.Status, error) { return exited(0, "\x1b[1m3283.v0\x1b[0m\n", "") },
			`version "[1m3283.v0[0m"`},
		{"long line clipped", func() (qga.Status, error) { return exited(0, strings.Repeat("é", 100), "") },
			`version "` + strings.Repeat("é", 60) + `…"`},
		{"nothing printed", func() (qga.Status, error) { return exited(0, "", "warning only on stderr\n") },
			"version unknown: it printed nothing"},
		{"missing java", func() (qga.Status, error) { return exited(127, "", "exec: line 12: java: not found\n") },
			"version unknown: exit code 127: exec: line 12: java: not found"},
		{"bad option on stdout", func() (qga.Status, error) { return exited(1, "unknown flag\n", "") },
			"version unknown: exit code 1: unknown flag"},
		{"killed", func() (qga.Status, error) {
			st := qga.Status{Exited: true, ExitCode: -1, Signal: 9}
			return st, &qga.ExitError{Domain: "d", Path: "/bin/sh", Status: st}
		}, "version unknown: killed by signal 9"},
		{"timeout", func() (qga.Status, error) {
			return qga.Status{}, fmt.Errorf("guest-exec /bin/sh on d: pid 7: %w: %w", qga.ErrRunTimeout, context.DeadlineExceeded)
		}, "version unknown: no answer within 1m0s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := tt.run()
			if got := versionAnswer(st, err, time.Minute); got != tt.want {
				t.Errorf("versionAnswer = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDoctorFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"defaults", nil, ""},
		{"boot without image", []string{"--boot"}, "--boot needs at least one --image"},
		{"bad domain type", []string{"--domain-type", "xen"}, `--domain-type "xen"`},
		{"bad host", []string{"--host", "a.b"}, `--host "a.b"`},
		{"zero boot timeout", []string{"--image", "x", "--boot", "--boot-timeout", "0s"}, "--boot-timeout 0s"},
		{"NATS credentials without a URL", []string{"--nats-user", "u"}, "--nats-user: needs --nats-url"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("STRETCHY_HOST", "doctor-unit")
			t.Setenv("STRETCHY_NATS_URL", "")
			var cfg doctorConfig
			fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			cfg.register(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err := cfg.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate = %v, want an error mentioning %q", err, tt.wantErr)
			}
		})
	}
}

// TestDoctorReport checks what people and scripts get from the checks:
// lines with hints, or one JSON document, and the error that makes the
// exit status 1 only when a check failed.
func TestDoctorReport(t *testing.T) {
	checks := []check{
		ok("libvirt", "qemu:///system", "connected"),
		warn("pool.space", "ci-images", "free space", "%s free", gib(5<<30)),
		fail("image.state", "img", "shut it down", "image img is running"),
	}
	tests := []struct {
		name       string
		checks     []check
		asJSON     bool
		wantOut    []string
		wantStatus status
		wantErr    bool
	}{
		{
			name:    "lines",
			checks:  checks,
			wantOut: []string{"ok    libvirt              qemu:///system: connected\n", "warn  pool.space           ci-images: 5.0 GiB free\n      hint: free space\n", "3 checks: 1 ok, 1 warn, 1 fail"},
			wantErr: true,
		},
		{name: "warnings pass", checks: checks[:2], wantOut: []string{"2 checks: 1 ok, 1 warn, 0 fail"}},
		{name: "json", checks: checks, asJSON: true, wantStatus: statusFail, wantErr: true},
		{name: "json warn", checks: checks[:2], asJSON: true, wantStatus: statusWarn},
		{name: "json nothing checked", asJSON: true, wantStatus: statusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			d := &doctor{cfg: doctorConfig{JSON: tt.asJSON}, out: &out}
			for _, c := range tt.checks {
				d.add(c)
			}
			err := d.finish(context.Background())
			if (err != nil) != tt.wantErr {
				t.Errorf("finish = %v, want an error: %v", err, tt.wantErr)
			}
			for _, want := range tt.wantOut {
				if !strings.Contains(out.String(), want) {
					t.Errorf("output does not contain %q:\n%s", want, out.String())
				}
			}
			if !tt.asJSON {
				return
			}
			var doc struct {
				Status status           `json:"status"`
				Checks []map[string]any `json:"checks"`
			}
			dec := json.NewDecoder(&out)
			if err := dec.Decode(&doc); err != nil {
				t.Fatalf("output is no JSON document: %v", err)
			}
			if dec.More() {
				t.Error("more than one JSON document")
			}
			if doc.Status != tt.wantStatus || doc.Checks == nil || len(doc.Checks) != len(tt.checks) {
				t.Errorf("document = %+v, want status %s and %d checks", doc, tt.wantStatus, len(tt.checks))
			}
			if len(doc.Checks) == 3 {
				if got := doc.Checks[2]; got["check"] != "image.state" || got["target"] != "img" || got["hint"] != "shut it down" {
					t.Errorf("third check = %v", got)
				}
				if _, ok := doc.Checks[0]["hint"]; ok {
					t.Errorf("ok check has a hint: %v", doc.Checks[0])
				}
			}
		})
	}
}

func TestDoctorInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	d := &doctor{out: io.Discard}
	d.add(ok("libvirt", "", "connected"))
	if err := d.finish(ctx); err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Errorf("finish after Ctrl-C = %v, want an error saying so", err)
	}
}

func TestLibvirtHint(t *testing.T) {
	dial := func(errno syscall.Errno) error {
		return fmt.Errorf("connect to libvirt qemu:///system: %w",
			&net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", errno)})
	}
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"no socket", dial(syscall.ENOENT), "go tool task libvirt:up"},
		{"daemon gone", dial(syscall.ECONNREFUSED), "start it"},
		{"socket permissions", dial(syscall.EACCES), "group libvirt"},
		{"hung", fmt.Errorf("connect: %w", provision.ErrTimeout), "restart it"},
		{"other", errors.New("XML error"), "virsh -c qemu:///system list --all"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := libvirtHint(tt.err, "qemu:///system"); !strings.Contains(got, tt.want) {
				t.Errorf("libvirtHint = %q, want it to mention %q", got, tt.want)
			}
		})
	}
}

// TestDoctorUsageNamesEveryRunner: the help lists the check of every
// runner kind of the table.
func TestDoctorUsageNamesEveryRunner(t *testing.T) {
	for _, k := range runners.Kinds() {
		if k.Starts() && !strings.Contains(strings.Join(strings.Fields(doctorUsage), " "), " boot.runner."+string(k.Kind)+",") {
			t.Errorf("doctorUsage does not name the check boot.runner.%s", k.Kind)
		}
	}
}

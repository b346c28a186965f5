package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestMain runs the worker's main instead of the tests when the test
// binary is started as the worker (runWorker), so that a test sees what
// a user sees: the output and the exit status.
func TestMain(m *testing.M) {
	if os.Getenv("WORKER_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runWorker runs "worker args..." with env and no other STRETCHY_
// variable, and returns its output and exit status.
func runWorker(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRETCHY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "WORKER_TEST_RUN_MAIN=1")
	cmd.Env = append(cmd.Env, env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

// closedPort is a NATS URL where nothing listens, so that a command that
// connects fails.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "nats://" + addr
}

// TestHelp: help is asked for without connecting anywhere, and answers
// with the usage of what was asked about.
func TestHelp(t *testing.T) {
	env := []string{"STRETCHY_NATS_URL=" + closedPort(t)}
	tests := []struct {
		name             string
		args             []string
		code             int
		stdout, stderr   []string
		notStdout, notSE []string
	}{
		{"--help", []string{"--help"}, 0, []string{"usage: worker <command>", "submit    publish"}, nil, nil, []string{"-nats-url"}},
		{"-h", []string{"-h"}, 0, []string{"usage: worker <command>", "version   print"}, nil, nil, []string{"-nats-url"}},
		{"help", []string{"help"}, 0, []string{"usage: worker <command>"}, nil, nil, nil},
		{"run -h", []string{"run", "-h"}, 0, nil, []string{"-max-vms"}, nil, nil},
		{"submit -h", []string{"submit", "-h"}, 0, nil,
			[]string{"usage: worker submit provision --job ID", "worker submit teardown", "-job", "-secret-file"}, nil, []string{"connect to nats"}},
		{"submit --help", []string{"submit", "--help"}, 0, nil, []string{"usage: worker submit provision"}, nil, []string{"connect to nats"}},
		{"submit provision -h", []string{"submit", "provision", "-h"}, 0, nil, []string{"-image"}, nil, []string{"connect to nats"}},
		{"submit of an unknown request", []string{"submit", "restart", "--job", "j1"}, 1, nil,
			[]string{`unknown request "restart"`, "usage: worker submit provision"}, nil, []string{"connect to nats"}},
		{"submit of nothing", []string{"submit"}, 1, nil, []string{"usage: worker submit provision"}, nil, []string{"connect to nats"}},
		{"unknown command", []string{"frobnicate"}, 2, nil, []string{`unknown command "frobnicate"`, "usage: worker <command>"}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := runWorker(t, env, tt.args...)
			if code != tt.code {
				t.Errorf("exit status %d, want %d", code, tt.code)
			}
			for _, c := range []struct {
				what      string
				out       string
				want, not []string
			}{{"stdout", stdout, tt.stdout, tt.notStdout}, {"stderr", stderr, tt.stderr, tt.notSE}} {
				for _, w := range c.want {
					if !strings.Contains(c.out, w) {
						t.Errorf("%s does not say %q:\n%s", c.what, w, c.out)
					}
				}
				for _, n := range c.not {
					if strings.Contains(c.out, n) {
						t.Errorf("%s says %q:\n%s", c.what, n, c.out)
					}
				}
			}
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
			}
		})
	}
}

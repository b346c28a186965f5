package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// closedPort returns a loopback port nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

// runUntilLog starts worker run with args and reads its JSON log until a
// line whose msg starts with one of msgs, which it returns; then it stops
// the worker.
func runUntilLog(t *testing.T, args []string, msgs ...string) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, workerBinary(t), append([]string{"run", "--log-format", "json"}, args...)...)
	cmd.Env = doctorEnv()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	var seen []string
	lines := bufio.NewScanner(stderr)
	for lines.Scan() {
		seen = append(seen, lines.Text())
		var rec map[string]any
		if json.Unmarshal(lines.Bytes(), &rec) != nil {
			continue
		}
		msg, _ := rec["msg"].(string)
		for _, m := range msgs {
			if strings.HasPrefix(msg, m) {
				return rec
			}
		}
	}
	t.Fatalf("worker run %v ended without logging %q:\n%s", args, msgs, strings.Join(seen, "\n"))
	return nil
}

// TestWorkerRunDefinesGuestFilter: worker run defines the guest filter at
// start with its control plane, and says so; with --isolate-guests=false
// it warns instead.
func TestWorkerRunDefinesGuestFilter(t *testing.T) {
	l := dialLibvirt(t)
	natsURL, _ := startNATS(t)
	_, natsPort, _ := net.SplitHostPort(strings.TrimPrefix(natsURL, "nats://"))
	httpPort, extraPort := closedPort(t), closedPort(t)
	common := []string{"--nats-url", natsURL, "--host", testHost + "-iso", "--images", "no-image-matches-this"}

	filter := provision.GuestFilterName(testHost + "-iso")
	t.Cleanup(func() {
		// A worker's filter outlives it; this host id is the test's.
		if nf, err := l.NwfilterLookupByName(filter); err == nil {
			_ = l.NwfilterUndefine(nf)
		}
	})
	t.Run("on", func(t *testing.T) {
		rec := runUntilLog(t, append(common, "--http-addr", "127.0.0.1:"+strconv.Itoa(httpPort),
			// Only loopback and a network without a port: doctor --boot
			// probes what this filter denies, and tests send nothing
			// beyond this host.
			"--isolate-from", "127.0.0.1:"+strconv.Itoa(extraPort), "--isolate-from", "198.18.0.0/15"),
			"guest filter defined", "worker started")
		deny, _ := rec["deny"].(string)
		if rec["filter"] != filter || deny == "" {
			t.Fatalf("log %v; want the guest filter defined before the worker started", rec)
		}
		t.Logf("deny list logged: %s", deny)
		got := strings.Split(deny, ",")
		for _, want := range []string{"127.0.0.1:" + natsPort, "127.0.0.1:" + strconv.Itoa(httpPort), "127.0.0.1:16509", "127.0.0.1:16514",
			"127.0.0.1:" + strconv.Itoa(extraPort), "198.18.0.0/15"} {
			if !slices.Contains(got, want) {
				t.Errorf("deny list %v lacks %s", got, want)
			}
		}
		if _, err := l.NwfilterLookupByName(filter); err != nil {
			t.Errorf("libvirt has no filter %s: %v", filter, err)
		}
	})
	t.Run("off", func(t *testing.T) {
		rec := runUntilLog(t, append(common, "--isolate-guests=false"), "guest isolation is off", "guest filter defined", "worker started")
		if msg := rec["msg"].(string); !strings.HasPrefix(msg, "guest isolation is off") || rec["level"] != "WARN" {
			t.Errorf("log %v; want the warning that isolation is off", rec)
		}
	})
}

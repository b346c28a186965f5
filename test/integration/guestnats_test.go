package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// natsHandshake is what a job's code would send to use a NATS server it
// reaches: CONNECT without credentials, then PING.
const natsHandshake = `printf 'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\nPING\r\n'`

// inGuest runs a shell command in the guest of domain through its agent
// and returns what it printed, stdout then stderr.
func inGuest(t *testing.T, agent *qga.Agent, domain, cmd string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := agent.Run(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", cmd}, Capture: true})
	var exit *qga.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("in %s: %s: %v", domain, cmd, err)
	}
	return strings.TrimSpace(string(st.Stdout) + string(st.Stderr))
}

// TestGuestCannotUseTheControlPlane: a job's code in a real guest of the
// test image (a user-mode interface, so the host's loopback is 10.0.2.2 in
// the guest; no filter applies there, docs/security.md 4), with the address
// a job would configure, opens TCP to the worker's embedded NATS server and
// to an external NATS server on the host that, as a fleet's must, requires
// authentication: both answer, and both refuse the session (Authorization
// Violation), so the job can read no request, publish nothing and drain
// nothing. A listener on the host that is not the control plane answers
// the same guest, so the refusals are the servers', not a broken network.
func TestGuestCannotUseTheControlPlane(t *testing.T) {
	l := dialLibvirt(t)
	dataDir := filepath.Join(t.TempDir(), "nats")
	natsPort := freePort(t)
	host := "itest-gnats-" + strings.TrimPrefix(runID, "it")
	cmd := exec.Command(workerBinary(t), "run", "--host", host, "--domain-type", "qemu",
		"--nats-data-dir", dataDir, "--nats-port", strconv.Itoa(natsPort), "--log-format", "json",
		"--images", testImage(), "--keys-dir", filepath.Join(t.TempDir(), "no-keys"))
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			out.mu.Lock()
			t.Logf("worker log:\n%s", out.String())
			out.mu.Unlock()
		}
	})
	// This test's client uses the credentials the worker made, as the
	// worker's commands on the host do.
	url := fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	var nc *nats.Conn
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if _, err := os.Stat(embedded.CredentialsPath(dataDir)); err == nil {
			opt, err := nats.NkeyOptionFromSeed(embedded.CredentialsPath(dataDir))
			if err == nil {
				if nc, err = nats.Connect(url, opt); err == nil {
					break
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker's embedded NATS did not come up at %s", url)
		}
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	waitHosts(t, js, "the worker registered", func(hs map[string]messages.Host) bool { return carries(hs[host], testImage()) })
	events := followEvents(t, js)
	job := uniqueJob(t, "guest-nats")
	req := provisionRequest(job)
	if _, err := submitReq(context.Background(), js, req, host); err != nil {
		t.Fatal(err)
	}
	events.waitState(t, job, messages.StateAgentReady, bootWait)

	// An external NATS server on the host, with a user of its own.
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	ext, err := embedded.Start(embedded.Options{StoreDir: t.TempDir(), Port: -1, NKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ext.Shutdown()
		ext.WaitForShutdown()
	})
	extPort := ext.Addr().(*net.TCPAddr).Port
	// A service of the host's that is not the control plane.
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	go func() {
		for {
			c, err := other.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("HELLO not-the-control-plane\n"))
			_ = c.Close()
		}
	}()

	agent := qga.New(l, qga.Options{})
	domain := messages.DomainName(job)
	inGuest(t, agent, domain, "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2")
	for _, c := range []struct{ name, port string }{
		{"the worker's embedded NATS", strconv.Itoa(natsPort)},
		{"an external NATS server on the host", strconv.Itoa(extPort)},
	} {
		got := inGuest(t, agent, domain, natsHandshake+" | timeout 30 nc -w 10 10.0.2.2 "+c.port)
		t.Logf("in the guest, %s at 10.0.2.2:%s: %q", c.name, c.port, got)
		if !strings.Contains(got, `"auth_required":true`) || !strings.Contains(got, "-ERR 'Authorization Violation'") || strings.Contains(got, "PONG") {
			t.Errorf("%s at 10.0.2.2:%s answered %q; want the banner asking for authentication and the session refused", c.name, c.port, got)
		}
	}
	otherPort := strconv.Itoa(other.Addr().(*net.TCPAddr).Port)
	got := inGuest(t, agent, domain, "timeout 30 nc -w 10 10.0.2.2 "+otherPort+" </dev/null")
	t.Logf("in the guest, another service of the host at 10.0.2.2:%s: %q", otherPort, got)
	if got != "HELLO not-the-control-plane" {
		t.Errorf("the guest got %q from a listener of the host, want its banner: the network of the guest does not work", got)
	}

	teardownOn(t, js, host, job)
	events.waitState(t, job, messages.StateTornDown, bootWait)
}

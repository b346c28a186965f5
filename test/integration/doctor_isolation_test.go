package integration

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// listenLoopback accepts connections on 127.0.0.1 until the test ends,
// writing banner to each, and counts them; it returns the port.
func listenLoopback(t *testing.T, banner string) (int, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			fmt.Fprintf(c, "%s\r\n", banner)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().(*net.TCPAddr).Port, &n
}

// definePlumbedImage defines an image from an overlay of the test image
// whose guest configures its user-mode network at boot (10.0.2.15/24,
// default route via 10.0.2.2), as a real image's DHCP client would: it
// boots the image once, writes the setup into rcS through the agent, and
// stops it hard.
func definePlumbedImage(t *testing.T, l *libvirt.Libvirt, name string) {
	t.Helper()
	defineDoctorImage(t, l, name, overlayVolume(t, l, name+"-vda.qcow2"), true)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	agent := qga.New(l, qga.Options{})
	if err := agent.WaitReady(ctx, name); err != nil {
		t.Fatal(err)
	}
	plant := `printf 'ip addr add 10.0.2.15/24 dev eth0\nip route add default via 10.0.2.2\n' >>/etc/init.d/rcS && sync`
	if _, err := agent.Run(ctx, name, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", plant}, Capture: true}); err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.DomainDestroy(dom); err != nil {
		t.Fatal(err)
	}
}

// TestDoctorBootProbesControlPlane: doctor --boot connects from inside the
// probe guest to each control-plane address as that guest sees it. The
// image's NIC is user-mode (slirp), which no filter covers: the guest
// reaches a service on the host's loopback through 10.0.2.2, so the check
// fails and says why; a port where nothing listens is refused.
func TestDoctorBootProbesControlPlane(t *testing.T) {
	l := dialLibvirt(t)
	image := "doctortest-net-" + doctorRand(t)
	definePlumbedImage(t, l, image)
	natsPort, accepted := listenLoopback(t, "INFO {}")
	closed := closedPort(t)

	r, code := runDoctor(t, "--boot", "--image", image, "--domain-type", "qemu", "--boot-timeout", "90s",
		"--nats-port", strconv.Itoa(natsPort), "--isolate-from", "127.0.0.1:"+strconv.Itoa(closed))
	if code != 1 || r.Status != "fail" {
		t.Errorf("exit status %d, status %q; want 1, fail", code, r.Status)
	}
	r.want(t, "boot.nics", image, "warn", "interface 0 (user): not covered by the guest filter", "10.0.2.2")
	c := r.want(t, "boot.isolation", image, "fail",
		fmt.Sprintf("from inside the guest, 10.0.2.2:%d (the host's 127.0.0.1:%d) answered", natsPort, natsPort), "user-mode (slirp)")
	_, refused, _ := strings.Cut(c.Message, " refused (")
	if want := fmt.Sprintf("10.0.2.2:%d (the host's 127.0.0.1:%d)", closed, closed); !strings.Contains(refused, want) {
		t.Errorf("boot.isolation %q does not list %s as refused", c.Message, want)
	}
	t.Logf("boot.isolation: %s", c.Message)
	if accepted.Load() == 0 {
		t.Error("the listener standing for NATS saw no connection")
	}
	if failed := r.failed(); len(failed) != 1 {
		t.Errorf("failed checks %+v, want only boot.isolation", failed)
	}
	r.want(t, "boot.cleanup", image, "ok", "removed stretchy-doctor-", "")
	if left := doctorLeftovers(t, l); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

func TestProbeTargets(t *testing.T) {
	d := func(s string, port uint16) provision.Deny {
		return provision.Deny{Prefix: netip.MustParsePrefix(s), Port: port}
	}
	deny := []provision.Deny{d("127.0.0.1/32", 4222), d("::1/128", 16509), d("192.0.2.2/32", 4222), d("fe80::1/128", 4222),
		d("198.51.100.0/24", 0), d("203.0.113.5/32", 0)}
	user := provision.NIC{Kind: "user", Gateway: netip.MustParseAddr("10.0.2.2"), Gateway6: netip.MustParseAddr("fec0::2")}
	bridge := provision.NIC{Kind: "bridge"}
	tests := []struct {
		name string
		nics []provision.NIC
		want []string
	}{
		{"user-mode: loopback through the gateways", []provision.NIC{user},
			[]string{"10.0.2.2:4222 (the host's 127.0.0.1:4222)", "192.0.2.2:4222", "[fec0::2]:16509 (the host's [::1]:16509)"}},
		{"bridged: the addresses themselves, not loopback", []provision.NIC{bridge}, []string{"192.0.2.2:4222"}},
		{"both", []provision.NIC{bridge, user},
			[]string{"10.0.2.2:4222 (the host's 127.0.0.1:4222)", "192.0.2.2:4222", "[fec0::2]:16509 (the host's [::1]:16509)"}},
		{"no interfaces", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, p := range probeTargets(tt.nics, deny) {
				got = append(got, p.String())
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("targets\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

// TestPosixProbe runs the probe the doctor runs in a guest here, with
// busybox's sh, nc and timeout as in the tiny test guest, against
// listeners on the loopback.
func TestPosixProbe(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("no busybox")
	}
	dir := t.TempDir()
	for _, applet := range []string{"nc", "timeout", "tr", "cut", "cat"} {
		if out, err := exec.Command("ln", "-s", bb, dir+"/"+applet).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	open, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	go func() {
		for {
			c, err := open.Accept()
			if err != nil {
				return
			}
			fmt.Fprint(c, "INFO {}\r\n")
			// Held open, as a NATS server waiting for CONNECT would.
			defer c.Close()
		}
	}()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := closed.Addr().(*net.TCPAddr)
	closed.Close()
	openAddr := open.Addr().(*net.TCPAddr)
	targets := []probeTarget{
		{Addr: netip.MustParseAddr("127.0.0.1"), Port: uint16(openAddr.Port)},
		{Addr: netip.MustParseAddr("127.0.0.1"), Port: uint16(closedAddr.Port)},
	}
	args := []string{"sh", "-c", posixProbe, "1"}
	for _, tg := range targets {
		args = append(args, tg.Addr.String(), strconv.Itoa(int(tg.Port)))
	}
	cmd := exec.Command(bb, args...)
	cmd.Env = []string{"PATH=" + dir}
	out, err := cmd.Output()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	got := parseProbe(out, targets)
	if got[0].Result != "connected" || got[1].Result != "refused" {
		t.Errorf("probe results %+v, want connected and refused; output:\n%s", got, out)
	}
}

func TestParseProbeTrustsOnlyItsTargets(t *testing.T) {
	targets := []probeTarget{{Addr: netip.MustParseAddr("10.0.2.2"), Port: 4222}, {Addr: netip.MustParseAddr("192.0.2.2"), Port: 16509}}
	out := "10.0.2.2 4222 refused\n203.0.113.1 80 connected\ngarbage\n10.0.2.2 4222 connected\n"
	got := parseProbe([]byte(out), targets)
	want := []probeResult{{targets[0], "connected"}, {targets[1], "no answer from the probe"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseProbe = %+v, want %+v", got, want)
	}
}

func TestWindowsProbe(t *testing.T) {
	s := windowsProbe([]probeTarget{{Addr: netip.MustParseAddr("10.0.2.2"), Port: 4222}, {Addr: netip.MustParseAddr("fec0::2"), Port: 16509}})
	for _, want := range []string{"@('10.0.2.2',4222),@('fec0::2',16509)", "WaitOne(3000)", "'ConnectionRefused' { $r = 'refused' }"} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %q:\n%s", want, s)
		}
	}
}

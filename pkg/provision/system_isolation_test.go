package provision

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// Tests of guest isolation with real guests of the tiny image on the real
// libvirtd: connections from inside the guest, made through its agent as
// a job's commands would be, after giving it an address as a job's
// network setup would.

// testGuestFilter defines a guest filter of the test's own name, which no
// worker uses, and undefines it when the test ends, after the machines
// that use it are gone (cleanups run last-registered first). Composite
// filters made from it go too.
func testGuestFilter(t *testing.T, l *libvirt.Libvirt, deny []Deny, policy UnfilteredPolicy, warn func(string, []string)) *Provisioner {
	t.Helper()
	name := "provtest-guest-" + randHex(t)
	t.Cleanup(func() {
		names, err := l.ConnectListNwfilters(1024)
		if err != nil {
			t.Errorf("cleanup: list nwfilters: %v", err)
			return
		}
		// Composites first: they refer to the guest filter.
		slices.SortFunc(names, func(a, b string) int { return len(b) - len(a) })
		for _, n := range names {
			if !strings.HasPrefix(n, name) {
				continue
			}
			f, err := l.NwfilterLookupByName(n)
			if err == nil {
				err = l.NwfilterUndefine(f)
			}
			if err != nil {
				t.Errorf("cleanup: undefine nwfilter %s: %v", n, err)
			}
		}
	})
	p := New(l, Options{DomainType: "qemu", Isolation: &Isolation{Filter: name, Unfiltered: policy, Warn: warn}})
	if err := p.DefineGuestFilter(t.Context(), deny); err != nil {
		t.Fatalf("DefineGuestFilter: %v", err)
	}
	return p
}

// guestConnect connects from inside the guest of machine to host:port
// with busybox nc, as a job's command would, and says what happened:
// "connected: <first line the service sent>", "refused", "timed out",
// "unreachable" or what nc printed. wait bounds the connect (nc -w) and
// only decides how long a dropped connection takes to be reported.
func guestConnect(t *testing.T, agent *qga.Agent, machine, host, port, wait string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	st, err := agent.Run(ctx, machine, qga.ExecRequest{Path: "/usr/bin/timeout",
		Args: []string{"60", "/usr/bin/nc", "-w", wait, host, port}, Capture: true})
	var exit *qga.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("nc %s %s in %s: %v", host, port, machine, err)
	}
	out, stderr := strings.TrimSpace(string(st.Stdout)), strings.TrimSpace(string(st.Stderr))
	var got string
	switch {
	case st.ExitCode == 0 && out != "":
		got = "connected: " + strings.SplitN(out, "\n", 2)[0]
	case strings.Contains(stderr, "refused"):
		got = "refused"
	case strings.Contains(stderr, "timed out"):
		got = "timed out"
	case strings.Contains(stderr, "unreachable"), strings.Contains(stderr, "No route"):
		got = "unreachable"
	default:
		got = "exit " + strconv.Itoa(st.ExitCode) + ": " + stderr
	}
	t.Logf("in %s: nc -w %s %s %s: %s", machine, wait, host, port, got)
	return got
}

// guestSh runs a shell command in the guest as root and fails the test
// unless it exits 0.
func guestSh(t *testing.T, agent *qga.Agent, machine, cmd string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	st, err := agent.Run(ctx, machine, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", cmd}, Capture: true})
	if err != nil {
		t.Fatalf("in %s: %s: %v (stderr %q)", machine, cmd, err, st.Stderr)
	}
	return string(st.Stdout)
}

// bootIsolated clones image with p, starts it, waits for its agent and
// gives eth0 the address addr/24, as a job's network setup would.
func bootIsolated(t *testing.T, l *libvirt.Libvirt, p *Provisioner, agent *qga.Agent, image, addr string) Machine {
	t.Helper()
	m := clone(t, p, Spec{Host: testHost, JobID: testJobID(t), Image: image, RunnerKind: "none"})
	if err := p.Start(t.Context(), m.Key); err != nil {
		t.Fatalf("Start %s: %v", m.Name, err)
	}
	waitAgent(t, l, m.Name, 2*time.Minute)
	guestSh(t, agent, m.Name, "ip link set eth0 up && ip addr add "+addr+"/24 dev eth0")
	return m
}

// TestSystemBridgedGuestIsolated boots two clones of an image whose NIC is
// on a bridge of the test's own, with the guest filter, and shows from
// inside the guests that the control plane (a listener in a namespace on
// the bridge, named in the filter's deny list) cannot be reached while
// another listener there can, and that the two guests cannot reach each
// other while the namespace reaches both.
func TestSystemBridgedGuestIsolated(t *testing.T) {
	l := systemConn(t)
	br := newTestBridge(t, "198.18.0.1")
	control := listenBanner(t, br.NS, "198.18.0.1:4222", "INFO control-plane")
	forge := listenBanner(t, br.NS, "198.18.0.1:3000", "forge")

	p := testGuestFilter(t, l, []Deny{{Prefix: netip.MustParsePrefix("198.18.0.1/32"), Port: 4222}}, UnfilteredRefuse, nil)
	img := defineTestImage(t, l, imageShape{interfaces: []libvirtxml.DomainInterface{{
		Source: &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: br.Bridge}},
		Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
	}}})
	agent := qga.New(l, qga.Options{})
	a := bootIsolated(t, l, p, agent, img.Name, "198.18.0.10")
	b := bootIsolated(t, l, p, agent, img.Name, "198.18.0.11")

	for _, m := range []Machine{a, b} {
		iface := domainXML(t, l, m.Name).Devices.Interfaces[0]
		if iface.FilterRef == nil || iface.FilterRef.Filter != p.opts.Isolation.Filter {
			t.Errorf("%s: filterref %+v, want %s", m.Name, iface.FilterRef, p.opts.Isolation.Filter)
		}
		if iface.PortOptions == nil || iface.PortOptions.Isolated != "yes" {
			t.Errorf("%s: port %+v, want isolated", m.Name, iface.PortOptions)
		}
		if iface.MAC == nil || !strings.HasPrefix(iface.MAC.Address, "52:54:5c:") {
			t.Errorf("%s: MAC %+v, want one under %s", m.Name, iface.MAC, ManagedMACPrefix)
		}
	}

	// The other listener first: it shows that the guest's network works.
	if got := guestConnect(t, agent, a.Name, "198.18.0.1", "3000", "20"); got != "connected: forge" {
		t.Fatalf("guest to 198.18.0.1:3000 (not denied): %s, want connected: forge", got)
	}
	if got := guestConnect(t, agent, a.Name, "198.18.0.1", "4222", "5"); strings.HasPrefix(got, "connected") {
		t.Errorf("guest to the control plane 198.18.0.1:4222: %s; want it dropped", got)
	}
	if n := control.accepted.Load(); n != 0 {
		t.Errorf("the control-plane listener accepted %d connections, want 0", n)
	}
	if n := forge.accepted.Load(); n != 1 {
		t.Errorf("the other listener accepted %d connections, want 1", n)
	}

	// Guest to guest: b listens; the namespace reaches it, a does not.
	guestSh(t, agent, b.Name, "nc -ll -p 7000 -e /bin/echo guest-b </dev/null >/dev/null 2>&1 &")
	var line string
	var err error
	for range 20 {
		// nc in b may take a moment to listen; the namespace retries.
		if line, err = dialBanner(br.NS, "198.18.0.11:7000"); err == nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil || line != "guest-b" {
		t.Fatalf("namespace to guest b 198.18.0.11:7000: %q, %v; want guest-b", line, err)
	}
	t.Logf("namespace to guest b 198.18.0.11:7000: connected: %s", line)
	if got := guestConnect(t, agent, a.Name, "198.18.0.11", "7000", "5"); strings.HasPrefix(got, "connected") {
		t.Errorf("guest a to guest b 198.18.0.11:7000: %s; want it dropped", got)
	}
	if got := guestConnect(t, agent, b.Name, "198.18.0.10", "7000", "5"); strings.HasPrefix(got, "connected") {
		t.Errorf("guest b to guest a 198.18.0.10:7000: %s; want it dropped", got)
	}

	// The same image cloned without isolation reaches the control plane:
	// the filter is what stops the others.
	c := bootIsolated(t, l, New(l, Options{DomainType: "qemu"}), agent, img.Name, "198.18.0.12")
	if got := guestConnect(t, agent, c.Name, "198.18.0.1", "4222", "20"); got != "connected: INFO control-plane" {
		t.Errorf("unfiltered guest to 198.18.0.1:4222: %s, want connected: INFO control-plane", got)
	}
}

// TestSystemUserNetReach documents what a guest with a user-mode (slirp)
// NIC reaches, where no nwfilter applies: the host's loopback through the
// gateways 10.0.2.2 and fec0::2, and any address the host reaches. Under the warn
// policy Clone reports the interface; under refuse it clones nothing.
func TestSystemUserNetReach(t *testing.T) {
	l := systemConn(t)
	route := newTestRoute(t, "198.18.1.254", "198.18.1.1")
	outside := listenBanner(t, route.NS, "198.18.1.1:3000", "reached-through-the-host")
	loopback := listenBanner(t, "", "127.0.0.1:0", "INFO host-loopback")
	_, loopPort, _ := net.SplitHostPort(loopback.Addr)
	loopback6 := listenBanner(t, "", "[::1]:0", "INFO host-loopback-ipv6")
	_, loopPort6, _ := net.SplitHostPort(loopback6.Addr)
	deny := []Deny{{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Port: mustPort(t, loopPort)}}

	t.Run("refuse", func(t *testing.T) {
		p := testGuestFilter(t, l, deny, UnfilteredRefuse, nil)
		job := testJobID(t)
		_, err := p.Clone(t.Context(), Spec{Host: testHost, JobID: job, Image: testImage(), RunnerKind: "none"})
		if !errors.Is(err, ErrUnfiltered) || !errors.Is(err, ErrImageInvalid) {
			t.Fatalf("Clone = %v, want ErrUnfiltered and ErrImageInvalid", err)
		}
		if !strings.Contains(err.Error(), "type user") {
			t.Errorf("error %q does not name the user-mode interface", err)
		}
		if left := poolVolumeNames(t, l, DomainName(job)); len(left) > 0 {
			t.Errorf("refused clone left volumes %v", left)
		}
	})

	t.Run("warn", func(t *testing.T) {
		var mu sync.Mutex
		var warned []string
		p := testGuestFilter(t, l, deny, UnfilteredWarn, func(image string, nics []string) {
			mu.Lock()
			defer mu.Unlock()
			warned = append(warned, image+": "+strings.Join(nics, ", "))
		})
		agent := qga.New(l, qga.Options{})
		m := bootIsolated(t, l, p, agent, testImage(), "10.0.2.15")
		mu.Lock()
		if len(warned) != 1 || !strings.Contains(warned[0], testImage()+": interface 0 (type user") {
			t.Errorf("warnings %q, want one naming the user-mode interface of %s", warned, testImage())
		}
		mu.Unlock()
		if iface := domainXML(t, l, m.Name).Devices.Interfaces[0]; iface.FilterRef != nil || iface.PortOptions != nil {
			t.Errorf("user-mode interface got filterref %+v, port %+v; want neither", iface.FilterRef, iface.PortOptions)
		}
		guestSh(t, agent, m.Name, "ip route add default via 10.0.2.2")
		// The host's loopback, which the filter's deny list names but
		// cannot protect here.
		if got := guestConnect(t, agent, m.Name, "10.0.2.2", loopPort, "20"); got != "connected: INFO host-loopback" {
			t.Errorf("user-mode guest to 10.0.2.2:%s (the host's 127.0.0.1): %s, want connected", loopPort, got)
		}
		// IPv6 needs no setup at all: slirp's router advertisements give
		// the guest an address in fec0::/64 (waited for, not slept on),
		// and fec0::2 is the host's [::1].
		guestSh(t, agent, m.Name, `i=0; until ip -6 addr show dev eth0 | grep 'inet6 fec0:' | grep -qv tentative; do `+
			`i=$((i+1)); [ $i -lt 600 ] || { echo "no address from slirp's router advertisements" >&2; exit 1; }; sleep 0.1; done`)
		if got := guestConnect(t, agent, m.Name, "fec0::2", loopPort6, "20"); got != "connected: INFO host-loopback-ipv6" {
			t.Errorf("user-mode guest to [fec0::2]:%s (the host's [::1]): %s, want connected", loopPort6, got)
		}
		// An address the host routes to.
		if got := guestConnect(t, agent, m.Name, "198.18.1.1", "3000", "20"); got != "connected: reached-through-the-host" {
			t.Errorf("user-mode guest to 198.18.1.1:3000: %s, want connected", got)
		}
		if outside.accepted.Load() != 1 || loopback.accepted.Load() != 1 || loopback6.accepted.Load() != 1 {
			t.Errorf("listeners accepted %d (namespace), %d (loopback) and %d (IPv6 loopback), want 1 each",
				outside.accepted.Load(), loopback.accepted.Load(), loopback6.accepted.Load())
		}
	})
}

func mustPort(t *testing.T, s string) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort("127.0.0.1:" + s)
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

// TestSystemGuestFilter defines the guest filter on the real libvirtd,
// updates it in place, and clones images with and without a filter of
// their own: the clone's interface references the guest filter, or a
// composite that holds it and the image's filter, with the image's
// parameters.
func TestSystemGuestFilter(t *testing.T) {
	l := systemConn(t)
	ctx := t.Context()
	first := []Deny{{Prefix: netip.MustParsePrefix("192.0.2.1/32"), Port: 4222}}
	p := testGuestFilter(t, l, first, UnfilteredRefuse, nil)
	name := p.opts.Isolation.Filter
	before, err := l.NwfilterLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if got, found, err := p.GuestFilterDeny(ctx); err != nil || !found || !slices.Equal(got, first) {
		t.Fatalf("GuestFilterDeny = %v, %v, %v; want %v", got, found, err, first)
	}
	second := []Deny{{Prefix: netip.MustParsePrefix("2001:db8::5/128"), Port: 16514}, {Prefix: netip.MustParsePrefix("198.51.100.0/24")}}
	if err := p.DefineGuestFilter(ctx, second); err != nil {
		t.Fatalf("updating the filter: %v", err)
	}
	after, err := l.NwfilterLookupByName(name)
	if err != nil || after.UUID != before.UUID {
		t.Errorf("after the update: %v, %v; want the same filter (uuid %x)", after, err, before.UUID)
	}
	if got, _, err := p.GuestFilterDeny(ctx); err != nil || !slices.Equal(got, second) {
		t.Errorf("GuestFilterDeny after the update = %v, %v; want %v", got, err, second)
	}

	params := []libvirtxml.DomainInterfaceFilterParam{{Name: "CTRL_IP_LEARNING", Value: "dhcp"}}
	tests := []struct {
		name    string
		ref     *libvirtxml.DomainInterfaceFilterRef
		want    string
		wantRef []string
	}{
		{"no filter of its own", nil, name, nil},
		{"clean-traffic of its own", &libvirtxml.DomainInterfaceFilterRef{Filter: "clean-traffic", Parameters: params},
			name + "-with-clean-traffic", []string{name, "clean-traffic"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Defined only, never started: the bridge need not exist.
			img := defineTestImage(t, l, imageShape{interfaces: []libvirtxml.DomainInterface{{
				Source:    &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: "pvbr-none"}},
				FilterRef: tt.ref,
			}}})
			m := clone(t, p, Spec{Host: testHost, JobID: testJobID(t), Image: img.Name, RunnerKind: "none"})
			iface := domainXML(t, l, m.Name).Devices.Interfaces[0]
			if iface.FilterRef == nil || iface.FilterRef.Filter != tt.want {
				t.Fatalf("filterref %+v, want %s", iface.FilterRef, tt.want)
			}
			if tt.ref != nil && !slices.Equal(iface.FilterRef.Parameters, tt.ref.Parameters) {
				t.Errorf("filterref parameters %v, want the image's %v", iface.FilterRef.Parameters, tt.ref.Parameters)
			}
			if tt.wantRef == nil {
				return
			}
			f, found, err := p.lookupFilter(ctx, tt.want)
			if err != nil || !found {
				t.Fatalf("composite filter %s: %v, %v", tt.want, found, err)
			}
			var refs []string
			for _, e := range f.Entries {
				if e.Ref != nil {
					refs = append(refs, e.Ref.Filter)
				}
			}
			if !slices.Equal(refs, tt.wantRef) {
				t.Errorf("composite %s references %v, want %v", tt.want, refs, tt.wantRef)
			}
		})
	}
}

package provision

import (
	"crypto/rand"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// rule is the part of a filter rule the tests compare.
type rule struct {
	Action, Direction string
	Priority          int
	What              string
}

// rulesOf flattens f's rules for comparison: the protocol element with its
// non-empty attributes as libvirt reads them back.
func rulesOf(t *testing.T, f libvirtxml.NWFilter) []rule {
	t.Helper()
	var out []rule
	for _, e := range f.Entries {
		if e.Rule == nil {
			continue
		}
		r := *e.Rule
		inner := libvirtxml.NWFilterRule{ARP: r.ARP, MAC: r.MAC, VLAN: r.VLAN, IP: r.IP, IPv6: r.IPv6, TCP: r.TCP}
		doc, err := (&libvirtxml.NWFilter{Name: "x", Entries: []libvirtxml.NWFilterEntry{{Rule: &inner}}}).Marshal()
		if err != nil {
			t.Fatal(err)
		}
		_, body, _ := strings.Cut(doc, "<rule>")
		body, _, _ = strings.Cut(body, "</rule>")
		out = append(out, rule{r.Action, r.Direction, r.Priority, strings.TrimSpace(body)})
	}
	return out
}

func TestGuestFilterXML(t *testing.T) {
	common := []rule{
		{"drop", "out", -990, `<mac match="no" srcmacaddr="$MAC"></mac>`},
		{"drop", "in", -980, `<mac srcmacaddr="52:54:5c:00:00:00" srcmacmask="ff:ff:ff:00:00:00"></mac>`},
		{"drop", "out", -980, `<mac dstmacaddr="52:54:5c:00:00:00" dstmacmask="ff:ff:ff:00:00:00"></mac>`},
		{"drop", "out", -970, `<vlan></vlan>`},
		{"drop", "out", -970, `<mac protocolid="0x88a8"></mac>`},
	}
	tests := []struct {
		name string
		deny []Deny
		want []rule
	}{
		{"nothing to deny but other guests", nil, common},
		{"IPv4 address and port", []Deny{{netip.MustParsePrefix("192.0.2.7/32"), 4222}},
			append(common, rule{"drop", "out", -900, `<ip dstipaddr="192.0.2.7" dstipmask="32" protocol="tcp" dstportstart="4222"></ip>`})},
		{"IPv6 address and port", []Deny{{netip.MustParsePrefix("2001:db8::1/128"), 16514}},
			append(common, rule{"drop", "out", -900, `<ipv6 dstipaddr="2001:db8::1" dstipmask="128" protocol="tcp" dstportstart="16514"></ipv6>`})},
		{"network, every protocol", []Deny{{netip.MustParsePrefix("198.51.100.77/24"), 0}},
			append(common, rule{"drop", "out", -900, `<ip dstipaddr="198.51.100.0" dstipmask="24"></ip>`})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := guestFilterXML("stretchy-guest", tt.deny)
			if err != nil {
				t.Fatal(err)
			}
			if f.Name != "stretchy-guest" || f.Chain != "root" {
				t.Errorf("filter %q chain %q, want stretchy-guest in root", f.Name, f.Chain)
			}
			// Through XML and back, as libvirt gets and returns it.
			doc, err := f.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			var back libvirtxml.NWFilter
			if err := back.Unmarshal(doc); err != nil {
				t.Fatal(err)
			}
			if got := rulesOf(t, back); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("rules\n got %v\nwant %v\nXML: %s", got, tt.want, doc)
			}
			want := make([]Deny, len(tt.deny))
			for i, d := range tt.deny {
				want[i] = Deny{d.Prefix.Masked(), d.Port}
			}
			if got := denyOf(back); len(want) > 0 && !reflect.DeepEqual(got, want) {
				t.Errorf("denyOf = %v, want %v", got, want)
			}
		})
	}
	if _, err := guestFilterXML("g", []Deny{{}}); err == nil {
		t.Error("a Deny without an address was accepted")
	}
}

func TestDenyString(t *testing.T) {
	for _, tt := range []struct {
		d    Deny
		want string
	}{
		{Deny{netip.MustParsePrefix("127.0.0.1/32"), 4222}, "127.0.0.1:4222"},
		{Deny{netip.MustParsePrefix("::1/128"), 16509}, "[::1]:16509"},
		{Deny{netip.MustParsePrefix("192.0.2.0/24"), 0}, "192.0.2.0/24"},
		{Deny{netip.MustParsePrefix("192.0.2.9/32"), 0}, "192.0.2.9"},
	} {
		if got := tt.d.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func bridgeNIC(bridge string, ref *libvirtxml.DomainInterfaceFilterRef) libvirtxml.DomainInterface {
	return libvirtxml.DomainInterface{
		MAC:       &libvirtxml.DomainInterfaceMAC{Address: "00:16:3e:11:22:33"},
		Source:    &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: bridge}},
		FilterRef: ref,
	}
}

func userNIC() libvirtxml.DomainInterface {
	return libvirtxml.DomainInterface{
		MAC:    &libvirtxml.DomainInterfaceMAC{Address: "52:54:00:7e:00:01"},
		Source: &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}},
	}
}

func TestCloneXMLIsolation(t *testing.T) {
	clean := &libvirtxml.DomainInterfaceFilterRef{Filter: "clean-traffic",
		Parameters: []libvirtxml.DomainInterfaceFilterParam{{Name: "CTRL_IP_LEARNING", Value: "dhcp"}}}
	direct := libvirtxml.DomainInterface{Source: &libvirtxml.DomainInterfaceSource{Direct: &libvirtxml.DomainInterfaceSourceDirect{Dev: "eth0", Mode: "bridge"}}}
	tests := []struct {
		name   string
		nics   []libvirtxml.DomainInterface
		policy UnfilteredPolicy
		// want per interface: the filterref, "" for none.
		want       []string
		params     [][]libvirtxml.DomainInterfaceFilterParam
		unfiltered []string
		err        error
	}{
		{name: "bridge and network", policy: UnfilteredRefuse,
			nics: []libvirtxml.DomainInterface{bridgeNIC("br0", nil), nic("")},
			want: []string{"stretchy-guest", "stretchy-guest"}, params: [][]libvirtxml.DomainInterfaceFilterParam{nil, nil}},
		{name: "the image's filter is kept inside the composite", policy: UnfilteredRefuse,
			nics:   []libvirtxml.DomainInterface{bridgeNIC("br0", clean)},
			want:   []string{"stretchy-guest-with-clean-traffic"},
			params: [][]libvirtxml.DomainInterfaceFilterParam{clean.Parameters}},
		{name: "user-mode warns", policy: UnfilteredWarn,
			nics: []libvirtxml.DomainInterface{userNIC(), bridgeNIC("br0", nil)},
			want: []string{"", "stretchy-guest"}, params: [][]libvirtxml.DomainInterfaceFilterParam{nil, nil},
			unfiltered: []string{"interface 0 (type user, MAC 52:54:00:7e:00:01)"}},
		{name: "macvtap is allowed unfiltered", policy: UnfilteredAllow,
			nics: []libvirtxml.DomainInterface{direct}, want: []string{""}, params: [][]libvirtxml.DomainInterfaceFilterParam{nil},
			unfiltered: []string{"interface 0 (type direct)"}},
		{name: "user-mode refused", policy: UnfilteredRefuse,
			nics: []libvirtxml.DomainInterface{bridgeNIC("br0", nil), userNIC()}, err: ErrUnfiltered},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := image(nil, tt.nics...)
			disks, err := writableDisks(img)
			if err != nil || len(disks) != 0 {
				t.Fatal(disks, err)
			}
			d, unfiltered, err := cloneXML(img, clonePlan{Name: "stretchy-j", UUID: testUUID, Rand: rand.Reader,
				Isolation: &isolationPlan{Filter: "stretchy-guest", Policy: tt.policy}})
			if tt.err != nil {
				if !errors.Is(err, tt.err) || !errors.Is(err, ErrImageInvalid) {
					t.Fatalf("cloneXML = %v, want %v and ErrImageInvalid", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(unfiltered, tt.unfiltered) {
				t.Errorf("unfiltered %q, want %q", unfiltered, tt.unfiltered)
			}
			for i, iface := range d.Devices.Interfaces {
				mac := iface.MAC.Address
				if tt.want[i] == "" {
					if iface.FilterRef != nil || iface.PortOptions != nil {
						t.Errorf("interface %d: filterref %+v port %+v, want none", i, iface.FilterRef, iface.PortOptions)
					}
					if strings.HasPrefix(mac, "52:54:5c:") {
						t.Errorf("interface %d: unfiltered but managed MAC %s", i, mac)
					}
					continue
				}
				if iface.FilterRef == nil || iface.FilterRef.Filter != tt.want[i] || !reflect.DeepEqual(iface.FilterRef.Parameters, tt.params[i]) {
					t.Errorf("interface %d: filterref %+v, want %s with %v", i, iface.FilterRef, tt.want[i], tt.params[i])
				}
				if iface.PortOptions == nil || iface.PortOptions.Isolated != "yes" {
					t.Errorf("interface %d: port %+v, want isolated='yes'", i, iface.PortOptions)
				}
				if !strings.HasPrefix(mac, "52:54:5c:") {
					t.Errorf("interface %d: MAC %s, want one under %s", i, mac, ManagedMACPrefix)
				}
			}
			// The image keeps its own.
			for i, iface := range img.Devices.Interfaces {
				if !reflect.DeepEqual(iface.FilterRef, tt.nics[i].FilterRef) || iface.PortOptions != nil {
					t.Errorf("image interface %d changed: %+v", i, iface)
				}
			}
		})
	}
}

func TestCompositeFilterXML(t *testing.T) {
	f := compositeFilterXML("stretchy-guest", "clean-traffic")
	doc, err := f.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	want := `<filter name="stretchy-guest-with-clean-traffic" chain="root">` +
		`<filterref filter="stretchy-guest"></filterref><filterref filter="clean-traffic"></filterref></filter>`
	if got := strings.Join(strings.Fields(doc), ""); got != strings.Join(strings.Fields(want), "") {
		t.Errorf("composite filter\n got %s\nwant %s", doc, want)
	}
}

// TestGuestFilterWithoutDriver: libvirt's test driver has no nwfilter
// driver, as a libvirtd built or packaged without one; defining the
// filter then fails with ErrNWFilterUnsupported.
func TestGuestFilterWithoutDriver(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{Isolation: &Isolation{}})
	err := p.DefineGuestFilter(t.Context(), nil)
	if !errors.Is(err, ErrNWFilterUnsupported) {
		t.Fatalf("DefineGuestFilter = %v, want ErrNWFilterUnsupported", err)
	}
	t.Log(err)
}

func TestUserGateways(t *testing.T) {
	tests := []struct {
		name   string
		ips    []libvirtxml.DomainInterfaceIP
		v4, v6 string
	}{
		{"QEMU's defaults", nil, "10.0.2.2", "fec0::2"},
		{"a network of its own", []libvirtxml.DomainInterfaceIP{{Address: "172.17.2.0", Family: "ipv4", Prefix: 24}, {Address: "fd00:5::", Family: "ipv6", Prefix: 64}},
			"172.17.2.2", "fd00:5::2"},
		{"an address inside the network", []libvirtxml.DomainInterfaceIP{{Address: "172.17.2.15", Prefix: 24}}, "172.17.2.2", "fec0::2"},
		{"no prefix", []libvirtxml.DomainInterfaceIP{{Address: "172.17.2.0"}}, "10.0.2.2", "fec0::2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v4, v6 := userGateways(tt.ips)
			if v4.String() != tt.v4 || v6.String() != tt.v6 {
				t.Errorf("userGateways = %s, %s; want %s, %s", v4, v6, tt.v4, tt.v6)
			}
		})
	}
}

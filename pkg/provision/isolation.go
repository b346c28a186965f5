package provision

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Guest isolation (docs/security.md section 4). A CI guest runs strangers'
// code; on a bridged or libvirt network it reaches whatever the host
// reaches. The worker therefore attaches one libvirt nwfilter to every
// bridged and network interface of its clones. The filter works at the
// ebtables level only (no iptables rules, so no br_netfilter setting
// matters) and, for traffic leaving the guest, drops
//
//   - frames whose source MAC is not the interface's own ($MAC), so that a
//     guest cannot pose as another machine;
//   - frames to a managed guest's MAC (ManagedMACPrefix under
//     ManagedMACMask: every isolated interface of a clone gets such an
//     address), and, for traffic reaching the guest, frames from one;
//   - 802.1Q and 802.1ad tagged frames, which would slip past the IP rules
//     and could reach other VLANs of a trunk;
//   - IPv4 and IPv6 packets to each Deny destination: every protocol to an
//     address, or TCP to an address and port.
//
// Everything else (the forge, package mirrors, the internet, DHCP and DNS)
// passes. The interfaces also get <port isolated='yes'/>, so that the
// host's bridge itself forwards nothing between two clones on it.

// DefaultGuestFilter is the name of the guest filter of an Isolation
// that names none; a worker names its own GuestFilterName(host).
const DefaultGuestFilter = "stretchy-guest"

// GuestFilterName is the guest filter of the worker of host: each worker
// defines its own, so that two workers sharing a libvirtd (tests run so)
// do not replace each other's destinations.
func GuestFilterName(host string) string { return DefaultGuestFilter + "-" + host }

// ManagedMACPrefix and ManagedMACMask describe the MAC addresses of the
// isolated interfaces of clones: locally administered unicast addresses
// 52:54:5c:xx:xx:xx, which libvirt (52:54:00:...) never generates. The
// filter drops frames between two such addresses, also between guests of
// different hosts on one network segment.
const (
	ManagedMACPrefix = "52:54:5c:00:00:00"
	ManagedMACMask   = "ff:ff:ff:00:00:00"
)

// managedOUI is the first three bytes of ManagedMACPrefix.
var managedOUI = [3]byte{0x52, 0x54, 0x5c}

// Rule priorities of the filter. They come before libvirt's protocol
// chains (stp -810, mac -800, ..., rarp -400), so that an image's own
// filter, included after these, cannot accept a packet they drop.
const (
	prioritySpoof   = -990
	priorityManaged = -980
	priorityTagged  = -970
	priorityDeny    = -900
	compositeJoiner = "-with-"
)

// Deny is a destination guests may not reach: every protocol to the
// addresses of Prefix when Port is 0, else TCP to Port on them.
type Deny struct {
	Prefix netip.Prefix
	Port   uint16
}

// String writes d as ADDR, ADDR:PORT, [ADDR]:PORT for IPv6, with /BITS
// for a network.
func (d Deny) String() string {
	addr := d.Prefix.Addr().String()
	if d.Prefix.Bits() != d.Prefix.Addr().BitLen() {
		addr = d.Prefix.String()
	}
	if d.Port == 0 {
		return addr
	}
	if d.Prefix.Addr().Is6() {
		addr = "[" + addr + "]"
	}
	return addr + ":" + strconv.Itoa(int(d.Port))
}

// UnfilteredPolicy says what Clone does with an interface the filter
// cannot apply to: a user-mode (slirp) one, or one of type direct
// (macvtap), hostdev, vhostuser, ethernet and the like.
type UnfilteredPolicy string

// The policies for unfiltered interfaces.
const (
	// UnfilteredWarn clones the image and reports its unfiltered
	// interfaces through Isolation.Warn.
	UnfilteredWarn UnfilteredPolicy = "warn"
	// UnfilteredRefuse fails Clone with ErrUnfiltered and ErrImageInvalid.
	UnfilteredRefuse UnfilteredPolicy = "refuse"
	// UnfilteredAllow clones the image and says nothing.
	UnfilteredAllow UnfilteredPolicy = "allow"
)

// Valid reports whether u names a policy.
func (u UnfilteredPolicy) Valid() bool {
	return u == UnfilteredWarn || u == UnfilteredRefuse || u == UnfilteredAllow
}

// Isolation turns guest isolation on for a Provisioner's clones.
type Isolation struct {
	// Filter names the nwfilter that DefineGuestFilter defines and Clone
	// attaches to bridged and network interfaces; DefaultGuestFilter if
	// empty.
	Filter string
	// Unfiltered is what Clone does with other interfaces; empty means
	// UnfilteredWarn.
	Unfiltered UnfilteredPolicy
	// Warn, when set, is called by Clone under UnfilteredWarn with the
	// image and a description of each of its unfiltered interfaces. It
	// must not block.
	Warn func(image string, nics []string)
}

func (iso *Isolation) filter() string {
	if iso.Filter == "" {
		return DefaultGuestFilter
	}
	return iso.Filter
}

func (iso *Isolation) policy() UnfilteredPolicy {
	if iso.Unfiltered == "" {
		return UnfilteredWarn
	}
	return iso.Unfiltered
}

// Errors of guest isolation.
var (
	// ErrUnfiltered means an image has an interface the guest filter
	// cannot apply to and the policy is UnfilteredRefuse. It comes with
	// ErrImageInvalid.
	ErrUnfiltered = errors.New("interface cannot be isolated")
	// ErrNWFilterUnsupported means libvirtd has no nwfilter driver
	// (Debian: libvirt-daemon-driver-nwfilter, or libvirt-daemon
	// before bookworm's split; libvirtd must load it).
	ErrNWFilterUnsupported = errors.New("libvirt's nwfilter driver is not available")
)

// NICKind names an interface's type as libvirt's type attribute does.
func NICKind(iface *libvirtxml.DomainInterface) string {
	s := iface.Source
	if s == nil {
		return "unknown"
	}
	switch {
	case s.User != nil:
		return "user"
	case s.Ethernet != nil:
		return "ethernet"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.Server != nil:
		return "server"
	case s.Client != nil:
		return "client"
	case s.MCast != nil:
		return "mcast"
	case s.Network != nil:
		return "network"
	case s.Bridge != nil:
		return "bridge"
	case s.Internal != nil:
		return "internal"
	case s.Direct != nil:
		return "direct"
	case s.Hostdev != nil:
		return "hostdev"
	case s.UDP != nil:
		return "udp"
	case s.VDPA != nil:
		return "vdpa"
	case s.Null != nil:
		return "null"
	case s.VDS != nil:
		return "vds"
	}
	return "unknown"
}

// Filterable reports whether the guest filter applies to an interface of
// this kind: the bridge-based ones. libvirt's nwfilter also takes type
// 'ethernet' in bridging mode, which the worker cannot tell from here.
func Filterable(kind string) bool { return kind == "bridge" || kind == "network" }

// describeNIC names an image's interface in messages.
func describeNIC(iface *libvirtxml.DomainInterface, i int) string {
	s := fmt.Sprintf("interface %d (type %s", i, NICKind(iface))
	if iface.MAC != nil && iface.MAC.Address != "" {
		s += ", MAC " + iface.MAC.Address
	}
	return s + ")"
}

// compositeFilterName is the filter that holds the guest filter and an
// image's own one, for an interface that already had a filterref.
func compositeFilterName(guest, image string) string {
	return guest + compositeJoiner + image
}

// isolationPlan is what cloneXML needs to isolate a clone's interfaces.
type isolationPlan struct {
	Filter string
	Policy UnfilteredPolicy
}

// isolateInterfaces attaches the guest filter to the bridge-based
// interfaces of d (keeping an image's own filterref inside the composite
// filter, with its parameters), isolates their bridge ports, and reports
// which interfaces stay unfiltered; under UnfilteredRefuse such an
// interface is an error. isolated[i] says interface i got the filter.
func isolateInterfaces(ifaces []libvirtxml.DomainInterface, plan *isolationPlan) (isolated []bool, unfiltered []string, err error) {
	isolated = make([]bool, len(ifaces))
	if plan == nil {
		return isolated, nil, nil
	}
	for i := range ifaces {
		iface := &ifaces[i]
		kind := NICKind(iface)
		if !Filterable(kind) {
			unfiltered = append(unfiltered, describeNIC(iface, i))
			continue
		}
		ref := &libvirtxml.DomainInterfaceFilterRef{Filter: plan.Filter}
		if iface.FilterRef != nil && iface.FilterRef.Filter != "" {
			ref.Filter = compositeFilterName(plan.Filter, iface.FilterRef.Filter)
			ref.Parameters = slices.Clone(iface.FilterRef.Parameters)
		}
		iface.FilterRef = ref
		iface.PortOptions = &libvirtxml.DomainInterfacePortOptions{Isolated: "yes"}
		isolated[i] = true
	}
	if len(unfiltered) > 0 && plan.Policy == UnfilteredRefuse {
		return nil, nil, fmt.Errorf("%s: the guest filter applies to bridge and network interfaces only, and unfiltered interfaces are refused "+
			"(docs/security.md 4): %w: %w", strings.Join(unfiltered, ", "), ErrUnfiltered, ErrImageInvalid)
	}
	return isolated, unfiltered, nil
}

// imageFilterRefs returns the filters that the bridge-based interfaces of
// an image reference themselves.
func imageFilterRefs(d *libvirtxml.Domain) []string {
	if d.Devices == nil {
		return nil
	}
	var refs []string
	for i := range d.Devices.Interfaces {
		iface := &d.Devices.Interfaces[i]
		if Filterable(NICKind(iface)) && iface.FilterRef != nil && iface.FilterRef.Filter != "" && !slices.Contains(refs, iface.FilterRef.Filter) {
			refs = append(refs, iface.FilterRef.Filter)
		}
	}
	return refs
}

func field(s string) libvirtxml.NWFilterField { return libvirtxml.NWFilterField{Str: s} }

// guestFilterXML is the guest filter named name that drops what the
// package comment lists.
func guestFilterXML(name string, deny []Deny) (libvirtxml.NWFilter, error) {
	f := libvirtxml.NWFilter{Name: name, Chain: "root"}
	rule := func(r libvirtxml.NWFilterRule) {
		f.Entries = append(f.Entries, libvirtxml.NWFilterEntry{Rule: &r})
	}
	rule(libvirtxml.NWFilterRule{Action: "drop", Direction: "out", Priority: prioritySpoof,
		MAC: &libvirtxml.NWFilterRuleMAC{Match: "no", NWFilterRuleCommonMAC: libvirtxml.NWFilterRuleCommonMAC{SrcMACAddr: field("$MAC")}}})
	rule(libvirtxml.NWFilterRule{Action: "drop", Direction: "in", Priority: priorityManaged,
		MAC: &libvirtxml.NWFilterRuleMAC{NWFilterRuleCommonMAC: libvirtxml.NWFilterRuleCommonMAC{
			SrcMACAddr: field(ManagedMACPrefix), SrcMACMask: field(ManagedMACMask)}}})
	rule(libvirtxml.NWFilterRule{Action: "drop", Direction: "out", Priority: priorityManaged,
		MAC: &libvirtxml.NWFilterRuleMAC{NWFilterRuleCommonMAC: libvirtxml.NWFilterRuleCommonMAC{
			DstMACAddr: field(ManagedMACPrefix), DstMACMask: field(ManagedMACMask)}}})
	rule(libvirtxml.NWFilterRule{Action: "drop", Direction: "out", Priority: priorityTagged, VLAN: &libvirtxml.NWFilterRuleVLAN{}})
	rule(libvirtxml.NWFilterRule{Action: "drop", Direction: "out", Priority: priorityTagged,
		MAC: &libvirtxml.NWFilterRuleMAC{ProtocolID: field("0x88a8")}})
	for _, d := range deny {
		if !d.Prefix.IsValid() {
			return libvirtxml.NWFilter{}, fmt.Errorf("deny %v: not an address", d)
		}
		p := d.Prefix.Masked()
		addr, bits := field(p.Addr().String()), field(strconv.Itoa(p.Bits()))
		var proto, port libvirtxml.NWFilterField
		if d.Port != 0 {
			proto, port = field("tcp"), field(strconv.Itoa(int(d.Port)))
		}
		r := libvirtxml.NWFilterRule{Action: "drop", Direction: "out", Priority: priorityDeny}
		if p.Addr().Is4() {
			r.IP = &libvirtxml.NWFilterRuleIP{DstIPAddr: addr, DstIPMask: bits, Protocol: proto,
				NWFilterRuleCommonPort: libvirtxml.NWFilterRuleCommonPort{DstPortStart: port}}
		} else {
			r.IPv6 = &libvirtxml.NWFilterRuleIPv6{DstIPAddr: addr, DstIPMask: bits, Protocol: proto,
				NWFilterRuleCommonPort: libvirtxml.NWFilterRuleCommonPort{DstPortStart: port}}
		}
		rule(r)
	}
	return f, nil
}

// compositeFilterXML holds the guest filter and an image's own filter.
func compositeFilterXML(guest, image string) libvirtxml.NWFilter {
	return libvirtxml.NWFilter{Name: compositeFilterName(guest, image), Chain: "root", Entries: []libvirtxml.NWFilterEntry{
		{Ref: &libvirtxml.NWFilterRef{Filter: guest}},
		{Ref: &libvirtxml.NWFilterRef{Filter: image}},
	}}
}

// denyOf reads the Deny destinations back from a guest filter.
func denyOf(f libvirtxml.NWFilter) []Deny {
	var deny []Deny
	for _, e := range f.Entries {
		r := e.Rule
		if r == nil || r.Action != "drop" || r.Direction != "out" || r.Priority != priorityDeny {
			continue
		}
		var addr, bits, port string
		switch {
		case r.IP != nil:
			addr, bits, port = r.IP.DstIPAddr.Str, r.IP.DstIPMask.Str, r.IP.DstPortStart.Str
		case r.IPv6 != nil:
			addr, bits, port = r.IPv6.DstIPAddr.Str, r.IPv6.DstIPMask.Str, r.IPv6.DstPortStart.Str
		default:
			continue
		}
		a, err := netip.ParseAddr(addr)
		if err != nil {
			continue
		}
		n, err := strconv.Atoi(bits)
		if err != nil {
			n = a.BitLen()
		}
		pfx, err := a.Prefix(n)
		if err != nil {
			continue
		}
		d := Deny{Prefix: pfx}
		if port != "" {
			v, err := strconv.ParseUint(port, 0, 16)
			if err != nil {
				continue
			}
			d.Port = uint16(v)
		}
		deny = append(deny, d)
	}
	return deny
}

// isNoNWFilter reports whether err says the filter does not exist.
func isNoNWFilter(err error) bool { return hasCode(err, libvirt.ErrNoNwfilter) }

// nwfilterErr explains a libvirt error of an nwfilter call.
func nwfilterErr(err error) error {
	if hasCode(err, libvirt.ErrNoSupport) {
		return fmt.Errorf("%w: %w", ErrNWFilterUnsupported, err)
	}
	return err
}

// DefineGuestFilter defines the isolation's guest filter, or updates it
// (libvirt then updates the rules of running machines that use it), to
// drop traffic to deny besides what every guest filter drops. It fails
// with ErrNWFilterUnsupported when libvirtd has no nwfilter driver. It
// needs an Isolation in the Options.
func (p *Provisioner) DefineGuestFilter(ctx context.Context, deny []Deny) error {
	if p.opts.Isolation == nil {
		return errors.New("define guest filter: the provisioner has no isolation")
	}
	name := p.opts.Isolation.filter()
	f, err := guestFilterXML(name, deny)
	if err != nil {
		return fmt.Errorf("guest filter %s: %w", name, err)
	}
	if err := p.defineFilter(ctx, f); err != nil {
		return fmt.Errorf("define guest filter %s: %w", name, err)
	}
	return nil
}

// GuestFilterDeny returns the Deny destinations of the isolation's guest
// filter as libvirt holds it, and false if it is not defined.
func (p *Provisioner) GuestFilterDeny(ctx context.Context) ([]Deny, bool, error) {
	if p.opts.Isolation == nil {
		return nil, false, errors.New("guest filter: the provisioner has no isolation")
	}
	name := p.opts.Isolation.filter()
	f, found, err := p.lookupFilter(ctx, name)
	if err != nil || !found {
		return nil, false, err
	}
	return denyOf(f), true, nil
}

// lookupFilter reads the filter name, false if it does not exist.
func (p *Provisioner) lookupFilter(ctx context.Context, name string) (libvirtxml.NWFilter, bool, error) {
	nf, err := call(ctx, p, func() (libvirt.Nwfilter, error) { return p.conn.NwfilterLookupByName(name) })
	if isNoNWFilter(err) {
		return libvirtxml.NWFilter{}, false, nil
	}
	if err != nil {
		return libvirtxml.NWFilter{}, false, fmt.Errorf("look up nwfilter %s: %w", name, nwfilterErr(err))
	}
	doc, err := call(ctx, p, func() (string, error) { return p.conn.NwfilterGetXMLDesc(nf, 0) })
	if err != nil {
		return libvirtxml.NWFilter{}, false, fmt.Errorf("nwfilter %s XML: %w", name, nwfilterErr(err))
	}
	var f libvirtxml.NWFilter
	if err := f.Unmarshal(doc); err != nil {
		return libvirtxml.NWFilter{}, false, fmt.Errorf("parse nwfilter %s XML: %w", name, err)
	}
	return f, true, nil
}

// defineFilter defines f, keeping the UUID of a filter of the same name:
// libvirt refuses to replace it under a new one. Should another process
// define it in between, the define is tried once more with its UUID.
func (p *Provisioner) defineFilter(ctx context.Context, f libvirtxml.NWFilter) error {
	var err error
	for range 2 {
		var nf libvirt.Nwfilter
		nf, err = call(ctx, p, func() (libvirt.Nwfilter, error) { return p.conn.NwfilterLookupByName(f.Name) })
		switch {
		case err == nil:
			f.UUID = formatUUID(nf.UUID)
		case isNoNWFilter(err):
			f.UUID = ""
		default:
			return nwfilterErr(err)
		}
		var doc string
		if doc, err = f.Marshal(); err != nil {
			return fmt.Errorf("encode nwfilter XML: %w", err)
		}
		if _, err = mutate(ctx, p, func() (libvirt.Nwfilter, error) { return p.conn.NwfilterDefineXML(doc) }); err == nil {
			return nil
		}
		if hasCode(err, libvirt.ErrNoSupport) || IsUnavailable(err) {
			break
		}
	}
	return nwfilterErr(err)
}

// ensureCompositeFilters defines, where missing, the composite filters of
// the guest filter with each filter the image's interfaces reference. Their
// content never changes, so an existing one is left as it is.
func (p *Provisioner) ensureCompositeFilters(ctx context.Context, image *libvirtxml.Domain, guest string) error {
	for _, ref := range imageFilterRefs(image) {
		f := compositeFilterXML(guest, ref)
		_, found, err := p.lookupFilter(ctx, f.Name)
		if err != nil {
			return err
		}
		if found {
			continue
		}
		if err := p.defineFilter(ctx, f); err != nil {
			return fmt.Errorf("define nwfilter %s (the guest filter and the image's %s): %w", f.Name, ref, err)
		}
	}
	return nil
}

// NIC is a machine's network interface as guest isolation sees it.
type NIC struct {
	// Kind is the interface type (NICKind): "bridge", "network", "user"...
	Kind string
	// MAC is the interface's address.
	MAC string
	// Filter is the nwfilter the interface references, "" for none.
	Filter string
	// Gateway is, for a user-mode interface, the address at which the
	// guest reaches the host's loopback: 10.0.2.2 unless the interface
	// sets its own IPv4 network (<ip address=... prefix=...>), then the
	// second address of that network, as QEMU's slirp assigns it.
	// Gateway6 is the same for IPv6: fec0::2 by default.
	Gateway, Gateway6 netip.Addr
}

// QEMU's default host addresses inside a user-mode network.
var (
	slirpGateway  = netip.MustParseAddr("10.0.2.2")
	slirpGateway6 = netip.MustParseAddr("fec0::2")
)

// MachineNICs returns the network interfaces of the machine with key.
func (p *Provisioner) MachineNICs(ctx context.Context, key string) ([]NIC, error) {
	name := DomainName(key)
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return nil, fmt.Errorf("machine %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("look up machine %s: %w", name, err)
	}
	doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return nil, fmt.Errorf("machine %s XML: %w", name, err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse machine %s XML: %w", name, err)
	}
	if d.Devices == nil {
		return nil, nil
	}
	nics := make([]NIC, 0, len(d.Devices.Interfaces))
	for i := range d.Devices.Interfaces {
		iface := &d.Devices.Interfaces[i]
		n := NIC{Kind: NICKind(iface)}
		if iface.MAC != nil {
			n.MAC = iface.MAC.Address
		}
		if iface.FilterRef != nil {
			n.Filter = iface.FilterRef.Filter
		}
		if n.Kind == "user" {
			n.Gateway, n.Gateway6 = userGateways(iface.IP)
		}
		nics = append(nics, n)
	}
	return nics, nil
}

// userGateways are the host's addresses in a user-mode network with these
// <ip> settings: the second address of each family's network.
func userGateways(ips []libvirtxml.DomainInterfaceIP) (v4, v6 netip.Addr) {
	v4, v6 = slirpGateway, slirpGateway6
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip.Address)
		if err != nil || ip.Prefix == 0 || int(ip.Prefix) > a.BitLen()-2 {
			continue
		}
		pfx, err := a.Prefix(int(ip.Prefix))
		if err != nil {
			continue
		}
		gw := pfx.Addr().Next().Next()
		if a.Is4() {
			v4 = gw
		} else {
			v6 = gw
		}
	}
	return v4, v6
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Guest isolation (docs/security.md section 4): what guests may not reach,
// computed from the worker's settings, and the guest filter that drops it.

// libvirtd's TCP and TLS ports (libvirtd.conf tcp_port, tls_port).
const (
	libvirtTCPPort = 16509
	libvirtTLSPort = 16514
)

// isolateTarget is one --isolate-from entry: an address, a network or a
// host name, with a TCP port or (0) every protocol.
type isolateTarget struct {
	Host   string
	Prefix netip.Prefix
	Port   uint16
}

func (t isolateTarget) String() string {
	host := t.Host
	if t.Prefix.IsValid() {
		host = provision.Deny{Prefix: t.Prefix}.String()
	}
	if t.Port == 0 {
		return host
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.Itoa(int(t.Port))
}

// parseIsolateTarget reads ADDR, ADDR:PORT, [IPv6]:PORT, CIDR, CIDR:PORT,
// HOST or HOST:PORT.
func parseIsolateTarget(s string) (isolateTarget, error) {
	bad := fmt.Errorf("%q is not ADDR, ADDR:PORT, [IPv6]:PORT, a network ADDR/BITS[:PORT] or HOST[:PORT]", s)
	host, port := s, ""
	if h, p, err := net.SplitHostPort(s); err == nil {
		host, port = h, p
	} else if i := strings.LastIndex(s, ":"); i > 0 && strings.Count(s, ":") == 1 {
		// A network with a port: 192.0.2.0/24:4222.
		host, port = s[:i], s[i+1:]
	}
	var t isolateTarget
	if port != "" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return t, bad
		}
		t.Port = uint16(n)
	}
	if p, err := netip.ParsePrefix(host); err == nil {
		t.Prefix = p.Masked()
		return t, nil
	}
	if a, err := netip.ParseAddr(host); err == nil {
		t.Prefix = netip.PrefixFrom(a.WithZone(""), a.BitLen())
		return t, nil
	}
	if host == "" || strings.ContainsAny(host, "/[]: ") {
		return t, bad
	}
	t.Host = host
	return t, nil
}

// isolateTargets is the list setting --isolate-from.
type isolateTargets []isolateTarget

func (l *isolateTargets) String() string {
	parts := make([]string, len(*l))
	for i, t := range *l {
		parts[i] = t.String()
	}
	return strings.Join(parts, ",")
}

func (l *isolateTargets) reset() { *l = nil }

func (l *isolateTargets) items() []string {
	parts := make([]string, len(*l))
	for i, t := range *l {
		parts[i] = t.String()
	}
	return parts
}

func (l *isolateTargets) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		t, err := parseIsolateTarget(s)
		if err != nil {
			return err
		}
		*l = append(*l, t)
	}
	return nil
}

// isolationSettings are the settings of worker run (and doctor) that
// describe the control plane beyond the NATS URL.
type isolationSettings struct {
	IsolateGuests  bool
	IsolateFrom    isolateTargets
	UnfilteredNICs string
}

func (s *isolationSettings) register(fs *flag.FlagSet) {
	fs.BoolVar(&s.IsolateGuests, "isolate-guests", true, "attach the guest filter to machines' bridge and network interfaces: guests reach neither the control plane nor each other (docs/security.md 4) (STRETCHY_ISOLATE_GUESTS)")
	fs.Var(&s.IsolateFrom, "isolate-from", "more destinations guests may not reach, besides NATS, --http-addr and libvirtd: ADDR, ADDR:PORT, [IPv6]:PORT, ADDR/BITS[:PORT] or HOST[:PORT], comma separated or repeated; without a port every protocol (STRETCHY_ISOLATE_FROM)")
	s.UnfilteredNICs = string(provision.UnfilteredWarn)
	fs.StringVar(&s.UnfilteredNICs, "unfiltered-nics", string(provision.UnfilteredWarn), `what to do with an image's interface the guest filter cannot apply to (user-mode, direct/macvtap, hostdev, ...): "warn" (log it once per image), "refuse" (image_invalid) or "allow" (STRETCHY_UNFILTERED_NICS)`)
}

// validate checks the isolation settings.
func (s *isolationSettings) validate(origin func(string) string) error {
	if !provision.UnfilteredPolicy(s.UnfilteredNICs).Valid() {
		return fmt.Errorf(`--unfiltered-nics %q%s: must be "warn", "refuse" or "allow"`, s.UnfilteredNICs, origin("unfiltered-nics"))
	}
	return nil
}

// controlPlane is what the worker's guests may not reach.
type controlPlane struct {
	// NATSURLs are the NATS servers the worker uses (comma separated URLs).
	NATSURLs string
	// HTTPAddr is --http-addr, "" for none.
	HTTPAddr string
	// LibvirtURI is --libvirt-uri: a remote libvirtd is denied too.
	LibvirtURI string
	// Extra are the --isolate-from entries.
	Extra isolateTargets
}

// resolver is the part of *net.Resolver controlPlane uses.
type resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// deny resolves the control plane into the filter's destinations: each
// NATS server, the metrics endpoint, a remote libvirtd and the extra
// entries at their addresses (host names resolved now), and every port of
// a NATS server, the metrics endpoint and libvirtd (TCP and TLS) on each
// of hostAddrs, the addresses of this host, where a guest reaches any
// service bound to all addresses. An entry on a loopback or unspecified
// address stands for the host's own addresses.
func (cp controlPlane) deny(ctx context.Context, r resolver, hostAddrs []netip.Addr) ([]provision.Deny, error) {
	var out []provision.Deny
	ports := map[uint16]bool{libvirtTCPPort: true, libvirtTLSPort: true}
	add := func(t isolateTarget, hostPort bool) error {
		if hostPort && t.Port != 0 {
			ports[t.Port] = true
		}
		var addrs []netip.Prefix
		if t.Prefix.IsValid() {
			addrs = []netip.Prefix{t.Prefix}
		} else {
			found, err := r.LookupNetIP(ctx, "ip", t.Host)
			if err != nil {
				return fmt.Errorf("resolve %s: %w", t.Host, err)
			}
			for _, a := range found {
				a = a.Unmap().WithZone("")
				addrs = append(addrs, netip.PrefixFrom(a, a.BitLen()))
			}
		}
		for _, p := range addrs {
			if a := p.Addr(); p.IsSingleIP() && (a.IsLoopback() || a.IsUnspecified()) {
				for _, h := range hostAddrs {
					out = append(out, provision.Deny{Prefix: netip.PrefixFrom(h, h.BitLen()), Port: t.Port})
				}
				if a.IsUnspecified() {
					continue
				}
			}
			out = append(out, provision.Deny{Prefix: p, Port: t.Port})
		}
		return nil
	}
	var errs []error
	for _, u := range strings.Split(cp.NATSURLs, ",") {
		if u = strings.TrimSpace(u); u == "" {
			continue
		}
		t, err := urlTarget(u, 4222)
		if err == nil {
			err = add(t, true)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("NATS URL %s: %w", redactURL(u), err))
		}
	}
	if cp.HTTPAddr != "" {
		t, err := httpTarget(cp.HTTPAddr)
		if err == nil {
			err = add(t, true)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("--http-addr %s: %w", cp.HTTPAddr, err))
		}
	}
	if t, ok := remoteLibvirt(cp.LibvirtURI); ok {
		if err := add(t, false); err != nil {
			errs = append(errs, fmt.Errorf("--libvirt-uri: %w", err))
		}
	}
	for _, t := range cp.Extra {
		if err := add(t, false); err != nil {
			errs = append(errs, fmt.Errorf("--isolate-from %s: %w", t, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	for port := range ports {
		for _, h := range hostAddrs {
			out = append(out, provision.Deny{Prefix: netip.PrefixFrom(h, h.BitLen()), Port: port})
		}
	}
	return sortDeny(out), nil
}

// sortDeny sorts and deduplicates.
func sortDeny(d []provision.Deny) []provision.Deny {
	slices.SortFunc(d, func(a, b provision.Deny) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		if c := a.Prefix.Bits() - b.Prefix.Bits(); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return slices.Compact(d)
}

// urlTarget is the host and port of a URL such as nats://h:4222 or h:4222.
func urlTarget(s string, defaultPort uint16) (isolateTarget, error) {
	if !strings.Contains(s, "://") {
		s = "nats://" + s
	}
	u, err := url.Parse(s)
	if err != nil || u.Hostname() == "" {
		return isolateTarget{}, errors.New("no host in the URL")
	}
	port := defaultPort
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return isolateTarget{}, fmt.Errorf("port %q", p)
		}
		port = uint16(n)
	}
	t, err := parseIsolateTarget(u.Hostname())
	if err != nil {
		return isolateTarget{}, err
	}
	t.Port = port
	return t, nil
}

// httpTarget is the address --http-addr listens on; an empty host is
// every address.
func httpTarget(addr string) (isolateTarget, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return isolateTarget{}, err
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return isolateTarget{}, fmt.Errorf("port %q", p)
	}
	if h == "" {
		h = "0.0.0.0"
	}
	t, err := parseIsolateTarget(h)
	t.Port = uint16(n)
	return t, err
}

// libvirtLocal reports whether uri names a libvirtd on this host, whose
// firewall tools the worker can look for.
func libvirtLocal(uri string) bool {
	u, err := url.Parse(uri)
	if err != nil {
		return false
	}
	_, transport, _ := strings.Cut(u.Scheme, "+")
	return transport == "unix" || (transport == "" && u.Host == "")
}

// remoteLibvirt is the libvirtd a remote --libvirt-uri names.
func remoteLibvirt(uri string) (isolateTarget, bool) {
	u, err := url.Parse(uri)
	if err != nil || u.Hostname() == "" {
		return isolateTarget{}, false
	}
	_, transport, _ := strings.Cut(u.Scheme, "+")
	port := map[string]uint16{"": libvirtTLSPort, "tls": libvirtTLSPort, "tcp": libvirtTCPPort, "ssh": 22, "libssh": 22, "libssh2": 22}[transport]
	if port == 0 {
		return isolateTarget{}, false
	}
	t, err := urlTarget("x://"+u.Host, port)
	return t, err == nil
}

// hostAddrs returns the addresses of this host's interfaces.
func hostAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("this host's addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		if ip, ok := netip.AddrFromSlice(n.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// firewallTools are the programs libvirt's nwfilter driver runs on the
// libvirt host (Debian: package iptables, which brings ebtables-nft too).
var firewallTools = []string{"ebtables", "iptables", "ip6tables"}

// missingFirewallTools returns those of firewallTools that are on neither
// PATH nor /usr/sbin and /sbin.
func missingFirewallTools() []string {
	var missing []string
	for _, tool := range firewallTools {
		if _, err := exec.LookPath(tool); err == nil {
			continue
		}
		found := false
		for _, dir := range []string{"/usr/sbin", "/sbin"} {
			if fi, err := os.Stat(filepath.Join(dir, tool)); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, tool)
		}
	}
	return missing
}

// testDriver reports whether uri names libvirt's test driver, which has
// neither guests nor an nwfilter driver.
func testDriver(uri string) bool {
	u, err := url.Parse(uri)
	if err != nil {
		return false
	}
	driver, _, _ := strings.Cut(u.Scheme, "+")
	return driver == "test"
}

// guestIsolation is the Isolation of worker run's provisioner: nil with
// --isolate-guests=false and on libvirt's test driver. Under "warn" it
// logs each image with unfiltered interfaces once.
func guestIsolation(cfg Config, log *slog.Logger) *provision.Isolation {
	if !cfg.Isolation.IsolateGuests || testDriver(cfg.LibvirtURI) {
		return nil
	}
	var warned sync.Map
	return &provision.Isolation{
		Filter:     provision.GuestFilterName(cfg.Host),
		Unfiltered: provision.UnfilteredPolicy(cfg.Isolation.UnfilteredNICs),
		Warn: func(image string, nics []string) {
			if _, seen := warned.LoadOrStore(image, true); seen {
				return
			}
			log.Warn("image has interfaces the guest filter cannot isolate: its guests may reach the control plane and each other (docs/security.md 4.3); "+
				"use a bridge or network interface, or --unfiltered-nics=refuse", "image", image, "interfaces", strings.Join(nics, "; "))
		},
	}
}

// startIsolation defines the guest filter at start when iso is set, and
// says why guests are not isolated otherwise.
func startIsolation(ctx context.Context, p *provision.Provisioner, iso *provision.Isolation, cfg Config, natsURL string, log *slog.Logger) error {
	switch {
	case iso != nil:
		cp := controlPlane{NATSURLs: natsURL, HTTPAddr: cfg.HTTPAddr, LibvirtURI: cfg.LibvirtURI, Extra: cfg.Isolation.IsolateFrom}
		return defineGuestFilter(ctx, p, cp, iso.Filter, log)
	case cfg.Isolation.IsolateGuests:
		log.Info("libvirt's test driver has no guest networks: no guest filter", "libvirt_uri", cfg.LibvirtURI)
	default:
		log.Warn("guest isolation is off (--isolate-guests=false): guests on bridges and networks may reach the control plane and each other")
	}
	return nil
}

// defineGuestFilter defines the guest filter with the control plane of
// worker run, once at start. Where libvirtd runs on this host, the
// firewall tools it needs are checked first.
func defineGuestFilter(ctx context.Context, p *provision.Provisioner, cp controlPlane, filter string, log *slog.Logger) error {
	if libvirtLocal(cp.LibvirtURI) {
		if missing := missingFirewallTools(); len(missing) > 0 {
			return fmt.Errorf("--isolate-guests: %s missing on this host; libvirt's nwfilter needs them to filter guests "+
				"(Debian: apt-get install iptables, which brings ebtables-nft; or go tool task libvirt:up), or turn isolation off with --isolate-guests=false",
				strings.Join(missing, ", "))
		}
	}
	addrs, err := hostAddrs()
	if err != nil {
		return fmt.Errorf("--isolate-guests: %w", err)
	}
	deny, err := cp.deny(ctx, net.DefaultResolver, addrs)
	if err != nil {
		return fmt.Errorf("--isolate-guests: %w", err)
	}
	if err := p.DefineGuestFilter(ctx, deny); err != nil {
		if errors.Is(err, provision.ErrNWFilterUnsupported) {
			return fmt.Errorf("--isolate-guests: %w; install and load libvirt's nwfilter driver (Debian: libvirt-daemon-driver-nwfilter or libvirt-daemon, "+
				"then restart libvirtd), or turn isolation off with --isolate-guests=false", err)
		}
		return fmt.Errorf("--isolate-guests: %w", err)
	}
	items := make([]string, len(deny))
	for i, d := range deny {
		items[i] = d.String()
	}
	log.Info("guest filter defined: guests of bridge and network interfaces reach neither each other nor these",
		"filter", filter, "deny", strings.Join(items, ","))
	return nil
}

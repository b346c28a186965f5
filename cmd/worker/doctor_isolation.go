package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// The isolation checks of worker doctor --boot (docs/security.md 4.5):
// which interfaces of the probe machine the guest filter covers
// (boot.nics), and, from inside the guest, whether any address of the
// control plane answers (boot.isolation).

// probeTimeout bounds one connection attempt from inside the guest.
const probeTimeout = 3 * time.Second

// doctorIsolation holds doctor's view of the control plane, set as for
// worker run, and what it found of the worker's guest filter.
type doctorIsolation struct {
	IsolateFrom isolateTargets
	HTTPAddr    string
	NATSPort    int

	// envErr is why STRETCHY_ISOLATE_FROM could not be read.
	envErr error
	// filterDeny is what the guest filter on libvirtd denies; filterFound
	// says it is defined; filterErr why it could not be read.
	filterDeny  []provision.Deny
	filterFound bool
	filterErr   error
}

func (di *doctorIsolation) register(fs *flag.FlagSet) {
	if v := envString("STRETCHY_ISOLATE_FROM", ""); v != "" {
		if err := di.IsolateFrom.Set(v); err != nil {
			di.envErr = fmt.Errorf("STRETCHY_ISOLATE_FROM=%q: %w", v, err)
		}
	}
	fs.Var(&di.IsolateFrom, "isolate-from", "--boot: more control-plane destinations to probe from inside the guest, as for worker run (STRETCHY_ISOLATE_FROM)")
	fs.StringVar(&di.HTTPAddr, "http-addr", envString("STRETCHY_HTTP_ADDR", ""), "--boot: the worker's metrics address, probed from inside the guest (STRETCHY_HTTP_ADDR)")
	port, err := strconv.Atoi(envString("STRETCHY_NATS_PORT", "4222"))
	if err != nil {
		port = 4222
	}
	fs.IntVar(&di.NATSPort, "nats-port", port, "--boot: without --nats-url, the port of the worker's embedded NATS server on 127.0.0.1, probed from inside the guest (STRETCHY_NATS_PORT)")
}

// guestFilterProvisioner returns the provisioner for the boot check:
// with the worker's guest filter where libvirtd has it, so that the probe
// machine is filtered as the worker's machines are.
func (d *doctor) guestFilterProvisioner(ctx context.Context, link *provision.Link) *provision.Provisioner {
	opts := provision.Options{DomainType: d.cfg.DomainType, Link: link}
	if !d.cfg.Boot {
		return provision.New(link.Libvirt(), opts)
	}
	iso := &provision.Isolation{Filter: provision.GuestFilterName(d.cfg.Host), Unfiltered: provision.UnfilteredAllow}
	cctx, cancel := context.WithTimeout(ctx, doctorCallTimeout)
	defer cancel()
	di := &d.cfg.Isolation
	di.filterDeny, di.filterFound, di.filterErr = provision.New(link.Libvirt(), provision.Options{Link: link, Isolation: iso}).GuestFilterDeny(cctx)
	if di.filterFound {
		opts.Isolation = iso
	}
	return provision.New(link.Libvirt(), opts)
}

// probeTarget is one address and port a guest tries to connect to.
type probeTarget struct {
	// Addr and Port as the guest sees them.
	Addr netip.Addr
	Port uint16
	// Host is what it stands for on the host, when that differs (the
	// host's loopback behind a user-mode gateway).
	Host string
}

func (p probeTarget) String() string {
	s := netip.AddrPortFrom(p.Addr, p.Port).String()
	if p.Host != "" {
		s += " (the host's " + p.Host + ")"
	}
	return s
}

// probeTargets returns what a guest with these interfaces would use to
// reach each destination of deny that names one address and a port: a
// bridged guest the address itself (not loopback, which is its own), a
// user-mode guest the same, and its gateways (10.0.2.2, fec0::2) for the
// host's loopback.
// IPv6 link-local addresses, which need a zone, are left out.
func probeTargets(nics []provision.NIC, deny []provision.Deny) []probeTarget {
	var out []probeTarget
	seen := map[netip.AddrPort]bool{}
	add := func(t probeTarget) {
		if k := netip.AddrPortFrom(t.Addr, t.Port); !seen[k] {
			seen[k] = true
			out = append(out, t)
		}
	}
	for _, nic := range nics {
		for _, d := range deny {
			a := d.Prefix.Addr()
			if !d.Prefix.IsSingleIP() || d.Port == 0 || a.IsLinkLocalUnicast() || a.IsUnspecified() {
				continue
			}
			switch {
			case !a.IsLoopback():
				add(probeTarget{Addr: a, Port: d.Port})
			case nic.Kind == "user" && a.Is4() && nic.Gateway.IsValid():
				add(probeTarget{Addr: nic.Gateway, Port: d.Port, Host: netip.AddrPortFrom(a, d.Port).String()})
			case nic.Kind == "user" && a.Is6() && nic.Gateway6.IsValid():
				add(probeTarget{Addr: nic.Gateway6, Port: d.Port, Host: netip.AddrPortFrom(a, d.Port).String()})
			}
		}
	}
	slices.SortFunc(out, func(a, b probeTarget) int {
		if c := a.Addr.Compare(b.Addr); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return out
}

// posixProbe connects to each ADDR PORT pair of its arguments at once
// and prints "ADDR PORT RESULT" per pair: connected, refused, timeout,
// unreachable, untested (neither nc nor bash), or error and what the tool
// said. The arguments are passed as such, never spliced into the script.
const posixProbe = `w=$0
probe() {
  if command -v nc >/dev/null 2>&1; then
    if command -v timeout >/dev/null 2>&1; then
      err=$(timeout $((w + 2)) nc -w "$w" "$1" "$2" </dev/null 2>&1 >/dev/null); rc=$?
    else
      err=$(nc -w "$w" "$1" "$2" </dev/null 2>&1 >/dev/null); rc=$?
    fi
    case "$rc:$err" in
      *refused*) r=refused ;;
      *"timed out"*|*"in progress"*) r=timeout ;;
      *nreachable*|*"No route"*) r=unreachable ;;
      0:*|124:*|143:*) r=connected ;;
      *) r="error $(printf %s "$err" | tr -s '\n\t' '  ' | cut -c1-80)" ;;
    esac
  elif command -v bash >/dev/null 2>&1; then
    err=$(timeout $((w + 2)) bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>&1); rc=$?
    case "$rc:$err" in
      0:*) r=connected ;;
      124:*) r=timeout ;;
      *refused*) r=refused ;;
      *nreachable*|*"No route"*) r=unreachable ;;
      *) r="error $(printf %s "$err" | tr -s '\n\t' '  ' | cut -c1-80)" ;;
    esac
  else
    r=untested
  fi
  echo "$1 $2 $r"
}
while [ $# -ge 2 ]; do probe "$1" "$2" & shift 2; done
wait`

// windowsProbe is posixProbe for Windows PowerShell; the targets are
// addresses and ports the worker formatted, spliced in as literals.
func windowsProbe(targets []probeTarget) string {
	var list []string
	for _, t := range targets {
		list = append(list, fmt.Sprintf("@('%s',%d)", t.Addr, t.Port))
	}
	return `$ErrorActionPreference = 'Continue'
foreach ($t in @(` + strings.Join(list, ",") + `)) {
  $c = New-Object System.Net.Sockets.TcpClient
  try {
    $a = $c.BeginConnect($t[0], $t[1], $null, $null)
    if (-not $a.AsyncWaitHandle.WaitOne(` + strconv.Itoa(int(probeTimeout.Milliseconds())) + `)) { $r = 'timeout' }
    else {
      try { $c.EndConnect($a); $r = 'connected' }
      catch {
        $e = $_.Exception; while ($e.InnerException) { $e = $e.InnerException }
        switch ([string]$e.SocketErrorCode) {
          'ConnectionRefused' { $r = 'refused' }
          'NetworkUnreachable' { $r = 'unreachable' }
          'HostUnreachable' { $r = 'unreachable' }
          'TimedOut' { $r = 'timeout' }
          default { $r = 'error ' + $e.Message }
        }
      }
    }
  } finally { $c.Close() }
  Write-Output ('{0} {1} {2}' -f $t[0], $t[1], $r)
}`
}

// probeResult is what the guest said of one target.
type probeResult struct {
	Target probeTarget
	Result string
}

// parseProbe reads the probe's lines for the known targets only: the
// guest's output is not trusted to name anything else.
func parseProbe(out []byte, targets []probeTarget) []probeResult {
	got := map[netip.AddrPort]string{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		a, err1 := netip.ParseAddr(f[0])
		p, err2 := strconv.ParseUint(f[1], 10, 16)
		if err1 != nil || err2 != nil {
			continue
		}
		got[netip.AddrPortFrom(a, uint16(p))] = clip(strings.Join(f[2:], " "))
	}
	res := make([]probeResult, 0, len(targets))
	for _, t := range targets {
		r, ok := got[netip.AddrPortFrom(t.Addr, t.Port)]
		if !ok {
			r = "no answer from the probe"
		}
		res = append(res, probeResult{t, r})
	}
	return res
}

// doctorControlPlane is the control plane as doctor's settings describe
// it, like worker run's.
func (d *doctor) doctorControlPlane() controlPlane {
	urls := d.cfg.NATSURL
	if urls == "" {
		urls = "nats://127.0.0.1:" + strconv.Itoa(d.cfg.Isolation.NATSPort)
	}
	return controlPlane{NATSURLs: urls, HTTPAddr: d.cfg.Isolation.HTTPAddr, LibvirtURI: d.cfg.LibvirtURI, Extra: d.cfg.Isolation.IsolateFrom}
}

// checkIsolation reports which of the machine's interfaces the guest
// filter covers and probes the control plane from inside its guest.
func (d *doctor) checkIsolation(ctx context.Context, p *provision.Provisioner, agent *qga.Agent, image, job string, osFamily runners.OS) {
	di := d.cfg.Isolation
	nics, err := p.MachineNICs(ctx, job)
	if err != nil {
		d.add(warn("boot.nics", image, "run doctor again", "%v", err))
		return
	}
	d.checkNICs(image, nics)

	addrs, err := hostAddrs()
	var deny []provision.Deny
	if err == nil {
		err = di.envErr
	}
	if err == nil {
		deny, err = d.doctorControlPlane().deny(ctx, net.DefaultResolver, addrs)
	}
	if err != nil {
		d.add(warn("boot.isolation", image, "fix --nats-url, --http-addr or --isolate-from", "control plane: %v", err))
		return
	}
	deny = sortDeny(append(deny, di.filterDeny...))
	targets := probeTargets(nics, deny)
	if len(targets) == 0 {
		d.add(ok("boot.isolation", image, "no control-plane address to probe from interfaces %s", nicKinds(nics)))
		return
	}
	req := qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", posixProbe, strconv.Itoa(int(probeTimeout.Seconds()))}, Capture: true}
	for _, t := range targets {
		req.Args = append(req.Args, t.Addr.String(), strconv.Itoa(int(t.Port)))
	}
	if osFamily == runners.Windows {
		req = qga.ExecRequest{Path: windowsPowerShell, Capture: true, Args: []string{"-NoProfile", "-NonInteractive", "-Command", windowsProbe(targets)}}
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute+time.Duration(len(targets))*probeTimeout)
	defer cancel()
	start := time.Now()
	st, err := agent.Run(rctx, provision.DomainName(job), req)
	if err != nil {
		d.add(warn("boot.isolation", image, "the guest needs /bin/sh with nc or bash (Windows: PowerShell) for this check",
			"could not probe the control plane from inside the guest: %v", err).took(time.Since(start)))
		return
	}
	results := parseProbe(st.Stdout, targets)
	var connected, untested []string
	counts := map[string]int{}
	for _, r := range results {
		switch {
		case r.Result == "connected":
			connected = append(connected, r.Target.String())
		case r.Result == "untested" || strings.HasPrefix(r.Result, "no answer"):
			untested = append(untested, r.Target.String())
		}
		key, _, _ := strings.Cut(r.Result, " ")
		counts[key]++
	}
	summary := probeSummary(results)
	took := time.Since(start)
	switch {
	case len(connected) > 0:
		d.add(fail("boot.isolation", image, isolationHint(nics, di.filterFound, provision.GuestFilterName(d.cfg.Host)),
			"from inside the guest, %s answered (%d of %d probed: %s)", strings.Join(connected, ", "), len(connected), len(results), summary).took(took))
	case len(untested) == len(results):
		d.add(warn("boot.isolation", image, "install nc (netcat) or bash in the image, or probe by hand (docs/security.md 4.5)",
			"could not probe from inside the guest: it has neither nc nor bash").took(took))
	case counts["unreachable"] == len(results):
		d.add(warn("boot.isolation", image, "give the image a network setup (DHCP) as its jobs will have it; the check then shows what they reach",
			"every one of %d control-plane addresses is unreachable from inside the guest: it has no network configured, so this proves nothing", len(results)).took(took))
	default:
		d.add(ok("boot.isolation", image, "no control-plane address answered from inside the guest (%d probed: %s)", len(results), summary).took(took))
	}
}

// checkNICs says which interfaces the guest filter covers.
func (d *doctor) checkNICs(image string, nics []provision.NIC) {
	di := d.cfg.Isolation
	var unfiltered, filtered []string
	for i, n := range nics {
		desc := fmt.Sprintf("interface %d (%s)", i, n.Kind)
		if provision.Filterable(n.Kind) {
			filtered = append(filtered, desc)
		} else {
			unfiltered = append(unfiltered, desc)
		}
	}
	switch {
	case len(nics) == 0:
		d.add(ok("boot.nics", image, "no network interfaces"))
	case len(unfiltered) > 0:
		d.add(warn("boot.nics", image, "the guest filter applies to bridge and network interfaces only; a user-mode guest reaches the host's loopback "+
			"through its gateway (10.0.2.2) and whatever the host reaches (docs/security.md 4.3): give the image a bridge or network interface, "+
			"or keep every service of the host authenticated; worker run --unfiltered-nics=refuse refuses such images",
			"%s: not covered by the guest filter", strings.Join(unfiltered, ", ")))
	case di.filterErr != nil:
		d.add(warn("boot.nics", image, "check libvirt's nwfilter driver: virsh nwfilter-list", "%s: the guest filter cannot be read: %v", strings.Join(filtered, ", "), di.filterErr))
	case !di.filterFound:
		d.add(warn("boot.nics", image, "start worker run on this host once (isolation is on by default), then run doctor again",
			"%s: libvirt has no guest filter %s yet, so this machine ran unfiltered", strings.Join(filtered, ", "), provision.GuestFilterName(d.cfg.Host)))
	default:
		d.add(ok("boot.nics", image, "%s: guest filter %s attached", strings.Join(filtered, ", "), provision.GuestFilterName(d.cfg.Host)))
	}
}

func isolationHint(nics []provision.NIC, filterFound bool, filter string) string {
	for _, n := range nics {
		if n.Kind == "user" {
			return "a user-mode (slirp) guest reaches the host's loopback through 10.0.2.2 and whatever the host reaches; no filter applies " +
				"(docs/security.md 4.3): give the image a bridge or network interface, or make these services require authentication"
		}
	}
	if !filterFound {
		return "start worker run on this host (isolation is on by default), which defines the guest filter " + filter + ", then run doctor again"
	}
	return "the guest filter did not stop it: check worker run's --isolate-from, that its machines' interfaces reference " +
		filter + " (virsh dumpxml), and libvirtd's log for nwfilter errors (docs/security.md 4)"
}

// probeSummary groups the probed targets by result: "3 refused (a, b,
// c); 1 timeout (d)".
func probeSummary(results []probeResult) string {
	byResult := map[string][]string{}
	for _, r := range results {
		byResult[r.Result] = append(byResult[r.Result], r.Target.String())
	}
	keys := make([]string, 0, len(byResult))
	for k := range byResult {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%d %s (%s)", len(byResult[k]), k, strings.Join(byResult[k], ", "))
	}
	return strings.Join(parts, "; ")
}

func nicKinds(nics []provision.NIC) string {
	kinds := make([]string, len(nics))
	for i, n := range nics {
		kinds[i] = n.Kind
	}
	if len(kinds) == 0 {
		return "(none)"
	}
	return strings.Join(kinds, ", ")
}

package provision

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/sourcegraph/conc"
)

// EventConn is the connection Watch receives libvirt's domain events on.
// *libvirt.Libvirt implements it.
type EventConn interface {
	SubscribeEvents(ctx context.Context, eventID libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan any, error)
	Disconnect() error
}

// DefaultCheckInterval is how often Watch compares its view with libvirt
// in full.
const DefaultCheckInterval = 30 * time.Second

// WatchOptions configure Watch.
type WatchOptions struct {
	// Events dials the connection that domain events arrive on: one of
	// Watch's own, as go-libvirt ends a subscription with a call from a
	// goroutine of its own that must not race with a Link reconnecting
	// the Provisioner's connection. Nil means no events: only the
	// Provisioner's own changes and the full checks keep the view, which
	// is right only where nothing else changes the host's domains
	// (libvirt's test driver, whose connections each have a state of
	// their own).
	Events func(ctx context.Context) (EventConn, error)
	// CheckInterval is how often the whole view is compared with
	// libvirt; 0 means DefaultCheckInterval. A volume another program
	// creates is seen at the next check, or by the Remove that would
	// delete what it uses.
	CheckInterval time.Duration
	// OnCheck, when set, is told of each full check's outcome (err nil:
	// the view is current).
	OnCheck func(err error)
	// OnSharedMAC, when set, is told of each MAC address that a full
	// check finds on more than one domain, one of them managed (sorted
	// names). Clone picks addresses no domain in the view has, and the
	// view misses a domain only for the moment its events take to
	// arrive (as a scan missed one defined between the scan and the
	// define), so this is what is left to catch: libvirt does not
	// refuse a definition whose MAC another domain has.
	OnSharedMAC func(mac string, domains []string)
}

// watchEvents are the domain events that can change what the view keeps
// of a domain: defined, undefined, started, stopped (lifecycle), and
// devices plugged in or out while it runs.
var watchEvents = []libvirt.DomainEventID{
	libvirt.DomainEventIDLifecycle, libvirt.DomainEventIDDeviceAdded, libvirt.DomainEventIDDeviceRemoved,
}

// Watch keeps the Provisioner's view of the host's domains and volumes
// current (hostView) until ctx ends, and returns ctx's error. Clone and
// Remove use the view while Watch runs and it is current, and scan the
// host otherwise. Run it once per Provisioner.
func (p *Provisioner) Watch(ctx context.Context, o WatchOptions) error {
	if o.CheckInterval <= 0 {
		o.CheckInterval = DefaultCheckInterval
	}
	defer p.view.setCurrent(false)
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := p.watch(ctx, o)
		if ctx.Err() != nil {
			break
		}
		if err == nil {
			delay = 100 * time.Millisecond
			continue
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		delay = min(2*delay, 10*time.Second)
	}
	return ctx.Err()
}

// watch runs one events connection: it subscribes, checks the view in
// full, and then reads the domains events name and checks again at every
// interval, until the connection drops (nil) or something fails.
func (p *Provisioner) watch(ctx context.Context, o WatchOptions) error {
	p.view.setCurrent(false)
	events := make(chan any)
	// dropped is signalled when a subscription ends: the connection is
	// gone, and events may be missed from now on.
	dropped := make(chan struct{}, 1)
	if o.Events != nil {
		l, err := o.Events(ctx)
		if err != nil {
			return fmt.Errorf("connect for domain events: %w", err)
		}
		var subs []<-chan any
		for _, id := range watchEvents {
			// The subscription's context never ends: the connection ends
			// it, which closes its channel.
			ch, err := l.SubscribeEvents(context.Background(), id, libvirt.OptDomain{})
			if err != nil {
				_ = l.Disconnect()
				return fmt.Errorf("subscribe to domain events: %w", err)
			}
			subs = append(subs, ch)
		}
		stop := make(chan struct{})
		var fwd conc.WaitGroup
		for _, ch := range subs {
			fwd.Go(func() {
				for ev := range ch {
					select {
					case events <- ev:
					case <-stop: // dropped until the channel closes
					}
				}
				select {
				case dropped <- struct{}{}:
				default:
				}
			})
		}
		defer func() {
			close(stop)
			_ = l.Disconnect()
			fwd.Wait()
		}()
	}
	// Subscribed first, checked then: a change in between is in both.
	if err := p.checkView(ctx, o); err != nil {
		return err
	}
	tick := time.NewTicker(o.CheckInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-dropped:
			return nil // subscribe again
		case <-tick.C:
			if err := p.checkView(ctx, o); err != nil {
				return err
			}
		case <-p.view.stale:
			if err := p.checkView(ctx, o); err != nil {
				return err
			}
		case ev := <-events:
			// Events come in bursts (defined, started; many domains at
			// once): each domain is read once per burst.
			names := map[string]bool{}
			for more := true; more; {
				if name := eventDomain(ev); name != "" {
					names[name] = true
				}
				select {
				case ev = <-events:
				default:
					more = false
				}
			}
			for name := range names {
				if err := p.readDomainView(ctx, name); err != nil {
					p.view.invalidate()
				}
			}
		}
	}
}

// eventDomain returns the name of the domain a domain event is about.
func eventDomain(ev any) string {
	switch e := ev.(type) {
	case *libvirt.DomainEventCallbackLifecycleMsg:
		return e.Msg.Dom.Name
	case *libvirt.DomainEventCallbackDeviceAddedMsg:
		return e.Dom.Name
	case *libvirt.DomainEventCallbackDeviceRemovedMsg:
		return e.Msg.Dom.Name
	}
	return ""
}

// checkView reads every domain and every volume of the active pools and
// replaces the view with what it found; the view is current once that
// succeeded.
func (p *Provisioner) checkView(ctx context.Context, o WatchOptions) (err error) {
	defer func() {
		if o.OnCheck != nil {
			o.OnCheck(err)
		}
	}()
	n := p.view.begin()
	defer p.view.end(n)
	doms, err := p.listDomains(ctx)
	if err != nil {
		return fmt.Errorf("check the host view: %w", err)
	}
	domains := make(map[string][]domainFacts, len(doms))
	for _, dom := range doms {
		facts, found, err := p.domainFactsOf(ctx, dom)
		if err != nil {
			return fmt.Errorf("check the host view: %w", err)
		}
		if found {
			domains[dom.Name] = facts
		}
	}
	var volumes []viewVolume
	pools, err := p.activePools(ctx)
	if err != nil {
		return fmt.Errorf("check the host view: %w", err)
	}
	for _, pool := range pools {
		vols, err := call(ctx, p, func() ([]libvirt.StorageVol, error) {
			vols, _, err := p.conn.StoragePoolListAllVolumes(pool, 1, 0)
			return vols, err
		})
		if isNoStoragePool(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("check the host view: list volumes of pool %s: %w", pool.Name, err)
		}
		for _, vol := range vols {
			e, found, err := p.volumeFactsOf(ctx, vol)
			if err != nil {
				return fmt.Errorf("check the host view: %w", err)
			}
			if found {
				volumes = append(volumes, e)
			}
		}
	}
	p.view.replace(n, domains, volumes)
	p.view.setCurrent(true)
	if o.OnSharedMAC != nil {
		for mac, names := range sharedMACs(domains) {
			o.OnSharedMAC(mac, names)
		}
	}
	return nil
}

// sharedMACs returns the MAC addresses that more than one of domains
// has, at least one of them managed, with the domains' sorted names.
func sharedMACs(domains map[string][]domainFacts) map[string][]string {
	by := map[string]map[string]bool{}
	for name, facts := range domains {
		for _, f := range facts {
			for _, mac := range f.macs {
				if by[mac] == nil {
					by[mac] = map[string]bool{}
				}
				by[mac][name] = true
			}
		}
	}
	out := map[string][]string{}
	for mac, names := range by {
		if len(names) < 2 {
			continue
		}
		list := slices.Sorted(maps.Keys(names))
		if slices.ContainsFunc(list, func(n string) bool { return strings.HasPrefix(n, Prefix) && n != Prefix }) {
			out[mac] = list
		}
	}
	return out
}

// readDomainView reads domain name again into the view.
func (p *Provisioner) readDomainView(ctx context.Context, name string) error {
	n := p.view.begin()
	defer p.view.end(n)
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		p.view.readDomain(n, name, nil, false)
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up domain %s: %w", name, err)
	}
	facts, found, err := p.domainFactsOf(ctx, dom)
	if err != nil {
		return err
	}
	p.view.readDomain(n, name, facts, found)
	return nil
}

// domainFactsOf reads what dom's persistent definition and, while it
// runs, its live one say; found is false when it is gone meanwhile.
func (p *Provisioner) domainFactsOf(ctx context.Context, dom libvirt.Domain) ([]domainFacts, bool, error) {
	flags := []libvirt.DomainXMLFlags{libvirt.DomainXMLInactive}
	if dom.ID > 0 {
		flags = append(flags, 0)
	}
	var facts []domainFacts
	for _, f := range flags {
		doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, f) })
		if isNoDomain(err) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("domain %s XML: %w", dom.Name, err)
		}
		def, err := p.domains.get(doc, parseDomainFacts)
		if err != nil {
			return nil, false, fmt.Errorf("parse domain %s XML: %w", dom.Name, err)
		}
		facts = append(facts, def)
	}
	return facts, true, nil
}

// volumeFactsOf reads a volume's path and backing store; found is false
// when it is gone meanwhile.
func (p *Provisioner) volumeFactsOf(ctx context.Context, vol libvirt.StorageVol) (viewVolume, bool, error) {
	doc, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetXMLDesc(vol, 0) })
	if isNoStorageVol(err) {
		return viewVolume{}, false, nil
	}
	if err != nil {
		return viewVolume{}, false, fmt.Errorf("volume %s/%s XML: %w", vol.Pool, vol.Name, err)
	}
	f, err := p.volumes.get(doc, parseVolumeFacts)
	if err != nil {
		return viewVolume{}, false, fmt.Errorf("parse volume %s/%s XML: %w", vol.Pool, vol.Name, err)
	}
	path := f.path
	if path == "" {
		if path, err = call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) }); isNoStorageVol(err) {
			return viewVolume{}, false, nil
		} else if err != nil {
			return viewVolume{}, false, fmt.Errorf("path of volume %s/%s: %w", vol.Pool, vol.Name, err)
		}
	}
	return viewVolume{vol: vol, path: path, backing: f.backing}, true, nil
}

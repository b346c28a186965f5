package provision

import (
	"sync"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// hostView is what the Provisioner knows of the host's domains and
// volumes between its calls: the MAC addresses, disks, backing chains and
// NVRAM files of every domain, and the backing store of every volume in an
// active pool. Clone and Remove read it instead of asking libvirtd about
// every other domain and volume on each call, so that a job's cost does
// not grow with the machines on the host.
//
// Three things keep it current. The Provisioner's own calls write what
// they did (a volume created or deleted, a domain defined or undefined) as
// they do it. Watch reads again each domain that libvirt's domain events
// name, which covers domains other programs define, start, change or
// remove. And Watch compares the whole view with libvirt now and then (a
// full check), which is the only way volumes created or deleted by others
// are seen: libvirt has no volume events, and go-libvirt does not deliver
// its storage pool events. Remove also lists, once per call, the volumes
// of the pools it is about to delete from, so that a volume another
// program made through libvirt since the last check is seen before
// anything is deleted.
//
// Until Watch has made a full check while it receives events (or after a
// call whose outcome is unknown: a timeout, a lost connection), the view
// is not current and the Provisioner scans the host as it did without one.
//
// Reads from libvirt race with the Provisioner's own writes: a read begun
// before a write must not undo it. Every change therefore gets a number
// from seq, entries remember the number of their last change and removed
// ones leave a tombstone, and a read applies only to entries that did not
// change since it began. Tombstones go once no read that began before them
// is under way.
type hostView struct {
	mu sync.Mutex
	// current: the view may be used; see the type's comment.
	current bool
	seq     uint64
	domains map[string]viewDomain // by name
	volumes map[string]viewVolume // by path
	// goneDomains and goneVolumes are tombstones: when each was removed.
	goneDomains, goneVolumes map[string]uint64
	// reads are the reads under way, by the number they began at.
	reads map[uint64]int
	// stale is signalled when the view stops being current, so that
	// Watch checks it again soon.
	stale chan struct{}
}

type viewDomain struct {
	// facts are what the domain's persistent definition says and, while
	// it runs, its live one, which has the disks' backing chains.
	facts   []domainFacts
	changed uint64
}

type viewVolume struct {
	vol     libvirt.StorageVol
	path    string
	backing string // the path of its backing store, "" for none
	changed uint64
}

func newHostView() *hostView {
	return &hostView{
		domains: map[string]viewDomain{}, volumes: map[string]viewVolume{},
		goneDomains: map[string]uint64{}, goneVolumes: map[string]uint64{},
		reads: map[uint64]int{}, stale: make(chan struct{}, 1),
	}
}

// use reports whether the view may be used now.
func (v *hostView) use() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.current
}

// setCurrent marks the view current, or not.
func (v *hostView) setCurrent(current bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.current = current
}

// invalidate marks the view not current after a call whose outcome is not
// known, until Watch's next full check.
func (v *hostView) invalidate() {
	v.mu.Lock()
	was := v.current
	v.current = false
	v.mu.Unlock()
	if was {
		select {
		case v.stale <- struct{}{}:
		default:
		}
	}
}

// next returns the number of a new change; v.mu is held.
func (v *hostView) next() uint64 {
	v.seq++
	return v.seq
}

// begin starts a read of libvirt's state and returns its number, which
// end takes once the read was applied.
func (v *hostView) begin() uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	n := v.next()
	v.reads[n]++
	return n
}

// end finishes the read begun at n and drops the tombstones no read under
// way needs.
func (v *hostView) end(n uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.reads[n]--; v.reads[n] <= 0 {
		delete(v.reads, n)
	}
	oldest := v.seq + 1
	for r := range v.reads {
		oldest = min(oldest, r)
	}
	for name, at := range v.goneDomains {
		if at < oldest {
			delete(v.goneDomains, name)
		}
	}
	for path, at := range v.goneVolumes {
		if at < oldest {
			delete(v.goneVolumes, path)
		}
	}
}

// newerDomain reports whether the domain name changed since the read
// begun at n; v.mu is held.
func (v *hostView) newerDomain(name string, n uint64) bool {
	if d, ok := v.domains[name]; ok && d.changed > n {
		return true
	}
	return v.goneDomains[name] > n
}

func (v *hostView) newerVolume(path string, n uint64) bool {
	if e, ok := v.volumes[path]; ok && e.changed > n {
		return true
	}
	return v.goneVolumes[path] > n
}

// putDomain records what the Provisioner itself just defined.
func (v *hostView) putDomain(name string, facts []domainFacts) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.domains[name] = viewDomain{facts: facts, changed: v.next()}
	delete(v.goneDomains, name)
}

// dropDomain records that the Provisioner itself removed domain name.
func (v *hostView) dropDomain(name string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.domains, name)
	v.goneDomains[name] = v.next()
}

// readDomain applies what a read begun at n found of domain name: its
// facts, or none when it does not exist.
func (v *hostView) readDomain(n uint64, name string, facts []domainFacts, found bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.newerDomain(name, n) {
		return
	}
	if !found {
		delete(v.domains, name)
		return
	}
	v.domains[name] = viewDomain{facts: facts, changed: n}
}

// putVolume records a volume the Provisioner itself just created.
func (v *hostView) putVolume(vol libvirt.StorageVol, path, backing string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.volumes[path] = viewVolume{vol: vol, path: path, backing: backing, changed: v.next()}
	delete(v.goneVolumes, path)
}

// dropVolume records that the Provisioner itself deleted the volume at
// path.
func (v *hostView) dropVolume(path string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.volumes, path)
	v.goneVolumes[path] = v.next()
}

// dropVolumeNamed is dropVolume for a volume known by its handle.
func (v *hostView) dropVolumeNamed(vol libvirt.StorageVol) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for path, e := range v.volumes {
		if e.vol.Pool == vol.Pool && e.vol.Name == vol.Name {
			delete(v.volumes, path)
			v.goneVolumes[path] = v.next()
		}
	}
}

// readVolume applies a volume found by a read begun at n.
func (v *hostView) readVolume(n uint64, e viewVolume) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.newerVolume(e.path, n) {
		return
	}
	e.changed = n
	v.volumes[e.path] = e
}

// volumeNames returns the pool and name of every volume the view knows.
func (v *hostView) volumeNames() map[[2]string]bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make(map[[2]string]bool, len(v.volumes))
	for _, e := range v.volumes {
		out[[2]string{e.vol.Pool, e.vol.Name}] = true
	}
	return out
}

// replace applies a full check begun at n: the domains and volumes found,
// which replace those that did not change since n.
func (v *hostView) replace(n uint64, domains map[string][]domainFacts, volumes []viewVolume) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for name, d := range v.domains {
		if _, ok := domains[name]; !ok && d.changed <= n {
			delete(v.domains, name)
		}
	}
	for name, facts := range domains {
		if !v.newerDomain(name, n) {
			v.domains[name] = viewDomain{facts: facts, changed: n}
		}
	}
	found := make(map[string]bool, len(volumes))
	for _, e := range volumes {
		found[e.path] = true
	}
	for path, e := range v.volumes {
		if !found[path] && e.changed <= n {
			delete(v.volumes, path)
		}
	}
	for _, e := range volumes {
		if !v.newerVolume(e.path, n) {
			e.changed = n
			v.volumes[e.path] = e
		}
	}
}

// macs returns the MAC addresses of every domain.
func (v *hostView) macs() map[string]bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make(map[string]bool, len(v.domains))
	for _, d := range v.domains {
		for _, f := range d.facts {
			for _, mac := range f.macs {
				out[mac] = true
			}
		}
	}
	return out
}

// storageUse is Provisioner.storageUse from the view, as far as the
// candidates go: the set holds only the candidates that something uses,
// so that a Remove costs the same however much storage the host has in
// use.
func (v *hostView) storageUse(skip string, candidates []poolVolume) storageSet {
	set := storageSet{paths: make(map[string]bool), volumes: make(map[[2]string]bool), users: make(map[string]string)}
	paths := make(map[string]bool, len(candidates))
	vols := make(map[[2]string]bool, len(candidates))
	for _, c := range candidates {
		paths[c.path] = true
		vols[[2]string{c.vol.Pool, c.vol.Name}] = true
	}
	addPath := func(path string, user func() string) {
		if paths[path] {
			set.addPath(path, user())
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for name, d := range v.domains {
		if name == skip {
			continue
		}
		user := func() string { return "domain " + name }
		for _, f := range d.facts {
			addPath(f.nvram, user)
			for _, src := range f.sources {
				switch {
				case src == nil:
				case src.File != nil:
					addPath(src.File.File, user)
				case src.Block != nil:
					addPath(src.Block.Dev, user)
				case src.Volume != nil:
					if key := [2]string{src.Volume.Pool, src.Volume.Volume}; vols[key] {
						set.volumes[key] = true
					}
				}
			}
		}
	}
	for path, e := range v.volumes {
		if !paths[path] {
			addPath(e.backing, func() string { return "volume " + path })
		}
	}
	return set
}

// volumesOf returns the volumes whose names satisfy keep.
func (v *hostView) volumesOf(keep func(name string) bool) []poolVolume {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []poolVolume
	for path, e := range v.volumes {
		if keep(e.vol.Name) {
			out = append(out, poolVolume{vol: e.vol, path: path})
		}
	}
	return out
}

// factsOf is what Clone and Remove need of a domain definition.
func factsOf(def *libvirtxml.Domain) domainFacts {
	f := domainFacts{name: def.Name, macs: domainMACs(def), nvram: imageNVRAM(def)}
	if def.Devices != nil {
		for _, disk := range def.Devices.Disks {
			f.sources = append(f.sources, disk.Source)
			for bs := disk.BackingStore; bs != nil; bs = bs.BackingStore {
				f.sources = append(f.sources, bs.Source)
			}
		}
	}
	return f
}

// volumeFacts is what the view keeps of a volume's document.
type volumeFacts struct {
	path, backing string
}

func parseVolumeFacts(doc string) (volumeFacts, error) {
	var vx libvirtxml.StorageVolume
	if err := vx.Unmarshal(doc); err != nil {
		return volumeFacts{}, err
	}
	var f volumeFacts
	if vx.Target != nil {
		f.path = vx.Target.Path
	}
	if vx.BackingStore != nil {
		f.backing = vx.BackingStore.Path
	}
	return f, nil
}

package provision

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// undefineFlags are tried in order until libvirt accepts one: older daemons
// and other drivers reject flags they do not know.
var undefineFlags = []libvirt.DomainUndefineFlagsValues{
	libvirt.DomainUndefineNvram | libvirt.DomainUndefineManagedSave |
		libvirt.DomainUndefineSnapshotsMetadata | libvirt.DomainUndefineCheckpointsMetadata,
	libvirt.DomainUndefineNvram | libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
	libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
	0,
}

// managedDomain returns the domain name for jobID, refusing the empty id,
// which would name the bare prefix.
func managedDomain(jobID string) (string, error) {
	if jobID == "" {
		return "", fmt.Errorf("empty job id: %w", ErrInvalidJobID)
	}
	return DomainName(jobID), nil
}

// Start boots the job's machine. It returns an error wrapping ErrNotFound
// if the machine does not exist.
func (p *Provisioner) Start(ctx context.Context, jobID string) error {
	name, err := managedDomain(jobID)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	dom, err := p.conn.DomainLookupByName(name)
	if isNoDomain(err) {
		return fmt.Errorf("start %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("start %s: look up: %w", name, err)
	}
	if err := p.conn.DomainCreate(dom); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	return nil
}

// Remove stops and undefines the job's machine and deletes the volumes its
// metadata records. It is idempotent: a machine that does not exist yields
// (false, nil).
//
// A recorded volume is deleted only if its file name has the form Clone
// gives the job's volumes and no unmanaged domain uses it; other recorded
// volumes are kept and reported in the error, after the domain is removed.
func (p *Provisioner) Remove(ctx context.Context, jobID string) (existed bool, err error) {
	name, err := managedDomain(jobID)
	if err != nil {
		return false, fmt.Errorf("remove: %w", err)
	}
	existed, err = p.remove(ctx, jobID, name)
	if err != nil {
		return existed, fmt.Errorf("remove %s: %w", name, err)
	}
	return existed, nil
}

func (p *Provisioner) remove(ctx context.Context, jobID, name string) (bool, error) {
	dom, err := p.conn.DomainLookupByName(name)
	if isNoDomain(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up: %w", err)
	}
	// The metadata goes with the domain, so read it first. Without it there
	// is nothing known to delete, but the domain itself still goes.
	m, err := p.machine(dom)
	if isNoDomain(err) {
		return false, nil
	}
	if err != nil {
		return true, err
	}
	vols, kept, err := p.deletableVolumes(jobID, m.Volumes)
	if err != nil {
		return true, err
	}
	if err := ctx.Err(); err != nil {
		return true, err
	}

	if m.Running {
		if err := p.conn.DomainDestroy(dom); err != nil && !isNotRunning(err) && !isNoDomain(err) {
			return true, fmt.Errorf("destroy: %w", err)
		}
	}
	if err := p.undefine(dom); err != nil {
		return true, err
	}
	if err := ctx.Err(); err != nil {
		return true, err
	}

	var errs []error
	for _, vol := range vols {
		if err := p.conn.StorageVolDelete(vol, 0); err != nil && !isNoStorageVol(err) {
			errs = append(errs, fmt.Errorf("delete volume %s/%s: %w", vol.Pool, vol.Name, err))
		}
	}
	if len(kept) > 0 {
		errs = append(errs, fmt.Errorf("kept volumes %s: not named for this job or used by an unmanaged domain", strings.Join(kept, ", ")))
	}
	return true, errors.Join(errs...)
}

// undefine undefines dom with as many of undefineFlags as libvirt accepts.
func (p *Provisioner) undefine(dom libvirt.Domain) error {
	var err error
	for _, flags := range undefineFlags {
		err = p.conn.DomainUndefineFlags(dom, flags)
		if !isUnsupportedFlags(err) {
			break
		}
	}
	// A transient domain is already gone once destroyed.
	if err != nil && !isNoDomain(err) {
		return fmt.Errorf("undefine: %w", err)
	}
	return nil
}

// ownedVolumePath reports whether path has the file name Clone gives a
// volume of jobID: the domain name, a dash, and a target without dashes.
// Requiring the rest to be dash-free keeps job "a" from claiming the
// volumes of job "a-b".
func ownedVolumePath(jobID, path string) bool {
	rest, ok := strings.CutPrefix(filepath.Base(path), DomainName(jobID)+"-")
	return ok && rest != "" && !strings.Contains(rest, "-")
}

// deletableVolumes looks up the recorded volume paths and splits them into
// volumes that may be deleted and paths that must be kept. Paths that no
// longer name a volume are neither.
func (p *Provisioner) deletableVolumes(jobID string, paths []string) (del []libvirt.StorageVol, kept []string, err error) {
	var candidates []libvirt.StorageVol
	var candidatePaths []string
	for _, path := range paths {
		if !ownedVolumePath(jobID, path) {
			kept = append(kept, path)
			continue
		}
		vol, err := p.conn.StorageVolLookupByPath(path)
		if isNoStorageVol(err) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("look up volume %s: %w", path, err)
		}
		candidates = append(candidates, vol)
		candidatePaths = append(candidatePaths, path)
	}
	if len(candidates) == 0 {
		return nil, kept, nil
	}
	used, err := p.unmanagedDisks()
	if err != nil {
		return nil, nil, err
	}
	for i, vol := range candidates {
		if used.has(candidatePaths[i], vol) {
			kept = append(kept, candidatePaths[i])
			continue
		}
		del = append(del, vol)
	}
	return del, kept, nil
}

// diskSet holds the storage that unmanaged domains use.
type diskSet struct {
	paths   map[string]bool
	volumes map[[2]string]bool // pool, volume
}

func (s diskSet) has(path string, vol libvirt.StorageVol) bool {
	return s.paths[path] || s.volumes[[2]string{vol.Pool, vol.Name}]
}

func (s diskSet) addSource(src *libvirtxml.DomainDiskSource) {
	switch {
	case src == nil:
	case src.File != nil:
		s.paths[src.File.File] = true
	case src.Block != nil:
		s.paths[src.Block.Dev] = true
	case src.Volume != nil:
		s.volumes[[2]string{src.Volume.Pool, src.Volume.Volume}] = true
	}
}

// unmanagedDisks collects the disks, and their backing chains as far as
// libvirt reports them, of every domain not named with Prefix, from both
// the live and the persistent definition.
func (p *Provisioner) unmanagedDisks() (diskSet, error) {
	set := diskSet{paths: make(map[string]bool), volumes: make(map[[2]string]bool)}
	doms, _, err := p.conn.ConnectListAllDomains(1, 0)
	if err != nil {
		return set, fmt.Errorf("list domains: %w", err)
	}
	for _, dom := range doms {
		if strings.HasPrefix(dom.Name, Prefix) {
			continue
		}
		for _, flags := range []libvirt.DomainXMLFlags{0, libvirt.DomainXMLInactive} {
			doc, err := p.conn.DomainGetXMLDesc(dom, flags)
			if isNoDomain(err) {
				break
			}
			if err != nil {
				return set, fmt.Errorf("domain %s XML: %w", dom.Name, err)
			}
			var def libvirtxml.Domain
			if err := def.Unmarshal(doc); err != nil {
				return set, fmt.Errorf("parse domain %s XML: %w", dom.Name, err)
			}
			if def.Devices == nil {
				continue
			}
			for _, disk := range def.Devices.Disks {
				set.addSource(disk.Source)
				for bs := disk.BackingStore; bs != nil; bs = bs.BackingStore {
					set.addSource(bs.Source)
				}
			}
		}
	}
	return set, nil
}

// Lookup returns the job's machine, and false if it does not exist.
func (p *Provisioner) Lookup(ctx context.Context, jobID string) (Machine, bool, error) {
	name, err := managedDomain(jobID)
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return Machine{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	dom, err := p.conn.DomainLookupByName(name)
	if isNoDomain(err) {
		return Machine{}, false, nil
	}
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	m, err := p.machine(dom)
	if isNoDomain(err) {
		return Machine{}, false, nil
	}
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	return m, true, nil
}

// List returns every managed domain, sorted by name, including those whose
// metadata cannot be read, so that callers can remove them.
func (p *Provisioner) List(ctx context.Context) ([]Machine, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list machines: %w", err)
	}
	doms, _, err := p.conn.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list machines: %w", err)
	}
	machines := []Machine{}
	for _, dom := range doms {
		if !strings.HasPrefix(dom.Name, Prefix) {
			continue
		}
		m, err := p.machine(dom)
		if isNoDomain(err) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("list machines: %w", err)
		}
		machines = append(machines, m)
	}
	slices.SortFunc(machines, func(a, b Machine) int { return strings.Compare(a.Name, b.Name) })
	return machines, nil
}

// machine reads a managed domain's state and metadata. The job id always
// comes from the domain name, which is what Remove acts on; metadata that is
// missing or unreadable leaves the recorded fields empty.
func (p *Provisioner) machine(dom libvirt.Domain) (Machine, error) {
	state, _, err := p.conn.DomainGetState(dom, 0)
	if err != nil {
		return Machine{}, fmt.Errorf("state of %s: %w", dom.Name, err)
	}
	m := Machine{}
	doc, err := p.conn.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{metadataNS}, libvirt.DomainAffectCurrent)
	switch {
	case err == nil:
		if decodeMetadata(doc, &m) != nil {
			m = Machine{}
		}
	case isNoMetadata(err):
	default:
		return Machine{}, fmt.Errorf("metadata of %s: %w", dom.Name, err)
	}
	m.Name = dom.Name
	m.JobID = strings.TrimPrefix(dom.Name, Prefix)
	m.Running = libvirt.DomainState(state) != libvirt.DomainShutoff
	return m, nil
}

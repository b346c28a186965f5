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
// and other drivers reject flags they do not know. nvram is replaced by
// DomainUndefineKeepNvram when the domain's NVRAM is not its own.
func undefineFlags(nvram libvirt.DomainUndefineFlagsValues) []libvirt.DomainUndefineFlagsValues {
	return []libvirt.DomainUndefineFlagsValues{
		nvram | libvirt.DomainUndefineManagedSave |
			libvirt.DomainUndefineSnapshotsMetadata | libvirt.DomainUndefineCheckpointsMetadata,
		nvram | libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
		libvirt.DomainUndefineManagedSave | libvirt.DomainUndefineSnapshotsMetadata,
		0,
	}
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
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return fmt.Errorf("start %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("start %s: look up: %w", name, err)
	}
	if err := p.do(ctx, func() error { return p.conn.DomainCreate(dom) }); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	return nil
}

// Remove stops and undefines the job's machine and deletes the volumes and
// console logs its metadata records. It is idempotent: a machine that does
// not exist yields (false, nil). Without a domain, it deletes the volumes
// named for the job (left by a Clone that crashed) and reports existed
// true if there were any.
//
// A volume is deleted only if its file name has the form Clone gives the
// job's volumes and nothing else uses it: no other domain as a disk, a
// backing file or NVRAM, no other volume as its backing store. Other
// recorded volumes are kept and reported in the error, after the domain is
// removed. If the metadata cannot be read, the volumes named for the job
// are deleted by the same rules once the domain is gone. Console logs
// are deleted, with virtlogd's backups of them, once the domain is gone,
// if their file names are the job's (ConsoleLogPath).
func (p *Provisioner) Remove(ctx context.Context, jobID string) (existed bool, err error) {
	return p.RemoveWith(ctx, jobID, RemoveOptions{})
}

// RemoveOptions change what Remove deletes.
type RemoveOptions struct {
	// KeepConsole keeps the machine's console logs, for a reader after
	// the machine is gone; RemoveConsoleLogs deletes them later.
	KeepConsole bool
}

// RemoveWith is Remove with options.
func (p *Provisioner) RemoveWith(ctx context.Context, jobID string, opts RemoveOptions) (existed bool, err error) {
	name, err := managedDomain(jobID)
	if err != nil {
		return false, fmt.Errorf("remove: %w", err)
	}
	existed, err = p.remove(ctx, jobID, name, opts)
	if err != nil {
		return existed, fmt.Errorf("remove %s: %w", name, err)
	}
	return existed, nil
}

func (p *Provisioner) remove(ctx context.Context, jobID, name string, opts RemoveOptions) (bool, error) {
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		removed, err := p.removeOrphans(ctx, jobID)
		return len(removed) > 0, err
	}
	if err != nil {
		return false, fmt.Errorf("look up: %w", err)
	}
	// The metadata goes with the domain, so read it first. Without it there
	// is nothing known to delete, but the domain itself still goes.
	m, err := p.machine(ctx, dom)
	if isNoDomain(err) {
		return false, nil
	}
	if err != nil {
		return true, err
	}
	var candidates []poolVolume
	var kept []string
	for _, path := range m.Volumes {
		if !ownedVolumePath(jobID, path) {
			kept = append(kept, path+" (not named for this job)")
			continue
		}
		vol, err := call(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolLookupByPath(path) })
		if isNoStorageVol(err) {
			continue
		}
		if err != nil {
			return true, fmt.Errorf("look up volume %s: %w", path, err)
		}
		candidates = append(candidates, poolVolume{vol: vol, path: path})
	}
	del, inUse, err := p.unused(ctx, name, candidates)
	if err != nil {
		return true, err
	}
	kept = append(kept, inUse...)
	nvramFlag, err := p.nvramFlag(ctx, dom, del)
	if err != nil {
		return true, err
	}

	if m.Running {
		err := p.do(ctx, func() error { return p.conn.DomainDestroy(dom) })
		if err != nil && !isNotRunning(err) && !isNoDomain(err) {
			return true, fmt.Errorf("destroy: %w", err)
		}
	}
	if err := p.undefine(ctx, dom, nvramFlag); err != nil {
		return true, err
	}
	p.view.dropDomain(name)

	var errs []error
	for _, v := range del {
		err := p.do(ctx, func() error { return p.conn.StorageVolDelete(v.vol, 0) })
		if err != nil && !isNoStorageVol(err) {
			errs = append(errs, fmt.Errorf("delete volume %s: %w", v.path, err))
			continue
		}
		p.view.dropVolume(v.path)
	}
	if m.MetadataUnreadable {
		// What was created is unknown; the naming rule still tells.
		if _, err := p.removeOrphans(ctx, jobID); err != nil {
			errs = append(errs, err)
		}
	}
	if !opts.KeepConsole {
		if err := removeConsoleLogs(jobID, m.ConsoleLogs); err != nil {
			errs = append(errs, fmt.Errorf("console logs: %w", err))
		}
	}
	if len(kept) > 0 {
		errs = append(errs, fmt.Errorf("kept volumes %s", strings.Join(kept, ", ")))
	}
	return true, errors.Join(errs...)
}

// nvramFlag decides whether undefining may delete the domain's NVRAM file,
// which libvirt does by path, outside any pool: only if it is one of the
// volumes about to be deleted, or the file libvirt made for this domain
// from a template (named after it), never a file with another owner that
// wrong metadata or a hand-edited definition points at.
func (p *Provisioner) nvramFlag(ctx context.Context, dom libvirt.Domain, del []poolVolume) (libvirt.DomainUndefineFlagsValues, error) {
	doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive) })
	if err != nil {
		return 0, fmt.Errorf("domain XML: %w", err)
	}
	f, err := p.domains.get(doc, parseDomainFacts)
	if err != nil {
		return 0, fmt.Errorf("parse domain XML: %w", err)
	}
	path := f.nvram
	if path == "" {
		return libvirt.DomainUndefineNvram, nil
	}
	if slices.ContainsFunc(del, func(v poolVolume) bool { return v.path == path }) ||
		filepath.Base(path) == dom.Name+"_VARS.fd" {
		return libvirt.DomainUndefineNvram, nil
	}
	return libvirt.DomainUndefineKeepNvram, nil
}

// undefine undefines dom with as many flags as libvirt accepts.
func (p *Provisioner) undefine(ctx context.Context, dom libvirt.Domain, nvram libvirt.DomainUndefineFlagsValues) error {
	var err error
	for _, flags := range undefineFlags(nvram) {
		err = p.do(ctx, func() error { return p.conn.DomainUndefineFlags(dom, flags) })
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

// Lookup returns the job's machine, and false if it does not exist.
func (p *Provisioner) Lookup(ctx context.Context, jobID string) (Machine, bool, error) {
	name, err := managedDomain(jobID)
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up: %w", err)
	}
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return Machine{}, false, nil
	}
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	m, err := p.machine(ctx, dom)
	if isNoDomain(err) {
		return Machine{}, false, nil
	}
	if err != nil {
		return Machine{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	return m, true, nil
}

// List returns every managed domain, sorted by name, including those whose
// metadata cannot be read (MetadataUnreadable), so that a reconciler can
// remove them. It is the reconciler's view of the host, from libvirt's
// state alone.
func (p *Provisioner) List(ctx context.Context) ([]Machine, error) {
	doms, err := p.listDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("list machines: %w", err)
	}
	machines := []Machine{}
	for _, dom := range doms {
		if !strings.HasPrefix(dom.Name, Prefix) || dom.Name == Prefix {
			continue
		}
		m, err := p.machine(ctx, dom)
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
func (p *Provisioner) machine(ctx context.Context, dom libvirt.Domain) (Machine, error) {
	state, err := call(ctx, p, func() (int32, error) {
		state, _, err := p.conn.DomainGetState(dom, 0)
		return state, err
	})
	if err != nil {
		return Machine{}, fmt.Errorf("state of %s: %w", dom.Name, err)
	}
	m := Machine{}
	doc, err := call(ctx, p, func() (string, error) {
		return p.conn.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{metadataNS}, libvirt.DomainAffectCurrent)
	})
	switch {
	case err == nil:
		if decodeMetadata(doc, &m) != nil {
			m = Machine{MetadataUnreadable: true}
		}
	case isNoMetadata(err):
		m.MetadataUnreadable = true
	default:
		return Machine{}, fmt.Errorf("metadata of %s: %w", dom.Name, err)
	}
	m.Name = dom.Name
	m.Key = strings.TrimPrefix(dom.Name, Prefix)
	if !m.Warm || m.MetadataUnreadable {
		// A cold machine is named for its job.
		m.JobID = m.Key
	}
	m.Running = libvirt.DomainState(state) != libvirt.DomainShutoff
	if m.VCPUs == 0 || m.MemoryMiB == 0 {
		// Built before the metadata recorded sizes, or unreadable: the
		// definition says.
		doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive) })
		if err != nil {
			return Machine{}, fmt.Errorf("definition of %s: %w", dom.Name, err)
		}
		// A definition libvirt wrote parses; if not, the size stays
		// unknown (0) rather than keeping the machine from being listed.
		var def libvirtxml.Domain
		if def.Unmarshal(doc) == nil {
			if vcpus, mib, err := domainSize(&def); err == nil {
				m.VCPUs, m.MemoryMiB = vcpus, mib
			}
		}
	}
	return m, nil
}

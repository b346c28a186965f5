package provision

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// volumeName returns the name of the volume that replaces the image disk
// with the given target in the job's machine.
func volumeName(jobID, target string) string {
	return DomainName(jobID) + "-" + target + ".qcow2"
}

// Clone defines the machine for s.JobID as a copy of the image s.Image and
// returns it; it does not start it. Each writable disk of the image becomes
// a new qcow2 volume, in the same storage pool, backed by the image's volume,
// so the image itself is never written to.
//
// Clone returns an error wrapping ErrExists if the machine is already
// defined, ErrImageNotFound or ErrImageInvalid if the image cannot be
// cloned, and ErrInvalidJobID for a job id that cannot name a domain. If it
// fails after creating anything, it removes what it created first.
func (p *Provisioner) Clone(ctx context.Context, s Spec) (Machine, error) {
	m, err := p.clone(ctx, s)
	if err != nil {
		return Machine{}, fmt.Errorf("clone %s from image %s: %w", DomainName(s.JobID), s.Image, err)
	}
	return m, nil
}

func (p *Provisioner) clone(ctx context.Context, s Spec) (_ Machine, err error) {
	// The wire contract's rule keeps job ids fit for domain and file names.
	if !messages.ValidJobID(s.JobID) {
		return Machine{}, fmt.Errorf("job id %q: %w", s.JobID, ErrInvalidJobID)
	}
	if strings.HasPrefix(s.Image, Prefix) {
		return Machine{}, fmt.Errorf("image names must not start with %q: %w", Prefix, ErrImageInvalid)
	}
	name := DomainName(s.JobID)

	image, err := p.conn.DomainLookupByName(s.Image)
	if isNoDomain(err) {
		return Machine{}, ErrImageNotFound
	}
	if err != nil {
		return Machine{}, fmt.Errorf("look up image: %w", err)
	}
	state, _, err := p.conn.DomainGetState(image, 0)
	if err != nil {
		return Machine{}, fmt.Errorf("image state: %w", err)
	}
	if libvirt.DomainState(state) != libvirt.DomainShutoff {
		return Machine{}, fmt.Errorf("image %s is running; images must be shut off: %w", s.Image, ErrImageInvalid)
	}
	if err := p.checkAbsent(name); err != nil {
		return Machine{}, err
	}
	// Secure: keep passwords (e.g. of graphics) that a faithful copy needs.
	doc, err := p.conn.DomainGetXMLDesc(image, libvirt.DomainXMLInactive|libvirt.DomainXMLSecure)
	if err != nil {
		return Machine{}, fmt.Errorf("image XML: %w", err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return Machine{}, fmt.Errorf("parse image XML: %w: %w", err, ErrImageInvalid)
	}
	disks, err := writableDisks(&def)
	if err != nil {
		return Machine{}, err
	}
	sources, err := p.diskSources(disks)
	if err != nil {
		return Machine{}, err
	}
	if err := ctx.Err(); err != nil {
		return Machine{}, err
	}

	// From here on every failure removes what was created.
	var created []libvirt.StorageVol
	defer func() {
		if err != nil {
			err = errors.Join(err, p.deleteCreated(created))
		}
	}()
	m := Machine{
		Name:        name,
		JobID:       s.JobID,
		Image:       s.Image,
		Host:        s.Host,
		RunnerKind:  s.RunnerKind,
		RequestedAt: s.RequestedAt,
		Deadline:    s.Deadline,
	}
	plan := clonePlan{
		Name:  name,
		Type:  p.opts.DomainType,
		Disks: make(map[string]string, len(disks)),
		Rand:  p.rand,
	}
	for i, d := range disks {
		vol, path, err := p.createOverlay(s.JobID, d, sources[i])
		if err != nil {
			return Machine{}, err
		}
		created = append(created, vol)
		plan.Disks[d.Target] = path
		m.Volumes = append(m.Volumes, path)
		if err := ctx.Err(); err != nil {
			return Machine{}, err
		}
	}
	if plan.UUID, err = newUUID(p.rand); err != nil {
		return Machine{}, err
	}
	if plan.Metadata, err = encodeMetadata(m); err != nil {
		return Machine{}, err
	}
	cloneDef, err := cloneXML(&def, plan)
	if err != nil {
		return Machine{}, err
	}
	cloneDoc, err := cloneDef.Marshal()
	if err != nil {
		return Machine{}, fmt.Errorf("encode domain XML: %w", err)
	}
	if err := p.define(name, cloneDoc); err != nil {
		return Machine{}, err
	}
	return m, nil
}

// checkAbsent returns an error wrapping ErrExists if domain name exists.
func (p *Provisioner) checkAbsent(name string) error {
	_, err := p.conn.DomainLookupByName(name)
	switch {
	case err == nil:
		return fmt.Errorf("domain %s: %w", name, ErrExists)
	case isNoDomain(err):
		return nil
	default:
		return fmt.Errorf("look up domain %s: %w", name, err)
	}
}

// diskSource is what the volume replacing an image disk is created from.
type diskSource struct {
	pool     libvirt.StoragePool
	format   string
	capacity uint64
}

// diskSources finds the storage volume and pool behind every disk. It only
// reads, so failing here leaves nothing to clean up.
func (p *Provisioner) diskSources(disks []imageDisk) ([]diskSource, error) {
	sources := make([]diskSource, 0, len(disks))
	for _, d := range disks {
		vol, err := p.conn.StorageVolLookupByPath(d.Path)
		if isNoStorageVol(err) {
			return nil, fmt.Errorf("disk %s: %s is not a volume in any storage pool: %w", d.Target, d.Path, ErrImageInvalid)
		}
		if err != nil {
			return nil, fmt.Errorf("disk %s: look up volume %s: %w", d.Target, d.Path, err)
		}
		pool, err := p.conn.StoragePoolLookupByVolume(vol)
		if err != nil {
			return nil, fmt.Errorf("disk %s: pool of volume %s: %w", d.Target, d.Path, err)
		}
		doc, err := p.conn.StorageVolGetXMLDesc(vol, 0)
		if err != nil {
			return nil, fmt.Errorf("disk %s: volume %s XML: %w", d.Target, d.Path, err)
		}
		var vx libvirtxml.StorageVolume
		if err := vx.Unmarshal(doc); err != nil {
			return nil, fmt.Errorf("disk %s: parse volume %s XML: %w", d.Target, d.Path, err)
		}
		capacity, err := volumeBytes(vx.Capacity)
		if err != nil {
			return nil, fmt.Errorf("disk %s: capacity of volume %s: %w", d.Target, d.Path, err)
		}
		src := diskSource{pool: pool, capacity: capacity}
		if vx.Target != nil && vx.Target.Format != nil {
			src.format = vx.Target.Format.Type
		}
		sources = append(sources, src)
	}
	return sources, nil
}

// sizeUnits are the multipliers of the storage volume size units.
var sizeUnits = map[string]uint64{
	"": 1, "b": 1, "bytes": 1,
	"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
}

// volumeBytes converts a volume size to bytes. libvirt reports sizes in
// bytes, but the schema allows other units.
func volumeBytes(s *libvirtxml.StorageVolumeSize) (uint64, error) {
	if s == nil {
		return 0, errors.New("no size")
	}
	mult, ok := sizeUnits[strings.ToLower(s.Unit)]
	if !ok {
		return 0, fmt.Errorf("unknown unit %q", s.Unit)
	}
	return s.Value * mult, nil
}

// createOverlay creates the qcow2 volume that replaces disk d, backed by
// the image's volume, and returns it with its path.
func (p *Provisioner) createOverlay(jobID string, d imageDisk, src diskSource) (libvirt.StorageVol, string, error) {
	name := volumeName(jobID, d.Target)
	vx := libvirtxml.StorageVolume{
		Name:       name,
		Capacity:   &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: src.capacity},
		Allocation: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 0},
		Target: &libvirtxml.StorageVolumeTarget{
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"},
		},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{Path: d.Path},
	}
	if src.format != "" {
		vx.BackingStore.Format = &libvirtxml.StorageVolumeTargetFormat{Type: src.format}
	}
	doc, err := vx.Marshal()
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("clone volume %s: encode XML: %w", name, err)
	}
	vol, err := p.conn.StorageVolCreateXML(src.pool, doc, 0)
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("clone volume %s: %w", name, err)
	}
	path, err := p.conn.StorageVolGetPath(vol)
	if err != nil {
		return libvirt.StorageVol{}, "", errors.Join(
			fmt.Errorf("clone volume %s: path: %w", name, err),
			p.deleteCreated([]libvirt.StorageVol{vol}))
	}
	return vol, path, nil
}

// define defines the domain, validating the XML against libvirt's schema
// where the daemon supports that.
func (p *Provisioner) define(name, doc string) error {
	_, err := p.conn.DomainDefineXMLFlags(doc, libvirt.DomainDefineValidate)
	if isUnsupportedFlags(err) {
		_, err = p.conn.DomainDefineXMLFlags(doc, 0)
	}
	if err == nil {
		return nil
	}
	// Another Clone of the same job may have won the race since
	// checkAbsent; the new UUID keeps libvirt from redefining its domain.
	if absentErr := p.checkAbsent(name); errors.Is(absentErr, ErrExists) {
		return absentErr
	}
	return fmt.Errorf("define domain %s: %w", name, err)
}

// deleteCreated deletes volumes Clone created, for rolling back.
func (p *Provisioner) deleteCreated(vols []libvirt.StorageVol) error {
	var errs []error
	for _, vol := range vols {
		if err := p.conn.StorageVolDelete(vol, 0); err != nil && !isNoStorageVol(err) {
			errs = append(errs, fmt.Errorf("roll back volume %s/%s: %w", vol.Pool, vol.Name, err))
		}
	}
	return errors.Join(errs...)
}

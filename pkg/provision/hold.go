package provision

import (
	"context"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Hold is what a held machine records in its metadata: until when it is
// kept after its job ended (Until), or the hold it gets when its job ends
// (For). The zero Hold clears both.
type Hold struct {
	Until time.Time
	For   time.Duration
}

// SetHold records h in the metadata of the machine with key, in its
// running definition (if it runs) and its persistent one, so that a
// worker started later (Lookup, List) knows the hold.
func (p *Provisioner) SetHold(ctx context.Context, key string, h Hold) (Machine, error) {
	name, err := managedDomain(key)
	if err != nil {
		return Machine{}, fmt.Errorf("set hold: %w", err)
	}
	m, err := p.setHold(ctx, name, h)
	if err != nil {
		return Machine{}, fmt.Errorf("set hold of %s: %w", name, err)
	}
	return m, nil
}

func (p *Provisioner) setHold(ctx context.Context, name string, h Hold) (Machine, error) {
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return Machine{}, ErrNotFound
	}
	if err != nil {
		return Machine{}, fmt.Errorf("look up: %w", err)
	}
	m, err := p.machine(ctx, dom)
	if err != nil {
		return Machine{}, err
	}
	if m.MetadataUnreadable {
		return Machine{}, fmt.Errorf("its metadata cannot be read: %w", ErrInvalidSpec)
	}
	m.HeldUntil, m.HoldFor = h.Until, h.For
	doc, err := encodeMetadataElement(m)
	if err != nil {
		return Machine{}, err
	}
	flags := libvirt.DomainAffectConfig
	if m.Running {
		flags |= libvirt.DomainAffectLive
	}
	err = p.do(ctx, func() error {
		return p.conn.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{doc},
			libvirt.OptString{metadataPrefix}, libvirt.OptString{metadataNS}, flags)
	})
	if isNotRunning(err) && flags&libvirt.DomainAffectLive != 0 {
		// It stopped meanwhile: its persistent definition is all there is.
		err = p.do(ctx, func() error {
			return p.conn.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{doc},
				libvirt.OptString{metadataPrefix}, libvirt.OptString{metadataNS}, libvirt.DomainAffectConfig)
		})
	}
	if err != nil {
		return Machine{}, fmt.Errorf("set metadata: %w", err)
	}
	return m, nil
}

// PowerOff stops the machine with key at once, as pulling its power cord
// would (virDomainDestroy): its disks and console logs stay, its memory
// is lost. A machine that is not running is fine.
func (p *Provisioner) PowerOff(ctx context.Context, key string) error {
	name, err := managedDomain(key)
	if err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return fmt.Errorf("power off %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("power off %s: look up: %w", name, err)
	}
	err = p.do(ctx, func() error { return p.conn.DomainDestroy(dom) })
	if err != nil && !isNotRunning(err) {
		return fmt.Errorf("power off %s: %w", name, err)
	}
	return nil
}

// ImageSize returns the size a clone of image gets unless its Spec says
// otherwise: the image's vCPUs and memory in MiB (0 when its definition
// has none). An image that does not exist is ErrImageNotFound.
func (p *Provisioner) ImageSize(ctx context.Context, image string) (vcpus, memoryMiB int, err error) {
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(image) })
	if isNoDomain(err) {
		return 0, 0, fmt.Errorf("image %s: %w", image, ErrImageNotFound)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("image %s: look up: %w", image, err)
	}
	doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive) })
	if err != nil {
		return 0, 0, fmt.Errorf("image %s: read definition: %w", image, err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return 0, 0, fmt.Errorf("image %s: parse definition: %w", image, err)
	}
	return domainSize(&def)
}

package provision

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Clone defines the machine of s (stretchy-<s.JobID>, or stretchy-<s.Key>
// for a warm machine) as a copy of the image s.Image and
// returns it; it does not start it. Each writable disk of the image whose
// storage is a pool volume gets a new volume of the job in the same pool,
// made as the clone mode says (see doc.go); read-only, CD-ROM and
// shareable disks are shared. A UEFI image's NVRAM is copied too. The
// machine gets the Spec's size and scratch disk, and its consoles log
// into the Spec's console directory.
//
// Clone returns an error wrapping ErrExists if the machine is already
// defined, ErrImageNotFound or ErrImageInvalid if the image cannot be
// cloned (ErrReflinkUnsupported with the latter; ErrImageInvalid also
// when its layout cannot take the Spec's size, such as fewer vCPUs than
// NUMA cells, or when a scratch disk has no pool to go to),
// ErrInvalidJobID, ErrInvalidCloneMode or ErrInvalidSpec for an unusable
// Spec. If it fails after creating anything, it removes what it created
// first.
//
// Volumes named for the job but without a domain, left by a Clone that
// crashed before defining it, are deleted first. Callers therefore run at
// most one Clone per job and host at a time.
func (p *Provisioner) Clone(ctx context.Context, s Spec) (Machine, error) {
	m, err := p.clone(ctx, s)
	if err != nil {
		return Machine{}, fmt.Errorf("clone %s from image %s: %w", DomainName(s.key()), s.Image, err)
	}
	return m, nil
}

func (p *Provisioner) clone(ctx context.Context, s Spec) (_ Machine, err error) {
	// The wire contract's rules keep job ids and warm keys fit for domain
	// and file names.
	key := s.key()
	switch {
	case s.Key == "" && !messages.ValidJobID(s.JobID):
		return Machine{}, fmt.Errorf("job id %q: %w", s.JobID, ErrInvalidJobID)
	case s.Key != "" && !messages.ValidWarmKey(s.Key):
		return Machine{}, fmt.Errorf("warm machine key %q: %w", s.Key, ErrInvalidJobID)
	case s.Key != "" && s.JobID != "" && !messages.ValidJobID(s.JobID):
		return Machine{}, fmt.Errorf("job id %q: %w", s.JobID, ErrInvalidJobID)
	}
	if s.CloneMode != "" && !s.CloneMode.valid() {
		return Machine{}, fmt.Errorf("clone mode %q: %w", s.CloneMode, ErrInvalidCloneMode)
	}
	if err := s.checkSize(); err != nil {
		return Machine{}, err
	}
	if strings.HasPrefix(s.Image, Prefix) {
		return Machine{}, fmt.Errorf("image names must not start with %q: %w", Prefix, ErrImageInvalid)
	}
	name := DomainName(key)

	image, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(s.Image) })
	if isNoDomain(err) {
		return Machine{}, ErrImageNotFound
	}
	if err != nil {
		return Machine{}, fmt.Errorf("look up image: %w", err)
	}
	state, err := call(ctx, p, func() (int32, error) {
		state, _, err := p.conn.DomainGetState(image, 0)
		return state, err
	})
	if err != nil {
		return Machine{}, fmt.Errorf("image state: %w", err)
	}
	if libvirt.DomainState(state) != libvirt.DomainShutoff {
		return Machine{}, fmt.Errorf("image %s is %s; images must be shut off: %w", s.Image, stateName(state), ErrImageInvalid)
	}
	if err := p.checkAbsent(ctx, name); err != nil {
		return Machine{}, err
	}
	// Secure: keep passwords (e.g. of graphics) that a faithful copy needs.
	doc, err := call(ctx, p, func() (string, error) {
		return p.conn.DomainGetXMLDesc(image, libvirt.DomainXMLInactive|libvirt.DomainXMLSecure)
	})
	if err != nil {
		return Machine{}, fmt.Errorf("image XML: %w", err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return Machine{}, fmt.Errorf("parse image XML: %w: %w", err, ErrImageInvalid)
	}
	settings, err := p.imageSettings(ctx, image)
	if err != nil {
		return Machine{}, err
	}
	mode := s.CloneMode
	if mode == "" {
		mode = settings.CloneMode
	}
	if mode == "" {
		mode = CloneLinked
	}

	disks, err := writableDisks(&def)
	if err != nil {
		return Machine{}, err
	}
	types := poolTypes{}
	sources := make([]*volume, len(disks))
	refs := make([]*volumeRef, len(disks))
	for i, d := range disks {
		if sources[i], err = p.resolveDisk(ctx, d, types); err != nil {
			return Machine{}, err
		}
		if sources[i] != nil {
			refs[i] = &sources[i].ref
		}
	}
	plans, err := planDisks(key, disks, refs, mode)
	if err != nil {
		return Machine{}, err
	}
	nvram, err := p.resolveNVRAM(ctx, &def, types)
	if err != nil {
		return Machine{}, err
	}
	stamps := []string{doc}
	for _, src := range sources {
		if src != nil {
			stamps = append(stamps, src.stamp)
		}
	}
	if nvram.vol != nil {
		stamps = append(stamps, nvram.vol.stamp)
	}
	if s.ScratchGiB > 0 && len(plans) == 0 {
		return Machine{}, fmt.Errorf("a scratch disk goes into the pool of the image's first writable disk, and the image has none: %w", ErrImageInvalid)
	}
	vcpus, memoryMiB, err := domainSize(&def)
	if err != nil {
		return Machine{}, fmt.Errorf("size of the image: %w: %w", err, ErrImageInvalid)
	}
	if s.VCPUs > 0 {
		vcpus = s.VCPUs
	}
	if s.MemoryMiB > 0 {
		memoryMiB = s.MemoryMiB
	}

	// Only reads so far. What an earlier attempt of this job left behind
	// goes first, so that the names are free.
	if _, err := p.removeOrphans(ctx, key); err != nil {
		return Machine{}, err
	}

	// From here on every failure removes what was created, and what a
	// call that got no answer may have created, found by its name.
	var created []libvirt.StorageVol
	defer func() {
		if err == nil {
			return
		}
		rollback := p.deleteVolumes(ctx, created)
		if rollback == nil && !errors.Is(err, ErrExists) && !IsUnavailable(err) {
			_, rollback = p.removeOrphans(context.WithoutCancel(ctx), key)
		}
		err = errors.Join(err, rollback)
	}()
	m := Machine{
		Name:            name,
		Key:             key,
		JobID:           s.JobID,
		Warm:            s.Key != "",
		Generation:      s.Generation,
		Image:           s.Image,
		Host:            s.Host,
		RunnerKind:      s.RunnerKind,
		RequestedAt:     s.RequestedAt,
		Deadline:        s.Deadline,
		CloneMode:       mode,
		OS:              settings.OS,
		ImageGeneration: generation(stamps),
		VCPUs:           vcpus,
		MemoryMiB:       memoryMiB,
		ScratchGiB:      s.ScratchGiB,
		// A hold asked for before the clone exists is the job's.
		HoldOnFailure: s.HoldOnFailure,
	}
	plan := clonePlan{
		Image:  s.Image,
		Name:   name,
		Type:   p.opts.DomainType,
		Linked: mode == CloneLinked,
		Disks:  make(map[string]diskOut, len(plans)),
		Rand:   p.rand,
		// The image's own size stays as it is, with all it says about it.
		VCPUs:     s.VCPUs,
		MemoryMiB: s.MemoryMiB,
	}
	if s.ConsoleDir != "" {
		if plan.ConsoleLog, err = ConsoleLogPath(s.ConsoleDir, key); err != nil {
			return Machine{}, err
		}
		m.ConsoleLogs = consoleLogs(&def, plan.ConsoleLog, false)
	}
	for i, dp := range plans {
		vol, path, err := p.createDiskVolume(ctx, mode, dp, sources[i])
		if err != nil {
			return Machine{}, fmt.Errorf("disk %s: %w", dp.Disk.Target, err)
		}
		created = append(created, vol)
		plan.Disks[dp.Disk.Target] = diskOut{Path: path, Format: dp.Format}
		m.Volumes = append(m.Volumes, path)
	}
	if nvram.path != "" {
		var into *libvirt.StoragePool
		if len(plans) > 0 {
			into = &sources[0].pool
		}
		vol, path, err := p.copyNVRAM(ctx, key, nvram, into, def.OS.NVRam.Format)
		if err != nil {
			return Machine{}, err
		}
		created = append(created, vol)
		plan.NVRAM = path
		m.Volumes = append(m.Volumes, path)
	}
	if s.ScratchGiB > 0 {
		vol, path, err := p.createScratchVolume(ctx, sources[0].pool, scratchVolumeName(key), uint64(s.ScratchGiB)<<30)
		if err != nil {
			return Machine{}, err
		}
		created = append(created, vol)
		plan.Scratch = path
		m.Volumes = append(m.Volumes, path)
	}
	if err := ctx.Err(); err != nil {
		return Machine{}, err
	}

	if plan.UUID, err = newUUID(p.rand); err != nil {
		return Machine{}, err
	}
	if plan.Metadata, err = encodeMetadata(m); err != nil {
		return Machine{}, err
	}
	if def.Devices != nil && len(def.Devices.Interfaces) > 0 {
		if plan.TakenMACs, err = p.hostMACs(ctx); err != nil {
			return Machine{}, err
		}
	}
	if iso := p.opts.Isolation; iso != nil {
		plan.Isolation = &isolationPlan{Filter: iso.filter(), Policy: iso.policy()}
		if err := p.ensureCompositeFilters(ctx, &def, plan.Isolation.Filter); err != nil {
			return Machine{}, err
		}
	}
	cloneDef, unfiltered, release, err := p.reserveMACs(&def, plan)
	if err != nil {
		return Machine{}, err
	}
	if iso := p.opts.Isolation; iso != nil && len(unfiltered) > 0 && iso.policy() == UnfilteredWarn && iso.Warn != nil {
		iso.Warn(s.Image, unfiltered)
	}
	// Once defined, the domain's own XML holds the addresses.
	defer release()
	cloneDoc, err := cloneDef.Marshal()
	if err != nil {
		return Machine{}, fmt.Errorf("encode domain XML: %w", err)
	}
	if err := p.define(ctx, name, plan.UUID, cloneDoc); err != nil {
		return Machine{}, err
	}
	return m, nil
}

// checkSize refuses a negative size and a console directory libvirt
// cannot take.
func (s Spec) checkSize() error {
	if s.VCPUs < 0 || s.MemoryMiB < 0 || s.ScratchGiB < 0 {
		return fmt.Errorf("size %d vCPUs, %d MiB, scratch disk %d GiB: negative: %w", s.VCPUs, s.MemoryMiB, s.ScratchGiB, ErrInvalidSpec)
	}
	if s.ConsoleDir != "" && !filepath.IsAbs(s.ConsoleDir) {
		return fmt.Errorf("console directory %q: must be an absolute path: %w", s.ConsoleDir, ErrInvalidSpec)
	}
	return nil
}

// reserveMACs builds the clone's definition with MAC addresses that no
// other Clone in flight has chosen, and reserves them until release. It
// also returns the interfaces left unfiltered by the plan's isolation.
func (p *Provisioner) reserveMACs(image *libvirtxml.Domain, plan clonePlan) (*libvirtxml.Domain, []string, func(), error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	taken := make(map[string]bool, len(plan.TakenMACs)+len(p.pendingMACs))
	for mac := range plan.TakenMACs {
		taken[mac] = true
	}
	for mac := range p.pendingMACs {
		taken[mac] = true
	}
	plan.TakenMACs = taken
	def, unfiltered, err := cloneXML(image, plan)
	if err != nil {
		return nil, nil, nil, err
	}
	macs := domainMACs(def)
	for _, mac := range macs {
		p.pendingMACs[mac] = true
	}
	return def, unfiltered, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, mac := range macs {
			delete(p.pendingMACs, mac)
		}
	}, nil
}

// imageSettings reads the image's defaults from its metadata.
func (p *Provisioner) imageSettings(ctx context.Context, image libvirt.Domain) (imageSettings, error) {
	doc, err := call(ctx, p, func() (string, error) {
		return p.conn.DomainGetMetadata(image, int32(libvirt.DomainMetadataElement), libvirt.OptString{metadataNS}, libvirt.DomainAffectCurrent)
	})
	if isNoMetadata(err) {
		return imageSettings{}, nil
	}
	if err != nil {
		return imageSettings{}, fmt.Errorf("image metadata: %w", err)
	}
	s, err := decodeImageSettings(doc)
	if err != nil {
		return imageSettings{}, fmt.Errorf("%w: %w", err, ErrImageInvalid)
	}
	return s, nil
}

// checkAbsent returns an error wrapping ErrExists if domain name exists.
func (p *Provisioner) checkAbsent(ctx context.Context, name string) error {
	_, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	switch {
	case err == nil:
		return fmt.Errorf("domain %s: %w", name, ErrExists)
	case isNoDomain(err):
		return nil
	default:
		return fmt.Errorf("look up domain %s: %w", name, err)
	}
}

// define defines the domain, validating the XML against libvirt's schema
// where the daemon supports that.
func (p *Provisioner) define(ctx context.Context, name, uuid, doc string) error {
	defineWith := func(flags libvirt.DomainDefineFlags) error {
		_, err := mutate(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainDefineXMLFlags(doc, flags) })
		return err
	}
	err := defineWith(libvirt.DomainDefineValidate)
	if isUnsupportedFlags(err) {
		err = defineWith(0)
	}
	if err == nil {
		return nil
	}
	// The answer may be lost while the domain was defined; then it is
	// ours, and there is nothing to undo.
	dom, lerr := call(context.WithoutCancel(ctx), p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if lerr == nil && formatUUID(dom.UUID) == uuid {
		return nil
	}
	// Another Clone of the same job may have won the race since
	// checkAbsent; the new UUID keeps libvirt from redefining its domain.
	if lerr == nil {
		return fmt.Errorf("domain %s: %w", name, ErrExists)
	}
	return fmt.Errorf("define domain %s: %w", name, err)
}

func formatUUID(u libvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// stateName names a domain state for messages.
func stateName(state int32) string {
	switch libvirt.DomainState(state) {
	case libvirt.DomainRunning:
		return "running"
	case libvirt.DomainBlocked:
		return "blocked"
	case libvirt.DomainPaused:
		return "paused"
	case libvirt.DomainShutdown:
		return "shutting down"
	case libvirt.DomainCrashed:
		return "crashed"
	case libvirt.DomainPmsuspended:
		return "suspended"
	}
	return fmt.Sprintf("in state %d", state)
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

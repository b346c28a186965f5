package provision

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// ImagePart names the part of an image an ImageProblem is about, so that
// callers can say how to fix it.
type ImagePart string

// The parts of an image that InspectImage checks.
const (
	// PartName: the name starts with Prefix.
	PartName ImagePart = "name"
	// PartState: the image is not shut off.
	PartState ImagePart = "state"
	// PartSettings: the image's <stretchy:image> metadata is invalid.
	PartSettings ImagePart = "settings"
	// PartStorage: the definition, a writable disk or the NVRAM cannot be
	// cloned.
	PartStorage ImagePart = "storage"
)

// ImageProblem is one reason why Clone would refuse an image. Err wraps
// ErrImageInvalid (and ErrInvalidCloneMode or ErrReflinkUnsupported where
// they apply) and says what is wrong in Clone's words.
type ImageProblem struct {
	Part ImagePart
	Err  error
}

// Error returns the reason.
func (p ImageProblem) Error() string { return p.Err.Error() }

// Unwrap returns the reason, for errors.Is with the sentinels.
func (p ImageProblem) Unwrap() error { return p.Err }

// ImageDisk is a writable disk of an image, which each clone gets its own
// copy of.
type ImageDisk struct {
	// Target is the guest device name, e.g. "vda".
	Target string
	// Source is the disk's file, or pool/volume for a volume disk.
	Source string
	// Pool is the storage pool holding the disk's volume, empty if it is
	// outside every pool.
	Pool string
	// Format is the format clones are made from, e.g. "qcow2"; empty when
	// the disk's volume was not found.
	Format string
	// Allocation is the space, in bytes, the disk's volume takes in its
	// pool as libvirt reports it (a sparse file's written part): what a
	// copy clone's copy of it takes there.
	Allocation uint64
}

// ImageReport is what InspectImage found out about an image.
type ImageReport struct {
	Name string
	// Defined is false when no domain has the name.
	Defined bool
	// State is the domain's state as virsh names it: "shut off",
	// "running", "paused" …
	State string
	// CloneMode is the mode clones get unless a request names one: the
	// image's default from its metadata, else CloneLinked.
	CloneMode CloneMode
	// OS is the guest OS family the image declares, empty if it leaves it
	// to detection.
	OS string
	// Disks are the writable disks a clone copies, as far as they could be
	// read; read-only, shareable and CD-ROM disks are shared and not listed.
	Disks []ImageDisk
	// NVRAM is the path of the image's UEFI variable store; empty if the
	// image has none or it was never created (clones then get one from the
	// template).
	NVRAM string
	// NVRAMPool is the pool holding NVRAM, empty if it is outside every
	// pool. Clone accepts that and uploads a copy through libvirt into the
	// pool of the first disk.
	NVRAMPool string
	// Firmware is "efi" for UEFI guests, else "bios".
	Firmware string
	// VCPUs and MemoryMiB are the image's own size, which its clones get
	// unless a Spec gives another: the maximum vCPU count and <memory>,
	// in MiB rounded up. MemoryMiB is 0 when the definition has none.
	VCPUs     int
	MemoryMiB int
	// Generation changes whenever the image's definition or one of its
	// disks or NVRAM is replaced or rewritten: a hash of its inactive
	// definition and of each volume's path, capacity, allocation and
	// modification time. Empty when the image could not be read.
	Generation string
	// Problems are the reasons why Clone would refuse the image, in the
	// order Clone checks them; none means it can be cloned, as far as can
	// be told without creating anything.
	Problems []ImageProblem
}

// InspectImage checks, without creating or changing anything, whether
// Clone could clone image, with the same rules: the name must not start
// with Prefix, the domain must be shut off, its <stretchy:image> settings
// must be valid, and every writable disk must be a volume of a dir, fs or
// netfs pool that the image's clone mode can copy. What it cannot know
// without copying (whether a reflink pool's file system shares extents)
// is not checked. Like Clone, it may refresh a pool to find a disk file
// put into the pool's directory since its last refresh.
//
// It returns an error wrapping ErrImageNotFound if no domain has the
// name, one joining the problems (each wrapping ErrImageInvalid) if there
// are any, and other errors when libvirt could not be asked; the report
// holds what was found in every case.
func (p *Provisioner) InspectImage(ctx context.Context, name string) (ImageReport, error) {
	r, err := p.inspectImage(ctx, name)
	if err == nil && len(r.Problems) > 0 {
		errs := make([]error, len(r.Problems))
		for i, pr := range r.Problems {
			errs[i] = pr
		}
		err = errors.Join(errs...)
	}
	if err != nil {
		return r, fmt.Errorf("inspect image %s: %w", name, err)
	}
	return r, nil
}

func (p *Provisioner) inspectImage(ctx context.Context, name string) (ImageReport, error) {
	r := ImageReport{Name: name}
	problem := func(part ImagePart, err error) { r.Problems = append(r.Problems, ImageProblem{Part: part, Err: err}) }
	if strings.HasPrefix(name, Prefix) {
		problem(PartName, fmt.Errorf("image names must not start with %q: %w", Prefix, ErrImageInvalid))
	}
	image, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(name) })
	if isNoDomain(err) {
		return r, ErrImageNotFound
	}
	if err != nil {
		return r, fmt.Errorf("look up image: %w", err)
	}
	r.Defined = true
	state, err := call(ctx, p, func() (int32, error) {
		state, _, err := p.conn.DomainGetState(image, 0)
		return state, err
	})
	if err != nil {
		return r, fmt.Errorf("image state: %w", err)
	}
	r.State = "shut off"
	if libvirt.DomainState(state) != libvirt.DomainShutoff {
		r.State = stateName(state)
		problem(PartState, fmt.Errorf("image %s is %s; images must be shut off: %w", name, r.State, ErrImageInvalid))
	}
	// The same flags as Clone, so that a connection lacking the rights
	// Clone needs fails here too.
	doc, err := call(ctx, p, func() (string, error) {
		return p.conn.DomainGetXMLDesc(image, libvirt.DomainXMLInactive|libvirt.DomainXMLSecure)
	})
	if err != nil {
		return r, fmt.Errorf("image XML: %w", err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		problem(PartStorage, fmt.Errorf("parse image XML: %w: %w", err, ErrImageInvalid))
		return r, nil
	}
	settings, err := p.imageSettings(ctx, image)
	switch {
	case errors.Is(err, ErrImageInvalid):
		problem(PartSettings, err)
	case err != nil:
		return r, err
	}
	r.OS = settings.OS
	r.CloneMode = settings.CloneMode
	if r.CloneMode == "" {
		r.CloneMode = CloneLinked
	}
	r.Firmware = firmware(&def)
	if r.VCPUs, r.MemoryMiB, err = domainSize(&def); err != nil {
		problem(PartStorage, fmt.Errorf("size of the image: %w: %w", err, ErrImageInvalid))
	}
	stamps := []string{doc}
	if err := p.inspectStorage(ctx, &def, &r, problem, &stamps); err != nil {
		return r, err
	}
	r.Generation = generation(stamps)
	return r, nil
}

// generation hashes an image's inactive definition and its volumes'
// stamps, in the order of its writable disks and then its NVRAM: the
// image's Generation, which Clone computes the same way from what it read.
func generation(stamps []string) string {
	sum := sha256.Sum256([]byte(strings.Join(stamps, "\n")))
	return hex.EncodeToString(sum[:8])
}

// firmware tells UEFI guests from BIOS ones by their definition.
func firmware(def *libvirtxml.Domain) string {
	if def.OS != nil && (def.OS.Firmware == "efi" || def.OS.NVRam != nil ||
		def.OS.Loader != nil && def.OS.Loader.Type == "pflash") {
		return "efi"
	}
	return "bios"
}

// Pools returns the storage pools that hold the image's disks and NVRAM,
// sorted, each once: where its clones' volumes are created.
func (r ImageReport) Pools() []string {
	var pools []string
	for _, d := range r.Disks {
		if d.Pool != "" {
			pools = append(pools, d.Pool)
		}
	}
	if r.NVRAMPool != "" {
		pools = append(pools, r.NVRAMPool)
	}
	slices.Sort(pools)
	return slices.Compact(pools)
}

// ListImages inspects every domain on the host that could be an image: its
// name does not start with Prefix and keep accepts it. Domains undefined
// while it runs are left out. The reports are sorted by name; those
// without Problems can be cloned.
func (p *Provisioner) ListImages(ctx context.Context, keep func(name string) bool) ([]ImageReport, error) {
	doms, err := p.listDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []ImageReport
	for _, d := range doms {
		if strings.HasPrefix(d.Name, Prefix) || (keep != nil && !keep(d.Name)) {
			continue
		}
		r, err := p.inspectImage(ctx, d.Name)
		if errors.Is(err, ErrImageNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list images: inspect %s: %w", d.Name, err)
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b ImageReport) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// inspectStorage checks the image's writable disks and NVRAM disk by
// disk, with Clone's helpers, so that every disk's problem is reported
// rather than only the first one.
func (p *Provisioner) inspectStorage(ctx context.Context, def *libvirtxml.Domain, r *ImageReport, problem func(ImagePart, error), stamps *[]string) error {
	disks, err := writableDisks(def)
	if err != nil {
		problem(PartStorage, err)
		return nil
	}
	types := poolTypes{}
	for _, d := range disks {
		info := ImageDisk{Target: d.Target, Source: d.source()}
		src, err := p.resolveDisk(ctx, d, types)
		switch {
		case errors.Is(err, ErrImageInvalid):
			problem(PartStorage, err)
			r.Disks = append(r.Disks, info)
			continue
		case err != nil:
			return err
		}
		var ref *volumeRef
		if src != nil {
			ref = &src.ref
			info.Pool, info.Allocation = src.ref.Pool, src.allocation
			*stamps = append(*stamps, src.stamp)
		}
		// The job id only names the volumes Clone would create.
		plans, err := planDisks("inspect", []imageDisk{d}, []*volumeRef{ref}, r.CloneMode)
		if err != nil {
			problem(PartStorage, err)
		} else {
			info.Format = plans[0].Src.Format
		}
		r.Disks = append(r.Disks, info)
	}
	nvram, err := p.resolveNVRAM(ctx, def, types)
	switch {
	case errors.Is(err, ErrImageInvalid):
		problem(PartStorage, err)
		return nil
	case err != nil:
		return err
	}
	r.NVRAM = nvram.path
	if nvram.vol != nil {
		r.NVRAMPool = nvram.vol.ref.Pool
		*stamps = append(*stamps, nvram.vol.stamp)
	}
	if nvram.path != "" && nvram.vol == nil && len(disks) == 0 {
		// Clone's copyNVRAM has no pool to upload the copy into.
		problem(PartStorage, fmt.Errorf("NVRAM %s is in no pool and the image has no disk in a pool to put the copy in: %w", nvram.path, ErrImageInvalid))
	}
	return nil
}

// PoolReport describes a storage pool.
type PoolReport struct {
	Name string
	// Type is the pool type: "dir", "fs", "netfs", "logical" …
	Type string
	// Path is the pool's target path, such as its directory.
	Path string
	// Active says the pool is started; clones can only use active pools.
	Active bool
	// Capacity and Available are in bytes, as of the pool's last refresh;
	// libvirt reports zero for inactive pools.
	Capacity, Available uint64
}

// InspectPools returns every storage pool, active or not, sorted by name.
// It changes nothing.
func (p *Provisioner) InspectPools(ctx context.Context) ([]PoolReport, error) {
	all, err := call(ctx, p, func() ([]libvirt.StoragePool, error) {
		pools, _, err := p.conn.ConnectListAllStoragePools(1, 0)
		return pools, err
	})
	if err != nil {
		return nil, fmt.Errorf("inspect pools: list storage pools: %w", err)
	}
	active, err := p.activePools(ctx)
	if err != nil {
		return nil, fmt.Errorf("inspect pools: %w", err)
	}
	reports := make([]PoolReport, 0, len(all))
	for _, pool := range all {
		px, err := p.poolXML(ctx, pool)
		if isNoStoragePool(err) {
			continue // undefined meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("inspect pools: %w", err)
		}
		r := PoolReport{
			Name: pool.Name,
			Type: px.Type,
			Active: slices.ContainsFunc(active, func(a libvirt.StoragePool) bool {
				return a.UUID == pool.UUID
			}),
		}
		if px.Target != nil {
			r.Path = px.Target.Path
		}
		if px.Capacity != nil {
			r.Capacity, _ = volumeBytes(&libvirtxml.StorageVolumeSize{Unit: px.Capacity.Unit, Value: px.Capacity.Value})
		}
		if px.Available != nil {
			r.Available, _ = volumeBytes(&libvirtxml.StorageVolumeSize{Unit: px.Available.Unit, Value: px.Available.Value})
		}
		reports = append(reports, r)
	}
	slices.SortFunc(reports, func(a, b PoolReport) int { return strings.Compare(a.Name, b.Name) })
	return reports, nil
}

// IsAccessDenied reports whether err means libvirt refused the caller:
// the socket's file permissions, or libvirtd's authentication (polkit,
// SASL) or access control.
func IsAccessDenied(err error) bool {
	if errors.Is(err, fs.ErrPermission) { // EACCES, EPERM
		return true
	}
	return hasCode(err, libvirt.ErrAuthFailed, libvirt.ErrAuthCancelled, libvirt.ErrAuthUnavailable,
		libvirt.ErrAccessDenied, libvirt.ErrOperationDenied)
}

// RefreshPools asks libvirt to rescan every active pool, so that the free
// space InspectPools reports includes what guests wrote to their disks
// since. A pool that cannot be refreshed now (one with a copy running) is
// skipped; its figures are then those of its last refresh.
func (p *Provisioner) RefreshPools(ctx context.Context) error {
	pools, err := p.activePools(ctx)
	if err != nil {
		return fmt.Errorf("refresh pools: %w", err)
	}
	for _, pool := range pools {
		err := p.do(ctx, func() error { return p.conn.StoragePoolRefresh(pool, 0) })
		if err != nil && IsUnavailable(err) {
			return fmt.Errorf("refresh pool %s: %w", pool.Name, err)
		}
	}
	return nil
}

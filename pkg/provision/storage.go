package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// call runs fn, one or a few libvirt calls, bounded by the call timeout.
func call[T any](ctx context.Context, p *Provisioner, fn func() (T, error)) (T, error) {
	v, err := bounded(ctx, p.opts.Link, p.opts.CallTimeout, fn)
	p.unsure(err)
	return v, err
}

// unsure stops using the view after a call whose outcome is not known
// (libvirtd did not answer, the connection broke): what it did, or what
// libvirtd did meanwhile, is known again after Watch's next full check.
func (p *Provisioner) unsure(err error) {
	if IsUnavailable(err) {
		p.view.invalidate()
	}
}

// mutate is call for calls that create something the caller must know
// about to undo it: they are not abandoned when ctx is canceled, only on
// timeout, so callers check ctx themselves afterwards.
func mutate[T any](ctx context.Context, p *Provisioner, fn func() (T, error)) (T, error) {
	v, err := bounded(context.WithoutCancel(ctx), p.opts.Link, p.opts.CallTimeout, fn)
	p.unsure(err)
	return v, err
}

// do is call for calls that return only an error.
func (p *Provisioner) do(ctx context.Context, fn func() error) error {
	_, err := call(ctx, p, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}

// volume is a storage volume with its handles.
type volume struct {
	ref  volumeRef
	pool libvirt.StoragePool
	vol  libvirt.StorageVol
	// stamp changes when the volume's content is replaced: its path,
	// capacity, allocation and modification time as libvirt reports them.
	stamp string
	// allocation is the space the volume takes in its pool, in bytes.
	allocation uint64
}

// poolTypes caches pool types by pool name for one operation.
type poolTypes map[string]string

// describeVolume fills in a volumeRef for vol.
func (p *Provisioner) describeVolume(ctx context.Context, pool libvirt.StoragePool, vol libvirt.StorageVol, types poolTypes) (*volume, error) {
	doc, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetXMLDesc(vol, 0) })
	if err != nil {
		return nil, fmt.Errorf("volume %s/%s XML: %w", pool.Name, vol.Name, err)
	}
	var vx libvirtxml.StorageVolume
	if err := vx.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse volume %s/%s XML: %w", pool.Name, vol.Name, err)
	}
	capacity, err := volumeBytes(vx.Capacity)
	if err != nil {
		return nil, fmt.Errorf("capacity of volume %s/%s: %w", pool.Name, vol.Name, err)
	}
	v := &volume{pool: pool, vol: vol, ref: volumeRef{Pool: pool.Name, Name: vol.Name, Capacity: capacity}}
	var mtime string
	if vx.Target != nil {
		v.ref.Path = vx.Target.Path
		if vx.Target.Format != nil {
			v.ref.Format = vx.Target.Format.Type
		}
		if vx.Target.Timestamps != nil {
			mtime = vx.Target.Timestamps.Mtime
		}
	}
	var allocation uint64
	if vx.Allocation != nil {
		allocation, _ = volumeBytes(vx.Allocation)
	}
	v.stamp = fmt.Sprintf("%s/%s %d %d %s", pool.Name, vol.Name, capacity, allocation, mtime)
	v.allocation = allocation
	if v.ref.Path == "" {
		if v.ref.Path, err = call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) }); err != nil {
			return nil, fmt.Errorf("path of volume %s/%s: %w", pool.Name, vol.Name, err)
		}
	}
	if v.ref.PoolType, err = p.poolType(ctx, pool, types); err != nil {
		return nil, err
	}
	return v, nil
}

func (p *Provisioner) poolType(ctx context.Context, pool libvirt.StoragePool, types poolTypes) (string, error) {
	if t, ok := types[pool.Name]; ok {
		return t, nil
	}
	px, err := p.poolXML(ctx, pool)
	if err != nil {
		return "", err
	}
	types[pool.Name] = px.Type
	return px.Type, nil
}

func (p *Provisioner) poolXML(ctx context.Context, pool libvirt.StoragePool) (*libvirtxml.StoragePool, error) {
	doc, err := call(ctx, p, func() (string, error) { return p.conn.StoragePoolGetXMLDesc(pool, 0) })
	if err != nil {
		return nil, fmt.Errorf("pool %s XML: %w", pool.Name, err)
	}
	var px libvirtxml.StoragePool
	if err := px.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse pool %s XML: %w", pool.Name, err)
	}
	return &px, nil
}

// resolveDisk finds the pool volume behind an image disk; nil if a file
// disk's path is in no pool. A file put into a pool's directory after the
// pool's last refresh is found by refreshing that pool.
func (p *Provisioner) resolveDisk(ctx context.Context, d imageDisk, types poolTypes) (*volume, error) {
	if d.Path == "" {
		pool, err := call(ctx, p, func() (libvirt.StoragePool, error) { return p.conn.StoragePoolLookupByName(d.Pool) })
		if isNoStoragePool(err) {
			return nil, fmt.Errorf("disk %s: no storage pool %s: %w", d.Target, d.Pool, ErrImageInvalid)
		}
		if err != nil {
			return nil, fmt.Errorf("disk %s: look up pool %s: %w", d.Target, d.Pool, err)
		}
		vol, err := call(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolLookupByName(pool, d.Volume) })
		if isNoStorageVol(err) {
			return nil, fmt.Errorf("disk %s: no volume %s in pool %s: %w", d.Target, d.Volume, d.Pool, ErrImageInvalid)
		}
		if err != nil {
			return nil, fmt.Errorf("disk %s: look up volume %s/%s: %w", d.Target, d.Pool, d.Volume, err)
		}
		v, err := p.describeVolume(ctx, pool, vol, types)
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", d.Target, err)
		}
		return v, nil
	}
	v, err := p.volumeAt(ctx, d.Path, types)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Target, err)
	}
	if v == nil {
		if _, err := os.Stat(d.Path); errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("disk %s: %s does not exist: %w", d.Target, d.Path, ErrImageInvalid)
		}
	}
	return v, nil
}

// volumeAt returns the pool volume at path, nil if there is none.
func (p *Provisioner) volumeAt(ctx context.Context, path string, types poolTypes) (*volume, error) {
	lookup := func() (libvirt.StorageVol, error) { return p.conn.StorageVolLookupByPath(path) }
	vol, err := call(ctx, p, lookup)
	if isNoStorageVol(err) {
		pool, perr := call(ctx, p, func() (libvirt.StoragePool, error) {
			return p.conn.StoragePoolLookupByTargetPath(filepath.Dir(path))
		})
		if perr != nil {
			// No pool has that directory (or the driver cannot tell).
			return nil, nil
		}
		if err := p.do(ctx, func() error { return p.conn.StoragePoolRefresh(pool, 0) }); err != nil {
			return nil, fmt.Errorf("refresh pool %s to find %s: %w", pool.Name, path, err)
		}
		vol, err = call(ctx, p, lookup)
	}
	if isNoStorageVol(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up volume %s: %w", path, err)
	}
	pool, err := call(ctx, p, func() (libvirt.StoragePool, error) { return p.conn.StoragePoolLookupByVolume(vol) })
	if err != nil {
		return nil, fmt.Errorf("pool of volume %s: %w", path, err)
	}
	return p.describeVolume(ctx, pool, vol, types)
}

// createDiskVolume creates the volume that replaces one image disk.
func (p *Provisioner) createDiskVolume(ctx context.Context, mode CloneMode, plan diskPlan, src *volume) (libvirt.StorageVol, string, error) {
	vx := libvirtxml.StorageVolume{
		Name:       plan.Name,
		Capacity:   &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: plan.Src.Capacity},
		Allocation: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 0},
		Target: &libvirtxml.StorageVolumeTarget{
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: plan.Format},
		},
	}
	if mode == CloneLinked {
		vx.BackingStore = &libvirtxml.StorageVolumeBackingStore{
			Path:   plan.Src.Path,
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: plan.Src.Format},
		}
	}
	doc, err := vx.Marshal()
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("volume %s: encode XML: %w", plan.Name, err)
	}
	var vol libvirt.StorageVol
	if mode == CloneCopy {
		vol, err = bounded(ctx, p.opts.Link, p.opts.CopyTimeout, func() (libvirt.StorageVol, error) {
			return p.conn.StorageVolCreateXMLFrom(src.pool, doc, src.vol, 0)
		})
		p.unsure(err)
	} else {
		vol, err = mutate(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolCreateXML(src.pool, doc, 0) })
	}
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("create volume %s/%s: %w", src.pool.Name, plan.Name, p.taken(ctx, src.pool, plan.Name, err))
	}
	path, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) })
	if err == nil && mode == CloneReflink {
		err = reflinkInto(path, plan.Src.Path, src.pool.Name)
	}
	if err != nil {
		return libvirt.StorageVol{}, "", errors.Join(
			fmt.Errorf("volume %s/%s: %w", src.pool.Name, plan.Name, err),
			p.deleteVolumes(ctx, []libvirt.StorageVol{vol}))
	}
	backing := ""
	if mode == CloneLinked {
		backing = plan.Src.Path
	}
	p.view.putVolume(vol, path, backing)
	return vol, path, nil
}

// errVolumeTaken marks a volume creation that failed because a volume of
// that name exists, as libvirt confirms: the storage driver says so with
// ErrStorageVolExist, the test driver with a plain operation failure.
var errVolumeTaken = errors.New("a volume of that name exists")

// taken returns err, the failure to create volume name in pool, marked
// errVolumeTaken when the volume exists.
func (p *Provisioner) taken(ctx context.Context, pool libvirt.StoragePool, name string, err error) error {
	if hasCode(err, libvirt.ErrStorageVolExist) {
		return fmt.Errorf("%w: %w", errVolumeTaken, err)
	}
	if IsUnavailable(err) {
		return err
	}
	if _, lerr := call(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolLookupByName(pool, name) }); lerr == nil {
		return fmt.Errorf("%w: %w", errVolumeTaken, err)
	}
	return err
}

// createScratchVolume creates an empty, thin qcow2 volume of size bytes
// named name in pool.
func (p *Provisioner) createScratchVolume(ctx context.Context, pool libvirt.StoragePool, name string, size uint64) (libvirt.StorageVol, string, error) {
	vx := libvirtxml.StorageVolume{
		Name:       name,
		Capacity:   &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: size},
		Allocation: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 0},
		Target:     &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
	}
	doc, err := vx.Marshal()
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("scratch volume %s: encode XML: %w", name, err)
	}
	vol, err := mutate(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolCreateXML(pool, doc, 0) })
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("create scratch volume %s/%s: %w", pool.Name, name, p.taken(ctx, pool, name, err))
	}
	path, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) })
	if err != nil {
		return libvirt.StorageVol{}, "", errors.Join(
			fmt.Errorf("scratch volume %s/%s: path: %w", pool.Name, name, err),
			p.deleteVolumes(ctx, []libvirt.StorageVol{vol}))
	}
	p.view.putVolume(vol, path, "")
	return vol, path, nil
}

// reflinkInto replaces the contents of the volume file dst, which libvirt
// has just created (so that it knows the volume without a pool refresh,
// which fails while the pool has a copy running, and so that the name is
// taken atomically), by a reflink copy of src.
func reflinkInto(dst, src, pool string) error {
	if _, err := os.Stat(src); err != nil {
		return fmt.Errorf("pool %s is not on this host's file system (%w): %w: %w", pool, err, ErrReflinkUnsupported, ErrImageInvalid)
	}
	err := reflink(dst, src)
	if err == nil {
		return nil
	}
	if reflinkUnsupported(err) {
		return fmt.Errorf("pool %s is on %s, which cannot share extents (%w): %w: %w",
			pool, fsName(filepath.Dir(dst)), err, ErrReflinkUnsupported, ErrImageInvalid)
	}
	return fmt.Errorf("reflink %s: %w", src, err)
}

// nvramSource is the image's NVRAM as found on the host.
type nvramSource struct {
	// path is the image's NVRAM file; "" means the clone lets libvirt
	// create its own from the template.
	path string
	// vol is set when the file is a pool volume.
	vol *volume
	// size is the size of a file outside any pool.
	size int64
}

// resolveNVRAM finds the image's NVRAM file, in a pool or on the host.
func (p *Provisioner) resolveNVRAM(ctx context.Context, image *libvirtxml.Domain, types poolTypes) (nvramSource, error) {
	path := imageNVRAM(image)
	if path == "" {
		return nvramSource{}, nil
	}
	v, err := p.volumeAt(ctx, path, types)
	if err != nil {
		return nvramSource{}, fmt.Errorf("NVRAM: %w", err)
	}
	if v != nil {
		return nvramSource{path: path, vol: v}, nil
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		// Never started: libvirt makes the clone's own from the template.
		return nvramSource{}, nil
	}
	if err != nil {
		return nvramSource{}, fmt.Errorf("NVRAM %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nvramSource{}, fmt.Errorf("NVRAM %s is not a regular file: %w", path, ErrImageInvalid)
	}
	return nvramSource{path: path, size: fi.Size()}, nil
}

// copyNVRAM copies the image's NVRAM into a new volume of the job: into
// the NVRAM's own pool if it has one, else into pool (the pool of the
// first cloned disk), uploading the host file through libvirt.
func (p *Provisioner) copyNVRAM(ctx context.Context, jobID string, src nvramSource, pool *libvirt.StoragePool, format string) (libvirt.StorageVol, string, error) {
	name := nvramVolumeName(jobID)
	if format == "" {
		format = "raw"
	}
	vx := libvirtxml.StorageVolume{
		Name:       name,
		Allocation: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 0},
		Target:     &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: format}},
	}
	var vol libvirt.StorageVol
	var err error
	var into libvirt.StoragePool
	switch {
	case src.vol != nil:
		into = src.vol.pool
		vx.Capacity = &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: src.vol.ref.Capacity}
		doc, merr := vx.Marshal()
		if merr != nil {
			return libvirt.StorageVol{}, "", fmt.Errorf("NVRAM volume %s: encode XML: %w", name, merr)
		}
		vol, err = bounded(ctx, p.opts.Link, p.opts.CopyTimeout, func() (libvirt.StorageVol, error) {
			return p.conn.StorageVolCreateXMLFrom(into, doc, src.vol.vol, 0)
		})
		p.unsure(err)
	case pool != nil:
		into = *pool
		vx.Capacity = &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: uint64(src.size)}
		doc, merr := vx.Marshal()
		if merr != nil {
			return libvirt.StorageVol{}, "", fmt.Errorf("NVRAM volume %s: encode XML: %w", name, merr)
		}
		vol, err = mutate(ctx, p, func() (libvirt.StorageVol, error) { return p.conn.StorageVolCreateXML(into, doc, 0) })
		if err == nil {
			if uerr := p.upload(ctx, vol, src.path, src.size); uerr != nil {
				return libvirt.StorageVol{}, "", errors.Join(
					fmt.Errorf("NVRAM volume %s/%s: %w", into.Name, name, uerr),
					p.deleteVolumes(ctx, []libvirt.StorageVol{vol}))
			}
		}
	default:
		return libvirt.StorageVol{}, "", fmt.Errorf("NVRAM %s is in no pool and the image has no disk in a pool to put the copy in: %w", src.path, ErrImageInvalid)
	}
	if err != nil {
		return libvirt.StorageVol{}, "", fmt.Errorf("NVRAM volume %s/%s: %w", into.Name, name, p.taken(ctx, into, name, err))
	}
	path, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) })
	if err != nil {
		return libvirt.StorageVol{}, "", errors.Join(
			fmt.Errorf("NVRAM volume %s/%s: path: %w", into.Name, name, err),
			p.deleteVolumes(ctx, []libvirt.StorageVol{vol}))
	}
	p.view.putVolume(vol, path, "")
	return vol, path, nil
}

// upload writes the host file path into vol.
func (p *Provisioner) upload(ctx context.Context, vol libvirt.StorageVol, path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = bounded(ctx, p.opts.Link, p.opts.CopyTimeout, func() (struct{}, error) {
		return struct{}{}, p.conn.StorageVolUpload(vol, f, 0, uint64(size), 0)
	})
	p.unsure(err)
	return err
}

// deleteVolumes deletes volumes, for rolling back; volumes already gone
// are fine. It keeps going after ctx is done, bounded by the call timeout,
// but stops once libvirtd is unreachable: what is left then is found later
// by its name (ListOrphanVolumes).
func (p *Provisioner) deleteVolumes(ctx context.Context, vols []libvirt.StorageVol) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, vol := range vols {
		err := p.do(ctx, func() error { return p.conn.StorageVolDelete(vol, 0) })
		if err != nil && !isNoStorageVol(err) {
			errs = append(errs, fmt.Errorf("delete volume %s/%s: %w", vol.Pool, vol.Name, err))
			if IsUnavailable(err) {
				break
			}
			continue
		}
		p.view.dropVolumeNamed(vol)
	}
	return errors.Join(errs...)
}

// ownedVolumePath reports whether path has the file name Clone gives a
// volume of jobID: the domain name, a dash, and a rest without dashes
// (target and extension, or "nvram.fd"). Requiring the rest to be dash-free
// keeps job "a" from claiming the volumes of job "a-b".
func ownedVolumePath(jobID, path string) bool {
	rest, ok := strings.CutPrefix(filepath.Base(path), DomainName(jobID)+"-")
	return ok && rest != "" && !strings.Contains(rest, "-")
}

// VolumeKey returns the key of the machine (a job id, or a warm machine's
// key) a volume path or name belongs to by this package's naming rule, and
// false if it follows no machine's rule. It lets a reconciler map the
// result of ListOrphanVolumes to Remove calls.
func VolumeKey(path string) (string, bool) {
	rest, ok := strings.CutPrefix(filepath.Base(path), Prefix)
	if !ok {
		return "", false
	}
	i := strings.LastIndex(rest, "-")
	if i <= 0 || i == len(rest)-1 {
		return "", false
	}
	key := rest[:i]
	return key, messages.ValidMachineKey(key)
}

// poolVolume is a volume found by scanning the pools.
type poolVolume struct {
	vol  libvirt.StorageVol
	path string
}

// scanVolumes lists the volumes of every active pool whose names satisfy
// keep, with their paths.
func (p *Provisioner) scanVolumes(ctx context.Context, keep func(name string) bool) ([]poolVolume, error) {
	pools, err := p.activePools(ctx)
	if err != nil {
		return nil, err
	}
	var found []poolVolume
	for _, pool := range pools {
		vols, err := call(ctx, p, func() ([]libvirt.StorageVol, error) {
			vols, _, err := p.conn.StoragePoolListAllVolumes(pool, 1, 0)
			return vols, err
		})
		if isNoStoragePool(err) {
			continue // gone meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("list volumes of pool %s: %w", pool.Name, err)
		}
		for _, vol := range vols {
			if !keep(vol.Name) {
				continue
			}
			path, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetPath(vol) })
			if isNoStorageVol(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("path of volume %s/%s: %w", pool.Name, vol.Name, err)
			}
			found = append(found, poolVolume{vol: vol, path: path})
		}
	}
	return found, nil
}

func (p *Provisioner) activePools(ctx context.Context) ([]libvirt.StoragePool, error) {
	pools, err := call(ctx, p, func() ([]libvirt.StoragePool, error) {
		pools, _, err := p.conn.ConnectListAllStoragePools(1, libvirt.ConnectListStoragePoolsActive)
		return pools, err
	})
	if err != nil {
		return nil, fmt.Errorf("list storage pools: %w", err)
	}
	return pools, nil
}

// removeOrphans deletes the volumes named for jobID, which must have no
// domain: what a Clone that crashed between creating volumes and defining
// the domain left behind. Volumes something still uses are kept and named
// in the error.
func (p *Provisioner) removeOrphans(ctx context.Context, jobID string) (removed []string, err error) {
	owned := func(name string) bool { return ownedVolumePath(jobID, name) }
	var found []poolVolume
	if p.view.use() {
		found = p.view.volumesOf(owned)
	} else if found, err = p.scanVolumes(ctx, owned); err != nil {
		return nil, err
	}
	if len(found) == 0 {
		return nil, nil
	}
	del, kept, err := p.unused(ctx, "", found)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, v := range del {
		err := p.do(ctx, func() error { return p.conn.StorageVolDelete(v.vol, 0) })
		if err != nil && !isNoStorageVol(err) {
			errs = append(errs, fmt.Errorf("delete orphan volume %s: %w", v.path, err))
			continue
		}
		p.view.dropVolume(v.path)
		removed = append(removed, v.path)
	}
	if len(kept) > 0 {
		errs = append(errs, fmt.Errorf("kept orphan volumes %s named for job %s: in use", strings.Join(kept, ", "), jobID))
	}
	return removed, errors.Join(errs...)
}

// ListOrphanVolumes returns the paths of volumes in active pools that are
// named for a job (see VolumeJobID) whose domain does not exist, and that
// nothing uses: volumes of a Clone that crashed before defining its domain.
// Volumes of a Clone in progress are among them until its domain is
// defined, so a reconciler skips the jobs it has in flight; Remove(job)
// deletes the others.
func (p *Provisioner) ListOrphanVolumes(ctx context.Context) ([]string, error) {
	doms, err := p.listDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("list orphan volumes: %w", err)
	}
	defined := make(map[string]bool, len(doms))
	for _, d := range doms {
		defined[d.Name] = true
	}
	found, err := p.scanVolumes(ctx, func(name string) bool {
		job, ok := VolumeKey(name)
		return ok && !defined[DomainName(job)]
	})
	if err != nil {
		return nil, fmt.Errorf("list orphan volumes: %w", err)
	}
	orphans, _, err := p.unused(ctx, "", found)
	if err != nil {
		return nil, fmt.Errorf("list orphan volumes: %w", err)
	}
	paths := make([]string, 0, len(orphans))
	for _, v := range orphans {
		paths = append(paths, v.path)
	}
	return paths, nil
}

func (p *Provisioner) listDomains(ctx context.Context) ([]libvirt.Domain, error) {
	doms, err := call(ctx, p, func() ([]libvirt.Domain, error) {
		doms, _, err := p.conn.ConnectListAllDomains(1, 0)
		return doms, err
	})
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	return doms, nil
}

// domainDefs returns what the definitions of every domain but skip say:
// the persistent one and, for running domains, the live one too, which has
// the disks' backing chains and hot-plugged devices.
func (p *Provisioner) domainDefs(ctx context.Context, skip string) ([]domainFacts, error) {
	doms, err := p.listDomains(ctx)
	if err != nil {
		return nil, err
	}
	var defs []domainFacts
	for _, dom := range doms {
		if dom.Name == skip {
			continue
		}
		flags := []libvirt.DomainXMLFlags{libvirt.DomainXMLInactive}
		if dom.ID > 0 {
			flags = append(flags, 0)
		}
		for _, f := range flags {
			doc, err := call(ctx, p, func() (string, error) { return p.conn.DomainGetXMLDesc(dom, f) })
			if isNoDomain(err) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("domain %s XML: %w", dom.Name, err)
			}
			def, err := p.domains.get(doc, parseDomainFacts)
			if err != nil {
				return nil, fmt.Errorf("parse domain %s XML: %w", dom.Name, err)
			}
			defs = append(defs, def)
		}
	}
	return defs, nil
}

// hostMACs returns the MAC addresses of every domain on the host.
func (p *Provisioner) hostMACs(ctx context.Context) (map[string]bool, error) {
	if p.view.use() {
		return p.view.macs(), nil
	}
	defs, err := p.domainDefs(ctx, "")
	if err != nil {
		return nil, err
	}
	macs := make(map[string]bool)
	for _, def := range defs {
		for _, mac := range def.macs {
			macs[mac] = true
		}
	}
	return macs, nil
}

// storageSet holds storage in use.
type storageSet struct {
	paths   map[string]bool
	volumes map[[2]string]bool // pool, volume
	// users names a user of each path, for messages.
	users map[string]string
}

func (s storageSet) has(v poolVolume) (string, bool) {
	if s.paths[v.path] {
		return s.users[v.path], true
	}
	if s.volumes[[2]string{v.vol.Pool, v.vol.Name}] {
		return "domain", true
	}
	return "", false
}

func (s storageSet) addPath(path, user string) {
	if path != "" && !s.paths[path] {
		s.paths[path] = true
		s.users[path] = user
	}
}

func (s storageSet) addSource(src *libvirtxml.DomainDiskSource, user string) {
	switch {
	case src == nil:
	case src.File != nil:
		s.addPath(src.File.File, user)
	case src.Block != nil:
		s.addPath(src.Block.Dev, user)
	case src.Volume != nil:
		s.volumes[[2]string{src.Volume.Pool, src.Volume.Volume}] = true
	}
}

// storageUse collects the storage in use by every domain but skip (disks,
// their backing chains as far as libvirt reports them, NVRAM) and the
// backing stores of every volume in an active pool except the candidates.
func (p *Provisioner) storageUse(ctx context.Context, skip string, candidates []poolVolume) (storageSet, error) {
	if p.view.use() {
		if err := p.readNewVolumes(ctx, candidates); err != nil {
			return storageSet{}, err
		}
		return p.view.storageUse(skip, candidates), nil
	}
	set := storageSet{paths: make(map[string]bool), volumes: make(map[[2]string]bool), users: make(map[string]string)}
	defs, err := p.domainDefs(ctx, skip)
	if err != nil {
		return set, err
	}
	for _, def := range defs {
		user := "domain " + def.name
		if def.nvram != "" {
			set.addPath(def.nvram, user)
		}
		for _, src := range def.sources {
			set.addSource(src, user)
		}
	}
	self := make(map[string]bool, len(candidates))
	for _, c := range candidates {
		self[c.path] = true
	}
	all, err := p.scanVolumes(ctx, func(string) bool { return true })
	if err != nil {
		return set, err
	}
	for _, v := range all {
		if self[v.path] {
			continue
		}
		doc, err := call(ctx, p, func() (string, error) { return p.conn.StorageVolGetXMLDesc(v.vol, 0) })
		if isNoStorageVol(err) {
			continue
		}
		if err != nil {
			return set, fmt.Errorf("volume %s XML: %w", v.path, err)
		}
		f, err := p.volumes.get(doc, parseVolumeFacts)
		if err != nil {
			return set, fmt.Errorf("parse volume %s XML: %w", v.path, err)
		}
		set.addPath(f.backing, "volume "+v.path)
	}
	return set, nil
}

// unused splits candidates into those nothing but the domain skip uses and
// the paths of the others, with their users.
func (p *Provisioner) unused(ctx context.Context, skip string, candidates []poolVolume) (del []poolVolume, kept []string, err error) {
	if len(candidates) == 0 {
		return nil, nil, nil
	}
	use, err := p.storageUse(ctx, skip, candidates)
	if err != nil {
		return nil, nil, err
	}
	for _, c := range candidates {
		if user, ok := use.has(c); ok {
			kept = append(kept, c.path+" (used by "+user+")")
			continue
		}
		del = append(del, c)
	}
	return del, kept, nil
}

// readNewVolumes reads into the view the volumes of the candidates' pools
// that it does not know: one list per pool, and a read of each volume
// another program created through libvirt since Watch's last check, so
// that nothing it uses is deleted.
func (p *Provisioner) readNewVolumes(ctx context.Context, candidates []poolVolume) error {
	n := p.view.begin()
	defer p.view.end(n)
	seen := map[string]bool{}
	var known map[[2]string]bool
	for _, c := range candidates {
		if seen[c.vol.Pool] {
			continue
		}
		seen[c.vol.Pool] = true
		pool, err := call(ctx, p, func() (libvirt.StoragePool, error) { return p.conn.StoragePoolLookupByName(c.vol.Pool) })
		if isNoStoragePool(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("look up pool %s: %w", c.vol.Pool, err)
		}
		vols, err := call(ctx, p, func() ([]libvirt.StorageVol, error) {
			vols, _, err := p.conn.StoragePoolListAllVolumes(pool, 1, 0)
			return vols, err
		})
		if isNoStoragePool(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("list volumes of pool %s: %w", pool.Name, err)
		}
		if known == nil {
			known = p.view.volumeNames()
		}
		for _, vol := range vols {
			if known[[2]string{vol.Pool, vol.Name}] {
				continue
			}
			e, found, err := p.volumeFactsOf(ctx, vol)
			if err != nil {
				return err
			}
			if found {
				p.view.readVolume(n, e)
			}
		}
	}
	return nil
}

package provision

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// The size of a machine: how many vCPUs and how much memory its
// definition gives it, and how a clone's definition is changed to give it
// another size. Like the rest of cloneXML, pure functions on libvirtxml
// structs.

// memoryKiB converts a domain memory value to KiB, rounding up. Domain
// memory without a unit is in KiB; the units are libvirt's (k and KiB are
// 1024, KB is 1000, and so on).
func memoryKiB(value uint, unit string) (uint64, error) {
	if unit == "" {
		unit = "KiB"
	}
	mult, ok := sizeUnits[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("unknown memory unit %q", unit)
	}
	return (uint64(value)*mult + 1023) / 1024, nil
}

// domainSize returns the vCPUs and the memory, in MiB rounded up, that
// def gives its guest: the maximum vCPU count (a guest may bring offline
// vCPUs online) and <memory>, which includes memory devices. A definition
// without <vcpu> has one vCPU, as libvirt reads it.
func domainSize(def *libvirtxml.Domain) (vcpus, memoryMiB int, err error) {
	vcpus = 1
	if def.VCPU != nil && def.VCPU.Value > 0 {
		vcpus = int(def.VCPU.Value)
	}
	if def.Memory == nil {
		return vcpus, 0, errors.New("the definition has no <memory>")
	}
	kib, err := memoryKiB(def.Memory.Value, def.Memory.Unit)
	if err != nil {
		return 0, 0, err
	}
	return vcpus, int((kib + 1023) / 1024), nil
}

// resize gives the clone definition d vcpus vCPUs and memoryMiB MiB of
// memory; 0 keeps the image's. What the image states about its own size
// is adjusted or dropped where it would contradict the new one; a size
// the image's layout cannot take wraps ErrImageInvalid.
func resize(d *libvirtxml.Domain, vcpus, memoryMiB int) error {
	if vcpus < 0 || memoryMiB < 0 {
		return fmt.Errorf("size %d vCPUs, %d MiB: negative", vcpus, memoryMiB)
	}
	oldVCPUs, oldMiB, err := domainSize(d)
	if err != nil && memoryMiB > 0 {
		return fmt.Errorf("memory of the image: %w: %w", err, ErrImageInvalid)
	}
	if vcpus > 0 && vcpus != oldVCPUs {
		if err := resizeVCPUs(d, vcpus); err != nil {
			return err
		}
	}
	if memoryMiB > 0 && memoryMiB != oldMiB {
		if err := resizeMemory(d, memoryMiB); err != nil {
			return err
		}
	}
	return nil
}

// resizeVCPUs gives d n vCPUs, all online. The CPU topology is changed to
// n vCPUs keeping as much of the image's as fits (a one-socket guest, as
// Windows client editions want, stays one socket); NUMA cells share the
// vCPUs out evenly; per-vCPU settings (<vcpus>, and <cputune> entries
// naming a vCPU from n on) are dropped.
func resizeVCPUs(d *libvirtxml.Domain, n int) error {
	vcpu := libvirtxml.DomainVCPU{Value: uint(n)}
	if d.VCPU != nil {
		// Host CPUs the vCPUs may run on: the host's business, kept.
		vcpu.Placement, vcpu.CPUSet = d.VCPU.Placement, d.VCPU.CPUSet
	}
	d.VCPU = &vcpu
	d.VCPUs = nil
	if d.CPU != nil {
		if d.CPU.Topology != nil {
			t := fitTopology(*d.CPU.Topology, n)
			d.CPU.Topology = &t
		}
		if d.CPU.Numa != nil && len(d.CPU.Numa.Cell) > 0 {
			cells := d.CPU.Numa.Cell
			if n < len(cells) {
				return fmt.Errorf("%d vCPUs for an image with %d NUMA cells: each cell needs one: %w", n, len(cells), ErrImageInvalid)
			}
			first := 0
			for i := range cells {
				count := n / len(cells)
				if i < n%len(cells) {
					count++
				}
				cells[i].CPUs = cpuRange(first, first+count-1)
				first += count
			}
		}
	}
	if t := d.CPUTune; t != nil {
		t.VCPUPin = slices.DeleteFunc(t.VCPUPin, func(p libvirtxml.DomainCPUTuneVCPUPin) bool { return int(p.VCPU) >= n })
		t.VCPUSched = slices.DeleteFunc(t.VCPUSched, func(s libvirtxml.DomainCPUTuneVCPUSched) bool { return !cpusetBelow(s.VCPUs, n) })
		t.CacheTune = slices.DeleteFunc(t.CacheTune, func(c libvirtxml.DomainCPUCacheTune) bool { return !cpusetBelow(c.VCPUs, n) })
		t.MemoryTune = slices.DeleteFunc(t.MemoryTune, func(m libvirtxml.DomainCPUMemoryTune) bool { return !cpusetBelow(m.VCPUs, n) })
	}
	return nil
}

// fitTopology returns a topology of n vCPUs close to t: t with as many
// cores per socket as make n, if n divides evenly by sockets, dies,
// clusters and threads; else one socket of n/threads cores of t's
// threads; else one socket of n single-threaded cores. Counts t leaves
// out stay out.
func fitTopology(t libvirtxml.DomainCPUTopology, n int) libvirtxml.DomainCPUTopology {
	one := func(v int) int { return max(v, 1) }
	others := one(t.Sockets) * one(t.Dies) * one(t.Clusters) * one(t.Threads)
	if n%others == 0 {
		t.Cores = n / others
		return t
	}
	set := func(v int) int {
		if v == 0 {
			return 0
		}
		return 1
	}
	t.Sockets, t.Dies, t.Clusters = 1, set(t.Dies), set(t.Clusters)
	if n%one(t.Threads) == 0 {
		t.Cores = n / one(t.Threads)
		return t
	}
	t.Cores, t.Threads = n, 1
	return t
}

// cpuRange writes the vCPUs first to last as a libvirt CPU list.
func cpuRange(first, last int) string {
	if first == last {
		return strconv.Itoa(first)
	}
	return strconv.Itoa(first) + "-" + strconv.Itoa(last)
}

// cpusetBelow reports whether every CPU in the libvirt CPU list s
// ("0-3,^2,6") is below n. An empty list names no CPU; one that does not
// parse is not below anything.
func cpusetBelow(s string, n int) bool {
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" || strings.HasPrefix(part, "^") {
			// Exclusions only remove CPUs.
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		if !isRange {
			hi = lo
		}
		a, err1 := strconv.Atoi(strings.TrimSpace(lo))
		b, err2 := strconv.Atoi(strings.TrimSpace(hi))
		if err1 != nil || err2 != nil || a < 0 || b < a || b >= n {
			return false
		}
	}
	return true
}

// resizeMemory gives d mib MiB of RAM. It replaces all of the image's RAM:
// hot-plugged RAM devices (dimm, virtio-mem) are dropped, NUMA cells share
// the memory out evenly, <currentMemory> (a balloon target) is the whole
// of it, and <memtune> limits, which were sized for the image's memory,
// are dropped. Memory devices that are not RAM (nvdimm, virtio-pmem,
// sgx-epc) stay, counted in <memory> as libvirt wants, and keep
// <maxMemory>, raised to fit; without them <maxMemory> goes too.
func resizeMemory(d *libvirtxml.Domain, mib int) error {
	ram := uint64(mib) << 10 // KiB
	var devices uint64
	if d.Devices != nil {
		var kept []libvirtxml.DomainMemorydev
		for _, m := range d.Devices.Memorydevs {
			if m.Model == "dimm" || m.Model == "virtio-mem" {
				continue
			}
			if m.Target != nil && m.Target.Size != nil {
				kib, err := memoryKiB(m.Target.Size.Value, m.Target.Size.Unit)
				if err != nil {
					return fmt.Errorf("memory device %s: %w: %w", m.Model, err, ErrImageInvalid)
				}
				devices += kib
			}
			kept = append(kept, m)
		}
		d.Devices.Memorydevs = kept
	}
	total := ram + devices
	d.Memory = &libvirtxml.DomainMemory{Value: uint(total), Unit: "KiB", DumpCore: memoryDumpCore(d.Memory)}
	d.CurrentMemory = &libvirtxml.DomainCurrentMemory{Value: uint(total), Unit: "KiB"}
	d.MemoryTune = nil
	switch {
	case d.MaximumMemory == nil:
	case d.Devices == nil || len(d.Devices.Memorydevs) == 0:
		d.MaximumMemory = nil
	default:
		maxKiB, err := memoryKiB(d.MaximumMemory.Value, d.MaximumMemory.Unit)
		if err != nil {
			return fmt.Errorf("maxMemory: %w: %w", err, ErrImageInvalid)
		}
		if maxKiB < total {
			d.MaximumMemory = &libvirtxml.DomainMaxMemory{Value: uint(total), Unit: "KiB", Slots: d.MaximumMemory.Slots}
		}
	}
	if d.CPU != nil && d.CPU.Numa != nil && len(d.CPU.Numa.Cell) > 0 {
		cells := d.CPU.Numa.Cell
		if mib < len(cells) {
			return fmt.Errorf("%d MiB for an image with %d NUMA cells: %w", mib, len(cells), ErrImageInvalid)
		}
		for i := range cells {
			share := mib / len(cells)
			if i < mib%len(cells) {
				share++
			}
			cells[i].Memory, cells[i].Unit = uint(share), "MiB"
		}
	}
	return nil
}

func memoryDumpCore(m *libvirtxml.DomainMemory) string {
	if m == nil {
		return ""
	}
	return m.DumpCore
}

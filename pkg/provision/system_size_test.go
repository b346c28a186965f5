package provision

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// Tests of machine sizes and scratch disks on the real
// libvirtd with the tiny guest under TCG.

// memTotalSlackMiB is how much less than its memory the tiny guest's
// kernel may report as MemTotal in /proc/meminfo: MemTotal counts only
// the pages the kernel hands to its allocator, so it leaves out what the
// firmware's memory map reserves (below 1 MiB), the kernel's own code and
// data, and what it reserves while it boots (memblock: the initramfs
// until it is freed, the struct page array of about 1.6 % of memory,
// page tables, the crash and DMA reservations). Debian 12's kernel in a
// 256 MiB guest reports about 50 MiB less; a guest given the image's 128
// MiB would report less than 128.
const memTotalSlackMiB = 64

// TestSystemSizedClone boots a clone of the tiny guest with 2 vCPUs, 256
// MiB and a 1 GiB scratch disk and asks the guest, through its agent, what
// it got; Remove deletes the scratch disk.
func TestSystemSizedClone(t *testing.T) {
	l := systemConn(t)
	ctx := t.Context()
	if r, err := New(l, Options{}).InspectImage(ctx, testImage()); err != nil || r.VCPUs != 1 || r.MemoryMiB != 128 {
		t.Fatalf("InspectImage = %d vCPUs, %d MiB, %v; want the tiny guest's 1 and 128", r.VCPUs, r.MemoryMiB, err)
	}
	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	m := clone(t, p, Spec{Host: testHost, JobID: job, Image: testImage(), RunnerKind: "none", VCPUs: 2, MemoryMiB: 256, ScratchGiB: 1})
	if m.VCPUs != 2 || m.MemoryMiB != 256 {
		t.Fatalf("machine %+v; want 2 vCPUs, 256 MiB", m)
	}
	scratch := m.Volumes[len(m.Volumes)-1]
	if err := p.Start(ctx, job); err != nil {
		t.Fatalf("Start: %v", err)
	}
	dom := waitAgent(t, l, m.Name, 120*time.Second)

	code, out := guestExec(t, l, dom, "/bin/sh", "-c", "grep -c ^processor /proc/cpuinfo")
	if code != 0 || strings.TrimSpace(out) != "2" {
		t.Errorf("processors in /proc/cpuinfo: exit %d, %q; want 2", code, out)
	}
	code, out = guestExec(t, l, dom, "/bin/sh", "-c", "sed -n 's/^MemTotal: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo")
	kib, err := strconv.Atoi(strings.TrimSpace(out))
	if code != 0 || err != nil {
		t.Fatalf("MemTotal: exit %d, %q, %v", code, out, err)
	}
	if kib > 256<<10 || kib < (256-memTotalSlackMiB)<<10 {
		t.Errorf("MemTotal %d kB; want at most 256 MiB and at least %d MiB", kib, 256-memTotalSlackMiB)
	}
	code, out = guestExec(t, l, dom, "/bin/sh", "-c", "cat /sys/block/vdb/size /sys/block/vdb/serial")
	fields := strings.Fields(out)
	if code != 0 || len(fields) != 2 || fields[0] != strconv.Itoa(1<<30/512) || fields[1] != scratchSerial {
		t.Errorf("vdb: exit %d, %q; want %d sectors of 512 bytes and serial %s", code, out, 1<<30/512, scratchSerial)
	}
	t.Logf("guest: 2 processors, MemTotal %d kB (%d kB less than 256 MiB), vdb %s", kib, 256<<10-kib, strings.Join(fields, " "))

	if existed, err := p.Remove(ctx, job); err != nil || !existed {
		t.Fatalf("Remove = %v, %v", existed, err)
	}
	if _, err := l.StorageVolLookupByPath(scratch); !isNoStorageVol(err) {
		t.Errorf("scratch volume %s after Remove: %v", scratch, err)
	}
}

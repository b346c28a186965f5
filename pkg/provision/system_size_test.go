package provision

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Tests of machine sizes, scratch disks and console logs on the real
// libvirtd with the tiny guest under TCG.

// memTotalSlackMiB is how much less than its memory the tiny guest's
// kernel may report as MemTotal in /proc/meminfo: MemTotal counts only
// the pages the kernel hands to its allocator, so it leaves out what the
// firmware's memory map reserves (below 1 MiB), the kernel's own code and
// data, and what it reserves while it boots (memblock: the initramfs
// until it is freed, the struct page array of about 1.6 % of memory,
// page tables, the crash and DMA reservations). Debian 12's kernel in a
// 256 MiB guest reports about 50 MiB less; a guest given the image's 128
// MiB would report less than 128. The total the kernel saw is checked
// exactly, from its "Memory: available/total" boot line.
const memTotalSlackMiB = 64

// consoleDir returns a directory for console logs that virtlogd (root on
// the test machine) can write and the test can read.
func consoleDir(t *testing.T) string {
	t.Helper()
	return t.TempDir()
}

// waitConsole waits until the log at path holds want, and returns it.
func waitConsole(t *testing.T, path, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(path)
		if err == nil && strings.Contains(string(b), want) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console log %s does not show %q after %v (%v):\n%s", path, want, timeout, err, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kernelMemory matches the kernel's boot line on memory, as in
// "Memory: 201124K/261752K available (…)": available and total KiB.
var kernelMemory = regexp.MustCompile(`Memory: (\d+)K/(\d+)K available`)

// TestSystemSizedClone boots a clone of the tiny guest with 2 vCPUs, 256
// MiB and a 1 GiB scratch disk and asks the guest, through its agent, what
// it got; the clone's console log holds the kernel's boot lines, and
// Remove deletes it with the scratch disk. The image is the tiny guest
// without "quiet" on its kernel command line, so that the kernel prints
// them.
func TestSystemSizedClone(t *testing.T) {
	l := systemConn(t)
	ctx := t.Context()
	img := defineTestImage(t, l, imageShape{cmdline: "console=ttyS0 root=/dev/vda rw panic=1"})
	if r, err := New(l, Options{}).InspectImage(ctx, img.Name); err != nil || r.VCPUs != 1 || r.MemoryMiB != 128 {
		t.Fatalf("InspectImage = %d vCPUs, %d MiB, %v; want the tiny guest's 1 and 128", r.VCPUs, r.MemoryMiB, err)
	}
	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	dir := consoleDir(t)
	m := clone(t, p, Spec{Host: testHost, JobID: job, Image: img.Name, RunnerKind: "none",
		VCPUs: 2, MemoryMiB: 256, ScratchGiB: 1, ConsoleDir: dir})
	log, err := ConsoleLogPath(dir, job)
	if err != nil {
		t.Fatal(err)
	}
	if m.VCPUs != 2 || m.MemoryMiB != 256 || len(m.ConsoleLogs) != 1 || m.ConsoleLogs[0] != log {
		t.Fatalf("machine %+v; want 2 vCPUs, 256 MiB, the console log %s", m, log)
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

	text := waitConsole(t, log, "Linux version", 30*time.Second)
	mem := kernelMemory.FindStringSubmatch(text)
	if mem == nil {
		t.Fatalf("no Memory: line in the console log:\n%s", text)
	}
	// The total is the RAM the firmware's map gives the kernel: all of it
	// but the holes below 1 MiB.
	if total, _ := strconv.Atoi(mem[2]); total > 256<<10 || total < 255<<10 {
		t.Errorf("the kernel saw %s KiB of memory; want 256 MiB less at most 1 MiB", mem[2])
	}
	t.Logf("guest: 2 processors, kernel %s, MemTotal %d kB (%d kB less than 256 MiB), vdb %s; console log %d bytes",
		mem[0], kib, 256<<10-kib, strings.Join(fields, " "), len(text))
	tail, err := ConsoleTail(log, 40, 4096)
	if err != nil || !strings.Contains(tail, "BusyBox") {
		t.Errorf("ConsoleTail = %q, %v; want the end of the boot, the shell's banner", tail, err)
	}

	if existed, err := p.Remove(ctx, job); err != nil || !existed {
		t.Fatalf("Remove = %v, %v", existed, err)
	}
	if _, err := os.Stat(log); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("console log after Remove: %v", err)
	}
	if _, err := l.StorageVolLookupByPath(scratch); !isNoStorageVol(err) {
		t.Errorf("scratch volume %s after Remove: %v", scratch, err)
	}
}

// panicImage names the variant of the tiny guest whose init fails at
// once (test/guest/README.md).
func panicImage() string {
	if name := os.Getenv("STRETCHY_TEST_PANIC_IMAGE"); name != "" {
		return name
	}
	return "tiny-linux-panic"
}

// TestSystemPanicConsole boots a clone of the panic variant: it stops by
// itself, and its console log holds the variant's message and the kernel's
// panic.
func TestSystemPanicConsole(t *testing.T) {
	l := systemConn(t)
	ctx := t.Context()
	if _, err := l.DomainLookupByName(panicImage()); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("image %s not defined (go tool task image builds it): %v", panicImage(), err)
		}
		t.Skipf("image %s not defined (go tool task image builds it); set STRETCHY_TEST_PANIC_IMAGE", panicImage())
	}
	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	dir := consoleDir(t)
	m := clone(t, p, Spec{Host: testHost, JobID: job, Image: panicImage(), RunnerKind: "none", ConsoleDir: dir})
	if err := p.Start(ctx, job); err != nil {
		t.Fatalf("Start: %v", err)
	}
	wait, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for domainState(t, l, m.Name) != libvirt.DomainShutoff {
		select {
		case <-wait.Done():
			t.Fatalf("%s still runs after 60s; the panic variant should stop by itself", m.Name)
		case <-tick.C:
		}
	}
	// As a failed event carries it.
	tail, err := ConsoleTail(m.ConsoleLogs[0], messages.MaxConsoleLines, messages.MaxConsoleBytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"STRETCHY-TEST-PANIC", "Kernel panic - not syncing"} {
		if !strings.Contains(tail, want) {
			t.Errorf("console tail does not show %q:\n%s", want, tail)
		}
	}
	t.Logf("console tail:\n%s", tail)
	if existed, err := p.Remove(ctx, job); err != nil || !existed {
		t.Fatalf("Remove = %v, %v", existed, err)
	}
	if _, err := os.Stat(m.ConsoleLogs[0]); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("console log after Remove: %v", err)
	}
}

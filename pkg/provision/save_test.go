package provision

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// saveDir is where qemu:///system keeps managed save files.
const saveDir = "/var/lib/libvirt/qemu/save"

// savedWarmMachine clones and starts a warm machine of the test image
// and saves it, on the machine's libvirtd, removing it at the end.
func savedWarmMachine(t *testing.T) (*Provisioner, *libvirt.Libvirt, string) {
	t.Helper()
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	var random [6]byte
	_, _ = rand.Read(random[:])
	key := messages.WarmKey(random)
	t.Cleanup(func() {
		if _, err := p.Remove(context.Background(), key); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	ctx := t.Context()
	if _, err := p.Clone(ctx, Spec{Host: testHost, Key: key, Image: testImage(), Generation: "gen-1"}); err != nil {
		t.Fatal(err)
	}
	if err := p.Save(ctx, key); err == nil {
		t.Fatal("Save of a machine that does not run succeeded")
	}
	if err := p.Start(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := p.Save(ctx, key); err != nil {
		t.Fatal(err)
	}
	return p, l, key
}

// hasManagedSave tells whether libvirt keeps a saved state of the domain.
func hasManagedSave(t *testing.T, l *libvirt.Libvirt, name string) bool {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	n, err := l.DomainHasManagedSaveImage(dom, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// TestSystemSavedWarmMachine: a saved warm machine is shut off with its
// memory on disk and no QEMU process; a binding while it is saved
// reaches its persistent definition; restored, it runs from its saved
// state (not booted afresh) with the definition it was saved with, so the
// binding is recorded again; Remove takes the machine with its save file.
func TestSystemSavedWarmMachine(t *testing.T) {
	p, l, key := savedWarmMachine(t)
	ctx := t.Context()
	name := DomainName(key)
	m, found, err := p.Lookup(ctx, key)
	if err != nil || !found || m.Running {
		t.Fatalf("saved machine: %+v, %v, %v; want it found, not running", m, found, err)
	}
	if !hasManagedSave(t, l, name) {
		t.Fatal("libvirt has no saved state of the machine")
	}
	if _, err := os.Stat(filepath.Join(saveDir, name+".save")); err != nil {
		t.Fatalf("the save file: %v", err)
	}
	if pids := qemuProcesses(t, name); len(pids) > 0 {
		t.Fatalf("QEMU processes %v of the saved machine", pids)
	}

	job := testJobID(t)
	if _, err := p.Bind(ctx, key, Binding{JobID: job, RunnerKind: "forgejo"}); err != nil {
		t.Fatal(err)
	}
	if m, _, _ := p.Lookup(ctx, key); m.JobID != job {
		t.Fatalf("the saved machine after its binding: job %q, want %s", m.JobID, job)
	}
	if err := p.Save(ctx, key); !errors.Is(err, ErrExists) {
		t.Fatalf("Save of a bound machine: %v, want ErrExists", err)
	}
	fresh, err := p.Restore(ctx, key)
	if err != nil || fresh {
		t.Fatalf("Restore: fresh %v, %v; want restored from its saved state", fresh, err)
	}
	if hasManagedSave(t, l, name) {
		t.Fatal("the saved state is still there after the restore")
	}
	m, _, err = p.Lookup(ctx, key)
	if err != nil || !m.Running || m.JobID != "" {
		t.Fatalf("restored machine %+v, %v: want it running with the definition it was saved with (no job)", m, err)
	}
	if _, err := p.Bind(ctx, key, Binding{JobID: job, RunnerKind: "forgejo"}); err != nil {
		t.Fatal(err)
	}
	if m, _, _ := p.Lookup(ctx, key); m.JobID != job || !m.Running {
		t.Fatalf("restored machine after its second binding %+v", m)
	}
	if fresh, err := p.Restore(ctx, key); err != nil || fresh {
		t.Fatalf("Restore of a running machine: %v, %v; want nothing done", fresh, err)
	}
}

// TestSystemSavedMachineRemoved: Remove takes a saved machine and its
// save file.
func TestSystemSavedMachineRemoved(t *testing.T) {
	p, _, key := savedWarmMachine(t)
	if existed, err := p.Remove(t.Context(), key); err != nil || !existed {
		t.Fatalf("Remove: %v, %v", existed, err)
	}
	if _, err := os.Stat(filepath.Join(saveDir, DomainName(key)+".save")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the save file after Remove: %v, want it gone", err)
	}
}

// TestSystemDamagedSaveBootsAfresh: a save file libvirt cannot restore is
// discarded and the machine boots afresh, which Restore reports.
func TestSystemDamagedSaveBootsAfresh(t *testing.T) {
	p, l, key := savedWarmMachine(t)
	path := filepath.Join(saveDir, DomainName(key)+".save")
	if err := os.WriteFile(path, []byte("not a libvirt save file\n"), 0o600); err != nil {
		t.Skipf("cannot damage the save file: %v", err)
	}
	fresh, err := p.Restore(t.Context(), key)
	if err != nil || !fresh {
		t.Fatalf("Restore of a damaged save: fresh %v, %v; want a fresh boot", fresh, err)
	}
	if m, _, _ := p.Lookup(t.Context(), key); !m.Running {
		t.Fatalf("machine %+v does not run after its fresh boot", m)
	}
	if hasManagedSave(t, l, DomainName(key)) {
		t.Fatal("the damaged saved state is still there")
	}
}

// qemuProcesses returns the pids of the QEMU processes of domain name, by
// their command lines (qemu:///system names the guest in "-name guest=").
func qemuProcesses(t *testing.T, name string) []string {
	t.Helper()
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, d := range dirs {
		cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(cmdline, []byte("guest="+name+",")) || bytes.Contains(cmdline, []byte("guest="+name+"\x00")) {
			pids = append(pids, d.Name())
		}
	}
	return pids
}

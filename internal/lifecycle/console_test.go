package lifecycle

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// unlisted hides machines from List, as a domain defined just after the
// listing would be, while Lookup still finds them.
type unlisted struct {
	*fakeMachines
	hide map[string]bool
}

func (u unlisted) List(ctx context.Context) ([]provision.Machine, error) {
	all, err := u.fakeMachines.List(ctx)
	return slices.DeleteFunc(all, func(m provision.Machine) bool { return u.hide[m.Key] }), err
}

// TestReconcileSweepsConsoleLogs: console logs of machines that no longer
// exist (a worker killed between undefining a domain and deleting its
// logs) are deleted, with virtlogd's backups, once a second
// reconciliation still finds no domain for them; the logs of machines
// that exist (this host's, another host's, one whose domain appears
// while the sweep runs), of a machine being built, and files that are not
// console logs stay.
func TestReconcileSweepsConsoleLogs(t *testing.T) {
	dir := t.TempDir()
	fm, rec := newFakeMachines(), &recorder{}
	clk := &clock{t: time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC)}
	ms := unlisted{fakeMachines: fm, hide: map[string]bool{"late": true}}
	m := New(Config{Host: "h1", Machines: ms, Events: rec, History: rec, Now: clk.Now, ConsoleDir: dir})
	defer m.Close()
	ctx := context.Background()

	fm.machines["theirs"] = &provision.Machine{Name: "stretchy-theirs", JobID: "theirs", Host: "other-host"}
	fm.machines["late"] = &provision.Machine{Name: "stretchy-late", JobID: "late", Host: "other-host"}
	// A build of job busy that is cloning now.
	fm.cloneGate = make(chan struct{})
	errc := make(chan error, 1)
	req := messages.Provision{V: 1, JobID: "busy", Image: "debian", Runner: messages.Runner{Kind: messages.RunnerNone},
		MaxLifetimeS: 600, RequestedAt: clk.Now()}
	go func() { errc <- m.Provision(ctx, req, first) }()
	waitFor(t, func() bool { return slices.Contains(rec.states("busy"), messages.StateCloning) })

	write := func(names ...string) {
		for _, n := range names {
			if err := os.WriteFile(filepath.Join(dir, n), []byte("console\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	gone := []string{"stretchy-gone.log", "stretchy-gone.log.0", "stretchy-gone.serial1.log", "stretchy-gone.console1.log.2"}
	kept := []string{"stretchy-theirs.log", "stretchy-late.log", "stretchy-busy.log", "notes.txt", "stretchy-x.y.log", "other.log"}
	write(gone...)
	write(kept...)
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	left := func() []string {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}
	if got := left(); len(got) != len(gone)+len(kept) {
		t.Fatalf("after the first sighting %v are left, want all %d", got, len(gone)+len(kept))
	}
	write("stretchy-young.log") // appears between the two
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(kept), "stretchy-young.log")
	slices.Sort(want)
	if got := left(); !slices.Equal(got, want) {
		t.Fatalf("after the second sighting %v are left, want %v", got, want)
	}
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	want = slices.DeleteFunc(want, func(n string) bool { return n == "stretchy-young.log" })
	if got := left(); !slices.Equal(got, want) {
		t.Fatalf("after the young log's second sighting %v are left, want %v", got, want)
	}
	close(fm.cloneGate)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

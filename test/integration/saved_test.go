package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// savedGap is how long the test leaves a saved machine saved before a
// job binds it: without its clock set at the restore, the guest's clock
// would be at least this far behind the host's.
const savedGap = 30 * time.Second

// TestSavedWarmPoolServesJobs: a saved pool of one (--warm IMAGE=1:saved)
// boots its machine once, then saves it: it is shut off, libvirt keeps its
// saved state, no QEMU process of it runs. A job binds it after a while:
// the machine is restored (not booted: the guest's uptime goes on from
// before the save), its clock is the host's again, and the job's runner
// runs there with the job's secret, which no event carries. The pool
// saves a new machine; at stop, nothing of the pool is left, save files
// included.
func TestSavedWarmPoolServesJobs(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	host := warmHost("itest-saved")
	removeWarmOf(t, l, host)
	w := startProcess(t, url, "--host", host, "--warm", testImage()+"=1:saved", "--max-vms", "3", "--warm-retire-on-stop")

	events.wait(t, 2*bootWait, "a warm machine ready", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 1 })
	var key string
	for k := range events.idleWarm(host) {
		key = k
	}
	domain := messages.DomainName(key)
	waitSaved(t, l, domain)
	if pids := qemuOf(t, domain); len(pids) > 0 {
		t.Fatalf("QEMU processes %v of the saved machine %s", pids, domain)
	}
	if _, err := os.Stat(filepath.Join("/var/lib/libvirt/qemu/save", domain+".save")); err != nil {
		t.Fatalf("the saved machine's save file: %v", err)
	}
	time.Sleep(savedGap)

	job := uniqueJob(t, "saved")
	req := stubRunnerRequest(job, 600)
	secret := plantedSecret("saved")
	req.Runner.Forgejo.Token = secret
	submitted := time.Now()
	submitOn(t, js, host, req)
	ev := events.waitState(t, job, messages.StateRunnerStarted, 2*bootWait)
	// For the reader of -v, not timing assertions.
	t.Logf("job %s: request → runner_started %v (warm %v)", job, ev.Time.Sub(submitted).Round(time.Millisecond), ev.Warm)
	for _, e := range events.of(job) {
		t.Logf("  %s phase_ms %d", e.State, e.PhaseMS)
	}
	if !ev.Warm || ev.Machine != key {
		t.Fatalf("the job's runner_started %+v: want it on the saved machine %s; events:\n%s", ev, key, events.dump())
	}
	dom, err := l.DomainLookupByName(domain)
	if err != nil {
		t.Fatal(err)
	}
	if _, reason, err := l.DomainGetState(dom, 0); err != nil || libvirt.DomainRunningReason(reason) != libvirt.DomainRunningRestored {
		t.Fatalf("the bound machine runs for reason %d (%v), want %d (restored)", reason, err, libvirt.DomainRunningRestored)
	}
	// The guest's clock is the host's, not where it stood at the save.
	out, err := l.QEMUDomainAgentCommand(dom, `{"execute":"guest-get-time"}`, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Return int64 `json:"return"`
	}
	if len(out) == 0 || json.Unmarshal([]byte(out[0]), &got) != nil {
		t.Fatalf("guest-get-time answered %q", out)
	}
	if off := time.Since(time.Unix(0, got.Return)); off > savedGap/3 || off < -savedGap/3 {
		t.Fatalf("the restored guest's clock is %v off the host's, the machine was saved for %v", off.Round(time.Second), savedGap)
	}
	if m, found := machineOf(t, l, key); !found || m.JobID != job {
		t.Fatalf("the restored machine's metadata names job %q (found %v), want %s", m.JobID, found, job)
	}

	// The pool saves a new machine while the job runs.
	events.wait(t, 2*bootWait, "the pool refilled", func(evs []messages.Event) bool {
		idle := idleWarm(evs, host)
		return len(idle) == 1 && !idle[key]
	})
	for k := range events.idleWarm(host) {
		waitSaved(t, l, messages.DomainName(k))
	}
	teardownOn(t, js, host, job)
	events.waitState(t, job, messages.StateTornDown, 2*bootWait)
	w.stop(t)
	if left := warmDomains(t, l, host); len(left) != 0 {
		t.Fatalf("--warm-retire-on-stop left %d warm machines", len(left))
	}
	saves, _ := filepath.Glob(filepath.Join("/var/lib/libvirt/qemu/save", "stretchy-_warm-*.save"))
	for _, s := range saves {
		for k := range events.warmKeys(host) {
			if strings.Contains(s, k) {
				t.Errorf("save file %s of machine %s is left", s, k)
			}
		}
	}
	for _, raw := range storedEvents(t, js) {
		if got := leaks(raw, []string{secret}); len(got) > 0 {
			t.Errorf("a stored event carries the secret")
		}
	}
}

// waitSaved waits until domain is shut off with a saved state.
func waitSaved(t *testing.T, l *libvirt.Libvirt, domain string) {
	t.Helper()
	deadline := time.Now().Add(2 * bootWait)
	for {
		dom, err := l.DomainLookupByName(domain)
		if err != nil {
			t.Fatal(err)
		}
		state, _, err := l.DomainGetState(dom, 0)
		if err != nil {
			t.Fatal(err)
		}
		if libvirt.DomainState(state) == libvirt.DomainShutoff {
			if n, err := l.DomainHasManagedSaveImage(dom, 0); err != nil || n != 1 {
				t.Fatalf("%s is shut off without a saved state (%d, %v)", domain, n, err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s was not saved within %v", domain, 2*bootWait)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// qemuOf returns the pids of the QEMU processes of domain, by their
// command lines.
func qemuOf(t *testing.T, domain string) []string {
	t.Helper()
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, d := range dirs {
		if cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline")); err == nil && strings.Contains(string(cmdline), "guest="+domain+",") {
			pids = append(pids, d.Name())
		}
	}
	return pids
}

// warmKeys returns the keys of every warm machine of host seen in the
// events.
func (el *eventLog) warmKeys(host string) map[string]bool {
	el.mu.Lock()
	defer el.mu.Unlock()
	keys := map[string]bool{}
	for _, ev := range el.events {
		if ev.Host == host && ev.Machine != "" {
			keys[ev.Machine] = true
		}
	}
	return keys
}

// machineOf looks up the managed machine key on the libvirtd.
func machineOf(t *testing.T, l *libvirt.Libvirt, key string) (provision.Machine, bool) {
	t.Helper()
	m, found, err := provision.New(l, provision.Options{}).Lookup(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return m, found
}

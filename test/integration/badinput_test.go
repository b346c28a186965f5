package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The bad-input corpus of pkg/messages (TestBadCorpus generates it).
const (
	corpusDir = "../../pkg/messages/testdata/bad"
	// corpusSecret is planted in the corpus's secret fields.
	corpusSecret = "CORPUS-SECRET-4f1d2c"
	// corpusInvalidImage is the image of the corpus's image_invalid case;
	// the test defines it with a disk that does not exist.
	corpusInvalidImage = "corpus-image-invalid"
	// badInputHost is the host id of the worker under test, so that it
	// leaves the machines of other tests' workers alone.
	badInputHost = "itest-badinput"
)

// isolatedJob is uniqueJob for a job id that the start of another
// integration test process does not take for a leftover of an earlier run
// (removeStaleRuns removes every stretchy-it<6 hex>-… domain on the host,
// also those of a suite running at the same time).
func isolatedJob(tb testing.TB, prefix string) string {
	tb.Helper()
	return jobIn(tb, "iso"+strings.TrimPrefix(runID, "it"), prefix)
}

// corpusEntry is a line of the corpus manifest (pkg/messages CorpusEntry).
type corpusEntry struct {
	File           string             `json:"file"`
	Subject        string             `json:"subject"`
	Code           messages.ErrorCode `json:"code"`
	JobID          string             `json:"job_id"`
	FailedEvent    bool               `json:"failed_event"`
	Events         []messages.State   `json:"events"`
	PublishRefused bool               `json:"publish_refused"`
	Requires       string             `json:"requires"`
}

func readCorpus(t *testing.T) []corpusEntry {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(corpusDir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m struct{ Entries []corpusEntry }
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	if len(m.Entries) < 100 {
		t.Fatalf("the corpus has %d entries", len(m.Entries))
	}
	return m.Entries
}

// defineInvalidImage defines a shut-off image domain whose disk does not
// exist, which the worker must refuse to clone (image_invalid).
func defineInvalidImage(t *testing.T, l *libvirt.Libvirt) {
	t.Helper()
	if old, err := l.DomainLookupByName(corpusInvalidImage); err == nil {
		_ = l.DomainUndefine(old) // an interrupted earlier run
	}
	def := libvirtxml.Domain{
		Type: "qemu", Name: corpusInvalidImage,
		Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		OS:     &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Type: "hvm"}},
		Devices: &libvirtxml.DomainDeviceList{Disks: []libvirtxml.DomainDisk{{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: "/nonexistent/stretchy-corpus/disk.qcow2"}},
			Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
		}}},
	}
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainDefineXML(doc)
	if err != nil {
		t.Fatalf("define %s: %v", corpusInvalidImage, err)
	}
	t.Cleanup(func() {
		if err := l.DomainUndefine(dom); err != nil {
			t.Errorf("undefine %s: %v", corpusInvalidImage, err)
		}
	})
}

// hostInventory lists every domain and storage volume on the host.
func hostInventory(t *testing.T, l *libvirt.Libvirt) map[string]bool {
	t.Helper()
	all, err := resources(l, "")
	if err != nil {
		t.Fatal(err)
	}
	inv := make(map[string]bool, len(all))
	for _, r := range all {
		inv[r] = true
	}
	return inv
}

// corpusMade reports whether a domain ("domain <name>") or volume
// ("volume <path>") could stem from a corpus request: it is named after a
// corpus job id (bad-NNN), or it is a managed domain whose job id is not
// even valid.
func corpusMade(item string) bool {
	kind, name, _ := strings.Cut(item, " ")
	base := filepath.Base(name)
	if strings.HasPrefix(base, messages.DomainName("bad-")) {
		return true
	}
	rest, managed := strings.CutPrefix(base, messages.ManagedPrefix)
	return kind == "domain" && managed && !messages.ValidJobID(rest)
}

// watchDefinitions records every domain libvirt defines while the test
// runs, so that a machine created and removed again is noticed too.
func watchDefinitions(t *testing.T) func() []string {
	t.Helper()
	l := dialLibvirt(t)
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := l.LifecycleEvents(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	var mu sync.Mutex
	var defined []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range ch {
			if libvirt.DomainEventType(ev.Event) == libvirt.DomainEventDefined {
				mu.Lock()
				defined = append(defined, ev.Dom.Name)
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(defined)
	}
}

// storedEvents returns the raw payload of every event in the stream.
func storedEvents(t *testing.T, js jetstream.JetStream) [][]byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := js.Stream(ctx, messages.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for seq := info.State.FirstSeq; seq > 0 && seq <= info.State.LastSeq; seq++ {
		raw, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, raw.Data)
	}
	return out
}

// TestBadInputCorpus publishes every request of the bad-input corpus to a
// real worker, one at a time, then a good one. Each bad request must be
// terminated exactly once with its code, never redelivered, reported with
// a failed event exactly when the manifest says, and leave nothing on the
// host; the worker must stay up and serve the good request.
func TestBadInputCorpus(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	corpus := readCorpus(t)
	defineInvalidImage(t, l)
	defined := watchDefinitions(t)
	before := hostInventory(t, l)
	const ackWait = 3 * time.Second
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4, AckWait: ackWait, Host: badInputHost})
	ctx := context.Background()

	published, refused := 0, 0
	want := map[string][]messages.State{} // expected events per corpus job
	codes := map[messages.ErrorCode]int{}
	for _, e := range corpus {
		data, err := os.ReadFile(filepath.Join(corpusDir, e.File))
		if err != nil {
			t.Fatal(err)
		}
		subject := messages.ProvisionSubject()
		if e.Subject == "teardown" {
			subject = messages.TeardownSubject(badInputHost)
		}
		_, err = js.Publish(ctx, subject, data)
		if e.PublishRefused {
			// Over the stream's max_msg_size: only the decoder sees it
			// (TestBadCorpus).
			if err == nil {
				t.Fatalf("%s: a %d-byte request was stored", e.File, len(data))
			}
			refused++
			continue
		}
		if err != nil {
			t.Fatalf("%s: publish: %v", e.File, err)
		}
		published++
		codes[e.Code]++
		waitUntil(t, 30*time.Second, e.File+" settled", func() bool { return len(rw.settlements()) >= published })
		s := rw.settlements()[published-1]
		var f *lifecycle.Failure
		switch {
		case s.Outcome != "term" || s.Op != e.Subject || s.Attempt != 1:
			t.Errorf("%s: settled %+v, want one term of a %s", e.File, s, e.Subject)
		case !errors.As(s.Err, &f) || f.Code != e.Code:
			t.Errorf("%s: settled with %v, want code %s", e.File, s.Err, e.Code)
		case e.Subject == "provision" && s.JobID != e.JobID:
			t.Errorf("%s: settled for job %q, want %q", e.File, s.JobID, e.JobID)
		}
		if s.Err != nil && strings.Contains(s.Err.Error(), corpusSecret) {
			t.Errorf("%s: the settlement error repeats a secret: %v", e.File, s.Err)
		}
		if !e.FailedEvent {
			continue
		}
		want[e.JobID] = e.Events
		ev := events.waitState(t, e.JobID, messages.StateFailed, 30*time.Second)
		if got := events.states(e.JobID); !slices.Equal(got, e.Events) {
			t.Errorf("%s: events %v, want %v", e.File, got, e.Events)
		}
		switch {
		case ev.Error == nil || ev.Error.Code != e.Code:
			t.Errorf("%s: failed event %+v %+v, want code %s", e.File, ev, ev.Error, e.Code)
		case ev.Host != badInputHost || ev.Attempt != 1:
			t.Errorf("%s: failed event from host %s, attempt %d", e.File, ev.Host, ev.Attempt)
		case len(e.Events) == 1 && (ev.Image != "" || ev.Domain != "" || ev.Seq != 1):
			t.Errorf("%s: a refused request's event names image %q, domain %q, seq %d", e.File, ev.Image, ev.Domain, ev.Seq)
		}
	}
	t.Logf("%d bad requests published and terminated, %d refused at publish time; codes %v", published, refused, codes)

	// The worker still serves.
	good := isolatedJob(t, "after-bad")
	if _, err := submitReq(ctx, js, provisionRequest(good), ""); err != nil {
		t.Fatal(err)
	}
	events.waitState(t, good, messages.StateAgentReady, bootWait)
	if err := teardownReq(ctx, js, good, badInputHost); err != nil {
		t.Fatal(err)
	}
	events.waitState(t, good, messages.StateTornDown, bootWait)
	if got := events.states(good); !slices.Equal(got, lifecycleStates) {
		t.Errorf("the good job's events %v, want %v", got, lifecycleStates)
	}

	// Past ack_wait: nothing was delivered again, nothing settled twice.
	time.Sleep(ackWait + time.Second)
	settled := rw.settlements()
	if len(settled) != published+2 {
		t.Errorf("%d settlements for %d bad and 2 good requests", len(settled), published)
	}
	for _, s := range settled {
		if s.Attempt != 1 {
			t.Errorf("a request was delivered again: %+v", s)
		}
	}
	waitQueueEmpty(t, js)

	// Events only where the manifest says, and none carries a secret.
	for _, ev := range events.of("") {
		t.Errorf("an event without a job id: %+v", ev)
	}
	byJob := map[string][]messages.State{}
	events.mu.Lock()
	for _, ev := range events.events {
		if ev.JobID != good {
			byJob[ev.JobID] = append(byJob[ev.JobID], ev.State)
		}
	}
	events.mu.Unlock()
	for job, got := range byJob {
		if !slices.Equal(got, want[job]) {
			t.Errorf("job %s: events %v, want %v", job, got, want[job])
		}
	}
	if len(byJob) != len(want) {
		t.Errorf("events for %d corpus jobs, want %d", len(byJob), len(want))
	}
	for _, raw := range storedEvents(t, js) {
		if bytes.Contains(raw, []byte(corpusSecret)) {
			t.Errorf("a stored event carries a corpus secret: %q", raw)
		}
	}

	// Nothing of the corpus reached the host.
	for _, name := range defined() {
		if corpusMade("domain " + name) {
			t.Errorf("domain %s was defined for a bad request", name)
		}
	}
	after := hostInventory(t, l)
	var added []string
	for name := range after {
		if !before[name] {
			added = append(added, name)
			if corpusMade(name) {
				t.Errorf("%s was created for a bad request", name)
			}
		}
	}
	if len(added) > 0 {
		t.Logf("new on the host since the start (other tests, or the good job if not yet gone): %v", added)
	}
	if _, err := l.DomainLookupByName(messages.DomainName(good)); err == nil {
		t.Error("the good job's machine is still there")
	}
}

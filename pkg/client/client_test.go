package client_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

func connect(tb testing.TB, url string, opts ...client.Option) *client.Client {
	tb.Helper()
	c, err := client.Connect(url, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Close)
	return c
}

func timeout(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	tb.Cleanup(cancel)
	return ctx
}

func fixture(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("..", "messages", "testdata", name+".msgpack"))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// protocolDoc holds what docs/protocol.md says the requests are published
// as: the request subjects of section 2.1, the Nats-Msg-Ids and header of
// section 4, and the worked example of section 9.
type protocolDoc struct {
	subjects             []string          // templates, such as stretchy.LIBVIRT.req.host.<host>.provision
	msgIDs               map[string]string // request kind -> template, such as provision:<job_id>
	expectStream         string
	exampleSubject       string
	exampleID, exampleFx string
}

func readProtocolDoc(t *testing.T) protocolDoc {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "protocol.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	var d protocolDoc
	for _, m := range regexp.MustCompile("(?m)^\\| `(stretchy\\.LIBVIRT\\.req\\.[^`]+)` \\|").FindAllStringSubmatch(doc, -1) {
		d.subjects = append(d.subjects, m[1])
	}
	d.msgIDs = map[string]string{}
	for _, m := range regexp.MustCompile("(?m)^\\| (Provision|Teardown) \\| `([^`]+)` \\| ([^|]+)\\|").FindAllStringSubmatch(doc, -1) {
		d.msgIDs[m[1]] = m[2]
		if h := regexp.MustCompile("`Nats-Expected-Stream: ([A-Z_]+)`").FindStringSubmatch(m[3]); h != nil {
			d.expectStream = h[1]
		}
	}
	m := regexp.MustCompile("Request, subject `([^`]+)`,\\s+`Nats-Msg-Id: ([^`]+)` \\(this is fixture `([^`]+)`\\)").FindStringSubmatch(doc)
	if m == nil || len(d.subjects) != 4 || len(d.msgIDs) != 2 || d.expectStream == "" {
		t.Fatalf("docs/protocol.md: request subjects %q, message ids %q, expected stream %q, worked example %q", d.subjects, d.msgIDs, d.expectStream, m)
	}
	d.exampleSubject, d.exampleID, d.exampleFx = m[1], m[2], m[3]
	return d
}

// subject returns the documented request subject that ends as suffix
// does, filled in.
func (d protocolDoc) subject(t *testing.T, suffix, host, token string) string {
	t.Helper()
	for _, s := range d.subjects {
		if strings.HasSuffix(s, suffix) {
			return strings.NewReplacer("<host>", host, "<token>", token).Replace(s)
		}
	}
	t.Fatalf("docs/protocol.md 2.1 lists no request subject ending in %s", suffix)
	return ""
}

// TestGoldenRequests: what Submit and Teardown store in the request stream
// is what docs/protocol.md says, read from the document itself: the
// subject of each route (2.1), the Nats-Msg-Id and expected stream (4),
// the worked example of section 9, and the bytes of the golden fixtures
// (pkg/messages/testdata). A retried submit is stored once.
func TestGoldenRequests(t *testing.T) {
	doc := readProtocolDoc(t)
	url := startServer(t)
	admin := dial(t, url)
	if _, err := bus.Ensure(context.Background(), admin, bus.Topology{Host: "host-a"}); err != nil {
		t.Fatal(err)
	}
	c := connect(t, url)
	ctx := timeout(t)
	stream, err := admin.Stream(ctx, messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	stored := func(t *testing.T, seq uint64) *jetstream.RawStreamMsg {
		t.Helper()
		m, err := stream.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	msgID := func(kind, job, host string) string {
		return strings.NewReplacer("<job_id>", job, "<host>", host).Replace(doc.msgIDs[kind])
	}

	for _, tt := range []struct {
		name, fixture string
		opts          []client.SubmitOption
		subject       string
	}{
		{"shared", "provision_forgejo_v1", nil, doc.subject(t, ".req.provision", "", "")},
		{"by image", "provision_github_v1", []client.SubmitOption{client.OnImage()},
			doc.subject(t, "<token>.provision", "", messages.ImageToken("ubuntu-24.04"))},
		{"pinned", "provision_jenkins_v1", []client.SubmitOption{client.OnHost("host-a")}, doc.subject(t, "<host>.provision", "host-a", "")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			data := fixture(t, tt.fixture)
			req, err := messages.DecodeProvision(data)
			if err != nil {
				t.Fatal(err)
			}
			job, err := c.Submit(ctx, req, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			m := stored(t, job.Receipt.Sequence)
			if m.Subject != tt.subject || job.Receipt.Subject != tt.subject {
				t.Errorf("stored on %s (receipt %s), want %s", m.Subject, job.Receipt.Subject, tt.subject)
			}
			if got, want := m.Header.Get(jetstream.MsgIDHeader), msgID("Provision", req.JobID, ""); got != want {
				t.Errorf("Nats-Msg-Id %q, want %q", got, want)
			}
			if got := m.Header.Get(jetstream.ExpectedStreamHeader); got != doc.expectStream {
				t.Errorf("Nats-Expected-Stream %q, want %q", got, doc.expectStream)
			}
			if string(m.Data) != string(data) {
				t.Errorf("stored %x, want the fixture's %x", m.Data, data)
			}
			if tt.fixture == doc.exampleFx && (m.Subject != doc.exampleSubject || m.Header.Get(jetstream.MsgIDHeader) != doc.exampleID) {
				t.Errorf("the worked example: %s, %s; section 9 says %s, %s", m.Subject, m.Header.Get(jetstream.MsgIDHeader), doc.exampleSubject, doc.exampleID)
			}
			// Submitted again, as after a lost acknowledgement: the same
			// request, stored once.
			again, err := c.Submit(ctx, req, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if !again.Receipt.Duplicate || again.Receipt.Sequence != job.Receipt.Sequence {
				t.Errorf("a retried submit: %+v, want a duplicate of %d", again.Receipt, job.Receipt.Sequence)
			}
		})
	}
	if info, err := stream.Info(ctx); err != nil || info.State.Msgs != 3 {
		t.Fatalf("the request stream holds %v messages (%v), want 3", info.State.Msgs, err)
	}

	t.Run("teardown", func(t *testing.T) {
		want, err := messages.DecodeTeardown(fixture(t, "teardown_v1"))
		if err != nil {
			t.Fatal(err)
		}
		rc, err := c.Job(want.JobID, client.AtHost("host-a")).Teardown(ctx, want.Reason)
		if err != nil {
			t.Fatal(err)
		}
		m := stored(t, rc.Sequence)
		if s := doc.subject(t, "<host>.teardown", "host-a", ""); m.Subject != s {
			t.Errorf("stored on %s, want %s", m.Subject, s)
		}
		if got, want := m.Header.Get(jetstream.MsgIDHeader), msgID("Teardown", want.JobID, "host-a"); got != want {
			t.Errorf("Nats-Msg-Id %q, want %q", got, want)
		}
		got, err := messages.DecodeTeardown(m.Data)
		if err != nil || got.V != want.V || got.JobID != want.JobID || got.Reason != want.Reason || got.RequestedAt.IsZero() {
			t.Errorf("stored %+v (%v), want the fixture's %+v with the time of the teardown", got, err, want)
		}
		if again, err := c.Job(want.JobID, client.AtHost("host-a")).Teardown(ctx, want.Reason); err != nil || !again.Duplicate {
			t.Errorf("a retried teardown: %+v, %v; want a duplicate", again, err)
		}
		// The job's events moved to host-b (host-a stalled in the build):
		// the teardown is sent there too (2.5), within the window, and
		// must be stored, not taken for a retry of the first.
		moved, err := c.Job(want.JobID, client.AtHost("host-b")).Teardown(ctx, want.Reason)
		if err != nil || moved.Duplicate || moved.Sequence == rc.Sequence {
			t.Fatalf("a teardown sent again to the host the job moved to: %+v, %v; want it stored", moved, err)
		}
		m = stored(t, moved.Sequence)
		if s := doc.subject(t, "<host>.teardown", "host-b", ""); m.Subject != s {
			t.Errorf("stored on %s, want %s", m.Subject, s)
		}
		if got, want := m.Header.Get(jetstream.MsgIDHeader), msgID("Teardown", want.JobID, "host-b"); got != want {
			t.Errorf("Nats-Msg-Id %q, want %q", got, want)
		}
	})
}

// TestSubmitRetriesUnansweredPublish: a provision published while the
// server does not answer (here: stopped for a moment, then started again
// on the same port and store) is stored once it answers, once.
func TestSubmitRetriesUnansweredPublish(t *testing.T) {
	dir := t.TempDir()
	srv, err := embedded.Start(embedded.Options{StoreDir: dir, Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	port := srv.Addr().(*net.TCPAddr).Port
	c := connect(t, srv.ClientURL(), client.WithNATSOptions(nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond)))
	admin := dial(t, srv.ClientURL())
	if _, err := bus.Ensure(context.Background(), admin, bus.Topology{Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, err := c.Submit(ctx, provision("r-1"))
		errc <- err
	}()
	// The first attempt goes nowhere: the server is down.
	time.Sleep(6 * time.Second)
	srv2, err := embedded.Start(embedded.Options{StoreDir: dir, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		srv2.Shutdown()
		srv2.WaitForShutdown()
	}()
	if err := <-errc; err != nil {
		t.Fatalf("submit across the server's restart: %v", err)
	}
	s, err := admin.Stream(context.Background(), messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 {
		t.Fatalf("%d requests stored, want 1", info.State.Msgs)
	}
}

func provision(job string) messages.Provision {
	return messages.Provision{JobID: job, Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerNone}}
}

func forgejo(job string, labels ...string) messages.Provision {
	req := provision(job)
	req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "token-" + job, Labels: append([]string{"debian-12"}, labels...)}}
	return req
}

// TestWaitReturnsTheOutcome: Wait returns each job's outcome, whether it
// ended before or after Wait began: torn down with the runner's exit code,
// failed with its code as a *JobError, or held; and Follow yields the
// job's statuses in seq order, ending with the outcome.
func TestWaitReturnsTheOutcome(t *testing.T) {
	url := startServer(t)
	startFakeWorker(t, url, "host-a", "debian-12")
	c := connect(t, url)
	ctx := timeout(t)

	exit3, err := c.Submit(ctx, forgejo("wait-exit3", "exit=3"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := exit3.Wait(ctx)
	if err != nil || out.State != messages.StateTornDown || out.ExitCode == nil || *out.ExitCode != 3 ||
		out.Host != "host-a" || out.Reason != messages.ReasonRunnerExited || out.Held() {
		t.Fatalf("Wait = %+v, %v; want torn_down on host-a after the runner exited with 3", out, err)
	}
	// Waiting again, on a new handle, after the end: the same outcome.
	again, err := c.Job("wait-exit3").Wait(ctx)
	if err != nil || again.State != out.State || *again.ExitCode != 3 || !again.Time.Equal(out.Time) {
		t.Fatalf("Wait after the end = %+v, %v; want %+v", again, err, out)
	}
	var seen []messages.State
	var last uint64
	for st, err := range exit3.Follow(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		if st.Event.Seq != last+1 {
			t.Fatalf("event %s has seq %d after %d", st.Event.State, st.Event.Seq, last)
		}
		last = st.Event.Seq
		seen = append(seen, st.Event.State)
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
		messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted, messages.StateRunnerExited,
		messages.StateTearingDown, messages.StateTornDown}
	if !slices.Equal(seen, want) {
		t.Fatalf("Follow yielded %v, want %v", seen, want)
	}

	missing := provision("wait-missing")
	missing.Image = "no-such-image"
	job, err := c.Submit(ctx, missing)
	if err != nil {
		t.Fatal(err)
	}
	out, err = job.Wait(ctx)
	var je *client.JobError
	if !errors.As(err, &je) || je.Code != messages.CodeImageNotFound || je.Host != "host-a" || out.State != messages.StateFailed {
		t.Fatalf("Wait = %+v, %v; want failed with a *JobError image_not_found", out, err)
	}

	held := forgejo("wait-held", "fail")
	held.HoldOnFailureS = 3600
	if job, err = c.Submit(ctx, held); err != nil {
		t.Fatal(err)
	}
	out, err = job.Wait(ctx)
	if !errors.As(err, &je) || je.Code != messages.CodeRunnerStartFailed || !out.Held() || out.HeldUntil.Before(time.Now()) {
		t.Fatalf("Wait = %+v, %v; want failed, held until an hour from now", out, err)
	}
}

// TestWaitBeforeTheJobIsServed: a Wait that begins before the job has any
// event (no worker runs yet) returns its outcome once a worker serves it,
// and one whose context ends first returns the context's error.
func TestWaitBeforeTheJobIsServed(t *testing.T) {
	url := startServer(t)
	admin := dial(t, url)
	if _, err := bus.Ensure(context.Background(), admin, bus.Topology{Host: "host-b"}); err != nil {
		t.Fatal(err)
	}
	c := connect(t, url)
	ctx := timeout(t)
	job, err := c.Submit(ctx, forgejo("early-1"), client.OnHost("host-b"))
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := job.Wait(short); !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, client.ErrUnreachable) {
		t.Fatalf("Wait of an unserved job = %v, want the context's own error", err)
	}
	done := make(chan error, 1)
	go func() {
		out, err := job.Wait(ctx)
		if err == nil && (out.State != messages.StateTornDown || out.Host != "host-b") {
			err = fmt.Errorf("outcome %+v", out)
		}
		done <- err
	}()
	startFakeWorker(t, url, "host-b", "debian-12")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestTeardownGoesToTheServingHost: a teardown goes to the host that
// serves the job, from its events: a shared job taken by one of two hosts,
// a job whose newest event is another host's dropped (to the holder it
// names). A job without events is ErrNoHost, unless pinned. Torn down
// twice, the job ends once.
func TestTeardownGoesToTheServingHost(t *testing.T) {
	url := startServer(t)
	startFakeWorker(t, url, "host-a", "debian-12")
	startFakeWorker(t, url, "host-b", "debian-12")
	c := connect(t, url)
	ctx := timeout(t)

	ready := func(t *testing.T, job *client.Job) client.Status {
		t.Helper()
		for st, err := range job.Follow(ctx) {
			if err != nil {
				t.Fatal(err)
			}
			if st.State == messages.StateAgentReady {
				return st
			}
		}
		t.Fatal("the job ended before agent_ready")
		return client.Status{}
	}

	t.Run("shared", func(t *testing.T) {
		job, err := c.Submit(ctx, provision("td-shared"))
		if err != nil {
			t.Fatal(err)
		}
		st := ready(t, job)
		rc, err := c.Job("td-shared").Teardown(ctx, "test")
		if err != nil || rc.Subject != messages.TeardownSubject(st.Host) {
			t.Fatalf("teardown: %+v, %v; want it on %s", rc, err, messages.TeardownSubject(st.Host))
		}
		if _, err := job.Teardown(ctx, "test"); err != nil {
			t.Fatal(err)
		}
		out, err := job.Wait(ctx)
		if err != nil || out.State != messages.StateTornDown || out.Reason != messages.ReasonRequested || out.Error != nil || out.Host != st.Host {
			t.Fatalf("Wait = %+v, %v; want torn_down, requested, on %s", out, err, st.Host)
		}
		var ends int
		for ev, err := range c.Events(ctx, client.Query{Job: "td-shared"}) {
			if err != nil {
				t.Fatal(err)
			}
			if ev.State.Terminal() {
				ends++
			}
		}
		if ends != 1 {
			t.Fatalf("%d terminal events, want 1", ends)
		}
	})

	t.Run("after another host's dropped", func(t *testing.T) {
		job, err := c.Submit(ctx, provision("td-dropped"), client.OnHost("host-a"))
		if err != nil {
			t.Fatal(err)
		}
		ready(t, job)
		// host-b got a stale delivery and let go of the job: its dropped
		// is the newest event, naming host-a.
		if _, _, err := bus.NewPublisher(dial(t, url)).Append(ctx, messages.Event{V: 1, JobID: "td-dropped", Host: "host-b",
			State: messages.StateDropped, Time: time.Now().UTC(), Seq: 1, Attempt: 2, Reason: messages.ReasonClaimedElsewhere,
			Holder: "host-a"}, "td-dropped:dropped:2:host-b:9", 0); err != nil {
			t.Fatal(err)
		}
		st, err := c.Job("td-dropped").Status(ctx)
		if err != nil || st.Host != "host-a" || st.State != messages.StateAgentReady || st.Dropped != 1 || st.Event.State != messages.StateDropped {
			t.Fatalf("Status = %+v, %v; want served by host-a, agent_ready, one dropped", st, err)
		}
		rc, err := c.Job("td-dropped").Teardown(ctx, "test")
		if err != nil || rc.Subject != messages.TeardownSubject("host-a") {
			t.Fatalf("teardown: %+v, %v; want it on host-a", rc, err)
		}
		if out, err := job.Wait(ctx); err != nil || out.Host != "host-a" || out.Error != nil {
			t.Fatalf("Wait = %+v, %v", out, err)
		}
	})

	t.Run("no events", func(t *testing.T) {
		if _, err := c.Job("td-nothing").Teardown(ctx, "test"); !errors.Is(err, client.ErrNoHost) {
			t.Fatalf("teardown of a job without events: %v, want ErrNoHost", err)
		}
		// Pinned, it ends the job before it is built.
		rc, err := c.Job("td-pinned", client.AtHost("host-b")).Teardown(ctx, "test")
		if err != nil || rc.Subject != messages.TeardownSubject("host-b") {
			t.Fatalf("teardown at host-b: %+v, %v", rc, err)
		}
		out, err := c.Job("td-pinned").Wait(ctx)
		if err != nil || out.State != messages.StateTornDown || out.Error == nil || out.Error.Code != messages.CodeUnknownJob {
			t.Fatalf("Wait = %+v, %v; want torn_down, unknown_job", out, err)
		}
	})
}

// TestSubmitChecksAndSeals: CheckCarriers refuses an image that no active
// host carries (and a pinned host that does not carry it) with
// ErrImageNotCarried, before publishing; a runner secret is sealed to the
// key the carriers list, and SealAlways refuses without one.
func TestSubmitChecksAndSeals(t *testing.T) {
	url := startServer(t)
	admin := dial(t, url)
	ctx := timeout(t)
	key, err := seal.Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []messages.Host{
		{Host: "host-a", State: messages.HostActive, Images: []messages.HostImage{{Name: "debian-12"}}, SealKeys: []messages.SealKey{key.Published()}},
		{Host: "host-b", State: messages.HostDraining, Images: []messages.HostImage{{Name: "win11"}}},
	} {
		f, err := bus.OpenFleet(ctx, admin, bus.Topology{Host: h.Host})
		if err != nil {
			t.Fatal(err)
		}
		if err := f.PutHost(ctx, h); err != nil {
			t.Fatal(err)
		}
		if _, err := bus.Ensure(ctx, admin, bus.Topology{Host: h.Host}); err != nil {
			t.Fatal(err)
		}
	}
	c := connect(t, url)
	for i, tt := range []struct {
		name, image string
		opts        []client.SubmitOption
		carried     bool
	}{
		{"carried", "debian-12", nil, true},
		{"carried, pinned", "debian-12", []client.SubmitOption{client.OnHost("host-a")}, true},
		{"by no host", "macos-14", nil, false},
		{"by a draining host only", "win11", []client.SubmitOption{client.OnImage()}, false},
		{"not by the pinned host", "win11", []client.SubmitOption{client.OnHost("host-a")}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req := provision(fmt.Sprintf("check-%d", i))
			req.Image = tt.image
			_, err := c.Submit(ctx, req, append(tt.opts, client.CheckCarriers())...)
			if tt.carried != (err == nil) || !tt.carried && !errors.Is(err, client.ErrImageNotCarried) {
				t.Fatalf("Submit = %v, want carried %v", err, tt.carried)
			}
		})
	}

	req := forgejo("sealed-1")
	job, err := c.Submit(ctx, req)
	if err != nil || job.SealKey != key.ID {
		t.Fatalf("Submit = %+v, %v; want it sealed to %s", job, err, key.ID)
	}
	if req.Runner.Forgejo.Token != "token-sealed-1" {
		t.Fatal("Submit changed the caller's request")
	}
	s, err := admin.Stream(ctx, messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetMsg(ctx, job.Receipt.Sequence)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := messages.DecodeProvision(m.Data)
	if err != nil || stored.Runner.Forgejo.Token != "" || stored.Runner.Sealed == nil || strings.Contains(string(m.Data), "token-sealed-1") {
		t.Fatalf("stored runner %+v (%v): want the token sealed", stored.Runner, err)
	}
	if secret, err := seal.NewKeyring(key).Open(*stored.Runner.Sealed, "sealed-1"); err != nil || secret != "token-sealed-1" {
		t.Fatalf("the box opens to %q, %v", secret, err)
	}
	win := forgejo("sealed-2")
	win.Image = "win11"
	if _, err := c.Submit(ctx, win, client.WithSealing(client.SealAlways)); !errors.Is(err, client.ErrNoSealKey) {
		t.Fatalf("SealAlways without a key: %v, want ErrNoSealKey", err)
	}
	if job, err := c.Submit(ctx, win); err != nil || job.SealKey != "" {
		t.Fatalf("SealAuto without a key: %+v, %v; want it in the clear", job, err)
	}
}

// TestErrorsAreTyped: a caller tells NATS that does not answer from a
// deployment without workers from a request that breaks the protocol's
// rules.
func TestErrorsAreTyped(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "nats://" + ln.Addr().String()
	ln.Close()
	_, err = client.Connect(closed)
	var ce *client.ConnectError
	if !errors.Is(err, client.ErrUnreachable) || !errors.As(err, &ce) || ce.URLs != closed {
		t.Fatalf("Connect to a closed port: %v, want ErrUnreachable", err)
	}
	if _, err := client.Connect("nats://u:pw-Secret@" + ln.Addr().String()); err == nil || strings.Contains(err.Error(), "pw-Secret") {
		t.Fatalf("Connect error %v shows the password", err)
	}

	url := startServer(t) // no worker ever ran: no streams, no buckets
	c := connect(t, url)
	ctx := timeout(t)
	if _, err := c.Hosts(ctx); !errors.Is(err, client.ErrNotSetUp) {
		t.Fatalf("Hosts without buckets: %v, want ErrNotSetUp", err)
	}
	if _, err := c.Submit(ctx, provision("nostream-1")); !errors.Is(err, client.ErrNotSetUp) {
		t.Fatalf("Submit without streams: %v, want ErrNotSetUp", err)
	}
	bad := provision("bad job")
	bad.Image = ""
	var ve *messages.ValidationError
	if _, err := c.Submit(ctx, bad); !errors.As(err, &ve) || len(ve.Problems) < 2 {
		t.Fatalf("Submit of an invalid request: %v, want a *messages.ValidationError listing its problems", err)
	}
	if _, err := client.Connect(url, client.WithInboxPrefix("_INBOX.x.")); err == nil || !strings.Contains(err.Error(), "trailing dot") {
		t.Fatalf("Connect with a bad inbox prefix: %v", err)
	}

	// A server that goes away: the submit is retried until the context
	// ends, and says why.
	srv, err := embedded.Start(embedded.Options{StoreDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	gone := connect(t, srv.ClientURL(), client.WithNATSOptions(nats.MaxReconnects(-1)))
	if _, err := bus.Ensure(ctx, dial(t, srv.ClientURL()), bus.Topology{Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := gone.Submit(short, provision("gone-1")); !errors.Is(err, client.ErrUnreachable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Submit while the server is gone: %v, want ErrUnreachable and the context's deadline", err)
	}
}

// TestControlRequests: hold, release and console go to the job's host and
// return what its worker replied; a refusal is a *ControlError, a host
// without a worker ErrHostDown, a job without events ErrNoHost.
func TestControlRequests(t *testing.T) {
	url := startServer(t)
	startFakeWorker(t, url, "host-a", "debian-12")
	orch := connect(t, url)
	op := connect(t, url, client.WithRole(client.Operator), client.WithIdentity("ops@test"))
	ctx := timeout(t)
	job, err := orch.Submit(ctx, provision("ctl-1"))
	if err != nil {
		t.Fatal(err)
	}
	for st, err := range job.Follow(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		if st.State == messages.StateAgentReady {
			break
		}
	}
	reply, err := op.Job("ctl-1").Hold(ctx, time.Hour)
	if err != nil || reply.Host != "host-a" || reply.HoldForS != 3600 {
		t.Fatalf("Hold = %+v, %v", reply, err)
	}
	if console, err := op.Job("ctl-1").Console(ctx, 0); err != nil || console != "console of ctl-1\n" {
		t.Fatalf("Console = %q, %v", console, err)
	}
	if _, err := op.Job("ctl-1").Release(ctx); err != nil {
		t.Fatal(err)
	}
	var ce *client.ControlError
	if _, err := op.Job("ctl-2", client.AtHost("host-a")).Hold(ctx, 0); !errors.As(err, &ce) || ce.Host != "host-a" {
		t.Fatalf("Hold of a job host-a does not have: %v, want a *ControlError", err)
	}
	if _, err := op.Job("ctl-3", client.AtHost("host-z")).Console(ctx, 0); !errors.Is(err, client.ErrHostDown) {
		t.Fatalf("Console at a host without a worker: %v, want ErrHostDown", err)
	}
	if _, err := op.Job("ctl-4").Release(ctx); !errors.Is(err, client.ErrNoHost) {
		t.Fatalf("Release of a job without events: %v, want ErrNoHost", err)
	}
	if _, err := orch.Job("ctl-1").Teardown(ctx, "test"); err != nil {
		t.Fatal(err)
	}
}

// TestPermissionRefusalFailsFast: an orchestrator whose NATS user may not
// publish requests gets a *PermissionError naming the subject at once,
// not when its context ends.
func TestPermissionRefusalFailsFast(t *testing.T) {
	pub, sub := client.OrchestratorPermissions()
	pub = slices.DeleteFunc(slices.Clone(pub), func(s string) bool { return s == messages.RequestSubjects })
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: []*server.User{{Username: "admin", Password: "admin"}, {Username: "o", Password: "o", Permissions: &server.Permissions{
			Publish: &server.SubjectPermission{Allow: pub}, Subscribe: &server.SubjectPermission{Allow: sub}}}}})
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	admin, err := nats.Connect(srv.ClientURL(), nats.UserInfo("admin", "admin"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ajs, err := jetstream.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.Ensure(context.Background(), ajs, bus.Topology{Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	reported := make(chan error, 8)
	c := connect(t, srv.ClientURL(), client.WithUserInfo("o", "o"), client.WithErrorHandler(func(err error) {
		select {
		case reported <- err:
		default:
		}
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	_, err = c.Submit(ctx, provision("refused-1"))
	var pe *client.PermissionError
	if !errors.As(err, &pe) || pe.Subject != messages.ProvisionSubject() || !errors.Is(err, nats.ErrPermissionViolation) {
		t.Fatalf("Submit = %v, want a *PermissionError for %s", err, messages.ProvisionSubject())
	}
	if d := time.Since(start); d > time.Minute {
		t.Fatalf("the refusal took %s, as if it waited for the context", d)
	}
	if err := <-reported; !errors.As(err, &pe) {
		t.Fatalf("the error handler got %v, want the *PermissionError", err)
	}
}

// inProcessJS stores the first publish and answers it as a cluster whose
// stream leader has not committed it yet answers a retry of it: 409 with
// error code 10158, "duplicate message id is in process". A real cluster
// gives it when a publish timed out client-side while its proposal was
// under way (a NATS node killed, a leader elected), which a test cannot
// time; the error is the server's own.
type inProcessJS struct {
	jetstream.JetStream
	answered bool
}

func (j *inProcessJS) Publish(ctx context.Context, subject string, data []byte, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if j.answered {
		return j.JetStream.Publish(ctx, subject, data, opts...)
	}
	j.answered = true
	if _, err := j.JetStream.Publish(ctx, subject, data, opts...); err != nil {
		return nil, err
	}
	return nil, &jetstream.APIError{Code: 409, ErrorCode: 10158, Description: "duplicate message id is in process"}
}

// TestSubmitRetriesPublishInProcess: a submit or teardown whose publish
// the server answers "duplicate message id is in process" is tried again
// until the server says what became of the first: stored (here), so the
// submit returns the job, as a duplicate of that request, rather than an
// error for a request that runs.
func TestSubmitRetriesPublishInProcess(t *testing.T) {
	url := startServer(t)
	admin := dial(t, url)
	if _, err := bus.Ensure(context.Background(), admin, bus.Topology{Host: "host-a"}); err != nil {
		t.Fatal(err)
	}
	ctx := timeout(t)
	c := client.New(&inProcessJS{JetStream: admin})
	job, err := c.Submit(ctx, provision("inproc-1"))
	if err != nil {
		t.Fatalf("submit answered in process: %v; want the job", err)
	}
	if !job.Receipt.Duplicate || job.Receipt.Sequence == 0 {
		t.Errorf("receipt %+v, want the first publish's request, a duplicate", job.Receipt)
	}
	c = client.New(&inProcessJS{JetStream: admin})
	rc, err := c.Job("inproc-1", client.AtHost("host-a")).Teardown(ctx, "test")
	if err != nil || !rc.Duplicate {
		t.Fatalf("teardown answered in process: %+v, %v; want the first publish's request", rc, err)
	}
	s, err := admin.Stream(ctx, messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(ctx); err != nil || info.State.Msgs != 2 {
		t.Fatalf("the request stream holds %v requests (%v), want 2", info.State.Msgs, err)
	}
}

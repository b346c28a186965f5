package bus

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// startPermServer starts a JetStream server with the unrestricted user
// "admin" and the user "user" holding exactly pub and sub.
func startPermServer(t *testing.T, pub, sub []string) *server.Server {
	t.Helper()
	return startUsersServer(t, map[string][2][]string{"user": {pub, sub}})
}

// startUsersServer starts a JetStream server with the unrestricted user
// "admin" and one user per entry of users, named by its key, holding
// exactly the publish and subscribe lists of its value. Each user's
// password is its name.
func startUsersServer(t *testing.T, users map[string][2][]string) *server.Server {
	t.Helper()
	list := []*server.User{{Username: "admin", Password: "admin"}}
	for name, perms := range users {
		list = append(list, &server.User{Username: name, Password: name, Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: perms[0]},
			Subscribe: &server.SubjectPermission{Allow: perms[1]},
			// A worker answers control requests (docs/security.md).
			Response: &server.ResponsePermission{MaxMsgs: 1, Expires: 3 * time.Minute},
		}})
	}
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: list,
	})
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
	return srv
}

// session is a connection whose context ends at the server's first
// permissions violation, so that a refused request fails at once.
type session struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	ctx context.Context

	mu         sync.Mutex
	violations []error
}

// connectAs connects as user, with the inbox prefix of its role; admin
// keeps nats.go's default, "_INBOX".
func connectAs(t *testing.T, srv *server.Server, user, inboxPrefix string) *session {
	t.Helper()
	ctx, cancel := context.WithCancelCause(context.Background())
	t.Cleanup(func() { cancel(nil) })
	s := &session{}
	opts := []nats.Option{nats.UserInfo(user, user),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				s.mu.Lock()
				s.violations = append(s.violations, err)
				s.mu.Unlock()
				cancel(err)
			}
		})}
	if inboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(inboxPrefix))
	}
	nc, err := nats.Connect(srv.ClientURL(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	tctx, tcancel := context.WithTimeout(ctx, 20*time.Second)
	t.Cleanup(tcancel)
	s.nc, s.js, s.ctx = nc, js, tctx
	return s
}

var violationRE = regexp.MustCompile(`(?i)permissions violation for (publish|subscription) to "([^"]*)"`)

// refused returns the subjects the server refused to this session, each
// once. The flush makes sure every refusal of what was sent has been read.
func (s *session) refused(t *testing.T) []string {
	t.Helper()
	if err := s.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	errs := slices.Clone(s.violations)
	s.mu.Unlock()
	if err := s.nc.LastError(); err != nil && errors.Is(err, nats.ErrPermissionViolation) {
		errs = append(errs, err)
	}
	var subjects []string
	for _, err := range errs {
		m := violationRE.FindStringSubmatch(err.Error())
		if m == nil {
			t.Fatalf("a permissions violation without a subject: %v", err)
		}
		subjects = append(subjects, m[2])
	}
	slices.Sort(subjects)
	return slices.Compact(subjects)
}

func mustMarshal(v any) []byte {
	b, err := messages.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func provision(job string) messages.Provision {
	return messages.Provision{V: messages.SchemaVersion, JobID: job, Image: "img",
		Runner: messages.Runner{Kind: messages.RunnerNone}, RequestedAt: time.Now().UTC()}
}

func event(host, job string, state messages.State, seq uint64) messages.Event {
	return messages.Event{V: messages.SchemaVersion, JobID: job, Host: host, Image: "img", State: state,
		Time: time.Now().UTC(), Seq: seq, Attempt: 1}
}

func fetchOne(ctx context.Context, c jetstream.Consumer) (jetstream.Msg, error) {
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	batch, err := c.Fetch(1, jetstream.FetchContext(fctx))
	if err != nil {
		return nil, err
	}
	for msg := range batch.Messages() {
		return msg, nil
	}
	if err := batch.Error(); err != nil {
		return nil, err
	}
	return nil, errors.New("no message")
}

// runWorker makes every NATS call a worker makes, as the worker of host,
// with admin in the orchestrator's place.
func runWorker(s, admin *session, host string) error {
	ctx, js := s.ctx, s.js
	// Max-deliveries advisories (internal/worker/advisory.go) are taken in
	// a queue group from the start.
	if _, err := s.nc.QueueSubscribeSync(maxDeliveries, "stretchy-libvirt-max-deliveries"); err != nil {
		return err
	}
	// Control requests (internal/worker/control.go) to this host, which
	// the worker answers.
	if _, err := s.nc.Subscribe(messages.ControlSubject(host), func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		return err
	}
	// Arrivals of provisions (arrivals.go), which wake the pull loop.
	if stop, err := WatchArrivals(s.nc, host, func(string) {}); err != nil {
		return err
	} else {
		defer stop()
	}
	if err := s.nc.Flush(); err != nil {
		return err
	}
	if err := s.nc.LastError(); err != nil {
		return err
	}
	if reply, err := admin.nc.RequestWithContext(ctx, messages.ControlSubject(host), []byte("hold")); err != nil || string(reply.Data) != "ok" {
		return fmt.Errorf("control request: %v", err)
	}
	cons, err := Ensure(ctx, js, Topology{Host: host})
	if err != nil {
		return fmt.Errorf("first ensure: %w", err)
	}
	// A restarted worker updates what exists.
	if _, err := Ensure(ctx, js, Topology{Host: host}); err != nil {
		return fmt.Errorf("second ensure: %w", err)
	}
	if _, err := submit(ctx, admin.js, provision("shared-1"), ""); err != nil {
		return err
	}
	if _, err := submit(ctx, admin.js, provision("pinned-1"), host); err != nil {
		return err
	}
	if err := submitTeardown(ctx, admin.js, "pinned-1", host); err != nil {
		return err
	}
	for _, c := range []struct {
		name string
		c    jetstream.Consumer
	}{{"shared", cons.Provision}, {"pinned", cons.Pinned}, {"teardown", cons.Teardown}} {
		msg, err := fetchOne(ctx, c.c)
		if err != nil {
			return fmt.Errorf("fetch %s: %w", c.name, err)
		}
		if err := msg.InProgress(); err != nil {
			return fmt.Errorf("in progress %s: %w", c.name, err)
		}
		if err := msg.DoubleAck(ctx); err != nil {
			return fmt.Errorf("ack %s: %w", c.name, err)
		}
	}
	// Nak and term, as for a transient and a permanent failure.
	if _, err := submit(ctx, admin.js, provision("shared-2"), ""); err != nil {
		return err
	}
	msg, err := fetchOne(ctx, cons.Provision)
	if err != nil {
		return fmt.Errorf("fetch to nak: %w", err)
	}
	if err := msg.NakWithDelay(time.Millisecond); err != nil {
		return err
	}
	if msg, err = fetchOne(ctx, cons.Provision); err != nil {
		return fmt.Errorf("fetch the redelivery: %w", err)
	}
	if err := msg.TermWithReason(string(messages.CodeBadMessage)); err != nil {
		return err
	}

	pub := NewPublisher(js)
	if err := pub.Publish(ctx, event(host, "shared-1", messages.StateAccepted, 1), "shared-1:1"); err != nil {
		return err
	}
	ev, found, err := pub.LastEvent(ctx, "shared-1", "")
	if err != nil {
		return err
	}
	if !found || ev.State != messages.StateAccepted {
		return fmt.Errorf("last event: found %v, state %q", found, ev.State)
	}
	if _, found, err := pub.LastEvent(ctx, "absent", host); err != nil || found {
		return fmt.Errorf("last event of an unknown job: found %v, %v", found, err)
	}
	// The next event, published as if the job had none yet: refused,
	// renumbered after the newest, stored; then its retry is a duplicate.
	next := event(host, "shared-1", messages.StateCloning, 1)
	if seq, _, err := pub.Append(ctx, next, "shared-1:cloning:1", 0); err != nil || seq != 2 {
		return fmt.Errorf("append after another event: seq %d, %v", seq, err)
	}
	if seq, _, err := pub.Append(ctx, next, "shared-1:cloning:1", 0); err != nil || seq != 2 {
		return fmt.Errorf("append again: seq %d, %v", seq, err)
	}
	recent, err := pub.Recent(ctx, host, time.Now().Add(-time.Hour))
	if err != nil {
		return err
	}
	if len(recent) != 2 || recent[0].JobID != "shared-1" || recent[1].State != messages.StateCloning {
		return fmt.Errorf("recent events: %+v, want shared-1's accepted and cloning", recent)
	}

	// Claims: the bucket, a claim taken, renewed, seen held by another
	// host (a read) and released.
	claims, err := OpenClaims(ctx, js, Topology{Host: host})
	if err != nil {
		return fmt.Errorf("open claims: %w", err)
	}
	if _, err := OpenClaims(ctx, js, Topology{Host: host}); err != nil {
		return fmt.Errorf("open claims again: %w", err)
	}
	rev, _, err := claims.Take(ctx, "shared-1", 1)
	if err != nil || rev == 0 {
		return fmt.Errorf("take a claim: rev %d, %v", rev, err)
	}
	if rev, _, err = claims.Keep(ctx, "shared-1", 1, rev); err != nil || rev == 0 {
		return fmt.Errorf("renew a claim: rev %d, %v", rev, err)
	}
	other, err := OpenClaims(ctx, admin.js, Topology{Host: "other"})
	if err != nil {
		return err
	}
	if _, _, err := other.Take(ctx, "shared-9", 1); err != nil {
		return err
	}
	if got, holder, err := claims.Take(ctx, "shared-9", 1); err != nil || got != 0 || holder.Host != "other" {
		return fmt.Errorf("take a claim held elsewhere: rev %d, holder %q, %v", got, holder.Host, err)
	}
	if err := claims.Release(ctx, "shared-1", rev); err != nil {
		return fmt.Errorf("release a claim: %w", err)
	}

	// Image routing: the consumer of an image, a pull and an ack from
	// it, its queue depth, and a shared request forwarded to it.
	img, err := EnsureImageConsumer(ctx, js, Topology{Host: host}, "debian-12.4")
	if err != nil {
		return fmt.Errorf("image consumer: %w", err)
	}
	if err := Forward(ctx, js, mustMarshal(provision("fwd-1")), "debian-12.4", "fwd-1"); err != nil {
		return err
	}
	if _, err := img.Info(ctx); err != nil {
		return fmt.Errorf("image consumer info: %w", err)
	}
	if msg, err := fetchOne(ctx, img); err != nil {
		return fmt.Errorf("fetch image: %w", err)
	} else if err := msg.DoubleAck(ctx); err != nil {
		return fmt.Errorf("ack image: %w", err)
	}
	// The fleet's buckets, created, then found as they are.
	if _, err := OpenFleet(ctx, js, Topology{Host: host}); err != nil {
		return fmt.Errorf("open fleet: %w", err)
	}
	fleet, err := OpenFleet(ctx, js, Topology{Host: host})
	if err != nil {
		return fmt.Errorf("open fleet again: %w", err)
	}
	if err := fleet.PutHost(ctx, messages.Host{State: messages.HostActive, Images: []messages.HostImage{{Name: "debian-12.4"}}}); err != nil {
		return err
	}
	if recs, err := fleet.Hosts(ctx); err != nil || len(recs) != 1 {
		return fmt.Errorf("hosts: %d, %v", len(recs), err)
	}
	if err := fleet.Drain(ctx, host, "signal"); err != nil {
		return err
	}
	if drained, err := fleet.Drained(ctx, host); err != nil || !drained {
		return fmt.Errorf("drained: %v, %v", drained, err)
	}
	if tried, err := fleet.Tried(ctx, 77, "job-t", "macos:14"); err != nil || len(tried) != 1 {
		return fmt.Errorf("tried: %q, %v", tried, err)
	}
	if err := fleet.ForgetTried(ctx, 77); err != nil {
		return err
	}

	// What an advisory about a request leads to: read it, then delete it.
	seq, err := submit(ctx, admin.js, provision("shared-3"), "")
	if err != nil {
		return err
	}
	requests, err := js.Stream(ctx, messages.RequestsStream)
	if err != nil {
		return fmt.Errorf("request stream: %w", err)
	}
	if _, err := requests.GetMsg(ctx, seq); err != nil {
		return fmt.Errorf("read request %d: %w", seq, err)
	}
	if err := requests.DeleteMsg(ctx, seq); err != nil {
		return fmt.Errorf("delete request %d: %w", seq, err)
	}
	return nil
}

// submit publishes req as an orchestrator does, through pkg/client,
// pinned to host unless it is empty, the secret in the clear.
func submit(ctx context.Context, js jetstream.JetStream, req messages.Provision, host string) (uint64, error) {
	opts := []client.SubmitOption{client.WithSealing(client.SealNever)}
	if host != "" {
		opts = append(opts, client.OnHost(host))
	}
	job, err := client.New(js).Submit(ctx, req, opts...)
	if err != nil {
		return 0, err
	}
	return job.Receipt.Sequence, nil
}

// submitTeardown publishes a teardown of job to host, as an orchestrator
// does through pkg/client.
func submitTeardown(ctx context.Context, js jetstream.JetStream, job, host string) error {
	_, err := client.New(js).Job(job, client.AtHost(host)).Teardown(ctx, "test")
	return err
}

// controlReply answers a control request as a worker does.
func controlReply(m *nats.Msg, host string) {
	_ = m.Respond(mustMarshal(messages.ControlReply{V: messages.SchemaVersion, OK: true, Host: host, Phase: "held"}))
}

// runOrchestrator makes every call of a pkg/client orchestrator, with
// admin in the worker's place: it reads the host registry, submits shared,
// by-image (checking the registry first), pinned and sealed provisions,
// tears jobs down (one at the host its events name), replays events,
// reads a job's status, follows events across a forced reset of its
// ordered consumer and waits for a job's outcome. With createStreams it
// creates the streams first.
func runOrchestrator(ctx context.Context, js, admin jetstream.JetStream, host string, createStreams bool) error {
	if createStreams {
		for _, cfg := range []jetstream.StreamConfig{RequestStreamConfig(Topology{}), EventStreamConfig(Topology{})} {
			if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
				return fmt.Errorf("create stream %s: %w", cfg.Name, err)
			}
		}
	}
	if _, err := Ensure(ctx, admin, Topology{Host: host}); err != nil {
		return fmt.Errorf("worker's ensure: %w", err)
	}
	// The hosts' records, for their images and sealing keys.
	wf, err := OpenFleet(ctx, admin, Topology{Host: host})
	if err != nil {
		return err
	}
	key, err := seal.Generate(rand.Reader)
	if err != nil {
		return err
	}
	if err := wf.PutHost(ctx, messages.Host{State: messages.HostActive, Images: []messages.HostImage{{Name: "img", Admitted: true}},
		SealKeys: []messages.SealKey{key.Published()}}); err != nil {
		return err
	}
	c := client.New(js)
	if recs, err := c.Hosts(ctx); err != nil || len(recs) != 1 || recs[0].Host != host {
		return fmt.Errorf("hosts: %+v, %v", recs, err)
	}
	if _, err := c.Submit(ctx, provision("o-1")); err != nil {
		return err
	}
	pinned, err := c.Submit(ctx, provision("o-2"), client.OnHost(host))
	if err != nil {
		return err
	}
	if _, err := c.Submit(ctx, provision("o-3"), client.OnImage(), client.CheckCarriers()); err != nil {
		return err
	}
	sealed := provision("o-4")
	sealed.Runner = messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: "jit"}}
	if job, err := c.Submit(ctx, sealed, client.WithSealing(client.SealAlways)); err != nil || job.SealKey != key.ID {
		return fmt.Errorf("sealed submit: %+v, %v", job, err)
	}
	if _, err := pinned.Teardown(ctx, "test"); err != nil {
		return err
	}
	workerPub := NewPublisher(admin)
	for i, st := range []messages.State{messages.StateAccepted, messages.StateCloning} {
		if err := workerPub.Publish(ctx, event(host, "o-1", st, uint64(i+1)), fmt.Sprintf("o-1:%d", i+1)); err != nil {
			return err
		}
	}
	// The shared job's teardown, to the host its events name.
	if rc, err := c.Job("o-1").Teardown(ctx, "test"); err != nil || rc.Subject != messages.TeardownSubject(host) {
		return fmt.Errorf("teardown of o-1: %+v, %v", rc, err)
	}
	var n int
	for _, err := range c.Events(ctx, client.Query{Job: "o-1"}) {
		if err != nil {
			return fmt.Errorf("replay: %w", err)
		}
		n++
	}
	if n != 2 {
		return fmt.Errorf("replay read %d events, want 2", n)
	}
	if st, err := c.Job("o-1").Status(ctx); err != nil || st.State != messages.StateCloning {
		return fmt.Errorf("status: %+v, %v", st, err)
	}

	// Follow, and make the ordered consumer reset by deleting it under
	// the reader, as a server restart would.
	var followed bool
	for ev, err := range c.Events(ctx, client.Query{Host: host, Follow: true}) {
		if err != nil {
			return fmt.Errorf("follow: %w", err)
		}
		if ev.State == messages.StateBooting {
			followed = true
			break
		}
		if ev.State != messages.StateCloning {
			continue
		}
		s, err := admin.Stream(ctx, messages.EventsStream)
		if err != nil {
			return err
		}
		for name := range s.ConsumerNames(ctx).Name() {
			if err := s.DeleteConsumer(ctx, name); err != nil {
				return err
			}
		}
		if err := workerPub.Publish(ctx, event(host, "o-1", messages.StateBooting, 3), "o-1:3"); err != nil {
			return err
		}
	}
	if !followed {
		return errors.New("follow ended before the booting event")
	}
	if err := workerPub.Publish(ctx, event(host, "o-1", messages.StateTornDown, 4), "o-1:4"); err != nil {
		return err
	}
	if out, err := c.Job("o-1").Wait(ctx); err != nil || out.State != messages.StateTornDown {
		return fmt.Errorf("wait: %+v, %v", out, err)
	}
	return nil
}

// runOperator makes every call of a pkg/client operator, with admin in
// the worker's place: hold and console (the job's host from its events,
// then a control request to that host's worker), the host registry, and
// a drain request written, listed and deleted.
func runOperator(s, adminS *session, host string) error {
	ctx, js, admin := s.ctx, s.js, adminS.js
	if _, err := Ensure(ctx, admin, Topology{Host: host}); err != nil {
		return err
	}
	if err := NewPublisher(admin).Publish(ctx, event(host, "held-1", messages.StateFailed, 1), "held-1:1"); err != nil {
		return err
	}
	sub, err := adminS.nc.Subscribe(messages.ControlSubject(host), func(m *nats.Msg) { controlReply(m, host) })
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := adminS.nc.Flush(); err != nil {
		return err
	}
	c := client.New(js)
	if reply, err := c.Job("held-1").Hold(ctx, time.Minute); err != nil || reply.Host != host {
		return fmt.Errorf("hold: %+v, %v", reply, err)
	}
	if _, err := c.Job("held-1").Console(ctx, 0); err != nil {
		return fmt.Errorf("console: %v", err)
	}
	wf, err := OpenFleet(ctx, admin, Topology{Host: host})
	if err != nil {
		return err
	}
	if err := wf.PutHost(ctx, messages.Host{State: messages.HostActive}); err != nil {
		return err
	}
	if recs, err := c.Hosts(ctx); err != nil || len(recs) != 1 || recs[0].Host != host {
		return fmt.Errorf("hosts: %+v, %v", recs, err)
	}
	if err := c.Drain(ctx, "elsewhere", "ops"); err != nil {
		return err
	}
	if d, err := c.Drains(ctx); err != nil || len(d) != 1 || d[0].Host != "elsewhere" {
		return fmt.Errorf("drains: %+v, %v", d, err)
	}
	return c.Undrain(ctx, "elsewhere")
}

func TestOperatorPermissionsSuffice(t *testing.T) {
	pub, sub := client.OperatorPermissions()
	srv := startPermServer(t, pub, sub)
	o, admin := connectAs(t, srv, "user", client.OperatorInbox), connectAs(t, srv, "admin", "")
	if err := runOperator(o, admin, "h1"); err != nil {
		t.Fatalf("operator with its permissions: %v (refused: %q)", err, o.refused(t))
	}
	if r := o.refused(t); len(r) > 0 {
		t.Fatalf("the server refused %q", r)
	}
}

// without returns list without its i-th entry. NATS reads an empty allow
// list as "allow everything", so an emptied list allows one unused subject.
func without(list []string, i int) []string {
	l := slices.Delete(slices.Clone(list), i, i+1)
	if len(l) == 0 {
		l = []string{"nothing.else"}
	}
	return l
}

func TestWorkerPermissionsSuffice(t *testing.T) {
	pub, sub := WorkerPermissions("h1")
	srv := startPermServer(t, pub, sub)
	w, admin := connectAs(t, srv, "user", WorkerInbox("h1")), connectAs(t, srv, "admin", "")
	if err := runWorker(w, admin, "h1"); err != nil {
		t.Fatalf("worker with its permissions: %v (refused: %q)", err, w.refused(t))
	}
	if r := w.refused(t); len(r) > 0 {
		t.Fatalf("the server refused %q", r)
	}
	// Nor may it speak for another host.
	other := messages.EventSubject("h2", "shared-1", messages.StateAccepted)
	if err := NewPublisher(w.js).Publish(w.ctx, event("h2", "shared-1", messages.StateAccepted, 1), "h2:1"); err == nil {
		t.Fatal("the worker of h1 published an event of h2")
	}
	if r := w.refused(t); !slices.Equal(r, []string{other}) {
		t.Fatalf("refused %q, want %q", r, other)
	}
}

func TestOrchestratorPermissionsSuffice(t *testing.T) {
	for _, create := range []bool{false, true} {
		t.Run(fmt.Sprintf("create streams %v", create), func(t *testing.T) {
			pub, sub := client.OrchestratorPermissions()
			if create {
				pub = append(pub, StreamPermissions()...)
			}
			srv := startPermServer(t, pub, sub)
			o, admin := connectAs(t, srv, "user", client.OrchestratorInbox), connectAs(t, srv, "admin", "")
			if err := runOrchestrator(o.ctx, o.js, admin.js, "h1", create); err != nil {
				t.Fatalf("orchestrator with its permissions: %v (refused: %q)", err, o.refused(t))
			}
			if r := o.refused(t); len(r) > 0 {
				t.Fatalf("the server refused %q", r)
			}
		})
	}
}

// TestEveryPermissionIsNeeded removes one subject at a time from each
// list: the same calls then fail, and the server names a refused subject
// that only the removed entry allowed.
func TestEveryPermissionIsNeeded(t *testing.T) {
	type run func(s, admin *session) error
	worker := func(s, admin *session) error { return runWorker(s, admin, "h1") }
	orchestrator := func(s, admin *session) error { return runOrchestrator(s.ctx, s.js, admin.js, "h1", false) }
	operator := func(s, admin *session) error { return runOperator(s, admin, "h1") }
	// Deleting the consumer of a reset ordered consumer is best effort:
	// the reader goes on without it, but the refusal is still reported.
	bestEffort := map[string]bool{"$JS.API.CONSUMER.DELETE.STRETCHY_LIBVIRT_EVENTS.*": true}

	type tc struct {
		name     string
		pub, sub []string
		removed  string
		inbox    string
		run      run
	}
	var cases []tc
	for _, role := range []struct {
		name     string
		pub, sub []string
		inbox    string
		run      run
	}{
		{"worker", nil, nil, WorkerInbox("h1"), worker},
		{"orchestrator", nil, nil, client.OrchestratorInbox, orchestrator},
		{"operator", nil, nil, client.OperatorInbox, operator},
	} {
		switch role.name {
		case "worker":
			role.pub, role.sub = WorkerPermissions("h1")
		case "orchestrator":
			role.pub, role.sub = client.OrchestratorPermissions()
		default:
			role.pub, role.sub = client.OperatorPermissions()
		}
		for i, p := range role.pub {
			cases = append(cases, tc{role.name + " pub " + p, without(role.pub, i), role.sub, p, role.inbox, role.run})
		}
		for i, s := range role.sub {
			cases = append(cases, tc{role.name + " sub " + s, role.pub, without(role.sub, i), s, role.inbox, role.run})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			srv := startPermServer(t, c.pub, c.sub)
			s, admin := connectAs(t, srv, "user", c.inbox), connectAs(t, srv, "admin", "")
			err := c.run(s, admin)
			refused := s.refused(t)
			if err == nil && !bestEffort[c.removed] {
				t.Fatalf("succeeded without %s", c.removed)
			}
			if len(refused) == 0 {
				t.Fatalf("no subject refused without %s; error: %v", c.removed, err)
			}
			for _, subj := range refused {
				if !server.SubjectMatchesFilter(subj, c.removed) {
					t.Fatalf("refused %q, which %s does not cover", subj, c.removed)
				}
			}
		})
	}
}

// TestSecurityDocMatches parses the server configuration in
// docs/security.md with nats-server's parser: its users hold exactly what
// the functions return.
func TestSecurityDocMatches(t *testing.T) {
	doc, err := os.ReadFile("../../docs/security.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "```conf\n")
	conf, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("no ```conf block in docs/security.md")
	}
	path := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatalf("the documented configuration: %v", err)
	}
	wpub, wsub := WorkerPermissions("host-a")
	opub, osub := client.OrchestratorPermissions()
	ppub, psub := client.OperatorPermissions()
	want := map[string][2][]string{"worker-host-a": {wpub, wsub}, "orchestrator": {opub, osub}, "operator": {ppub, psub}}
	if len(opts.Users) != len(want) {
		t.Fatalf("%d users documented, want %d", len(opts.Users), len(want))
	}
	for _, u := range opts.Users {
		w, ok := want[u.Username]
		if !ok {
			t.Fatalf("unexpected user %q", u.Username)
		}
		if got := u.Permissions.Publish.Allow; !slices.Equal(got, w[0]) {
			t.Errorf("%s may publish to\n%q\nwant\n%q", u.Username, got, w[0])
		}
		if got := u.Permissions.Subscribe.Allow; !slices.Equal(got, w[1]) {
			t.Errorf("%s may subscribe to %q, want %q", u.Username, got, w[1])
		}
	}
}

// TestOperatorCannotReceiveWorkerPullReplies: an operator's connection
// cannot receive a worker's pull replies, which are whole requests,
// runner secrets included. The server refuses the operator's
// subscriptions to the worker's inboxes and to every inbox. A user who
// may subscribe to "_INBOX.>", as operators could before inboxes were per
// role, receives the request, secret and all, on the same server: that
// is what this test would see of the operator if it could.
func TestOperatorCannotReceiveWorkerPullReplies(t *testing.T) {
	wpub, wsub := WorkerPermissions("h1")
	opub, osub := client.OperatorPermissions()
	srv := startUsersServer(t, map[string][2][]string{
		"worker":      {wpub, wsub},
		"operator":    {opub, osub},
		"every-inbox": {opub, []string{"_INBOX.>"}},
	})
	admin := connectAs(t, srv, "admin", "")
	w := connectAs(t, srv, "worker", WorkerInbox("h1"))
	cons, err := Ensure(w.ctx, w.js, Topology{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	targets := []string{"_INBOX.>", WorkerInbox("h1") + ".>"}
	listen := func(s *session) []*nats.Subscription {
		var subs []*nats.Subscription
		for _, subject := range targets {
			sub, err := s.nc.SubscribeSync(subject)
			if err != nil {
				t.Fatal(err)
			}
			subs = append(subs, sub)
		}
		return subs
	}
	op := connectAs(t, srv, "operator", client.OperatorInbox)
	opSubs := listen(op)
	before := connectAs(t, srv, "every-inbox", client.OperatorInbox)
	beforeSubs := listen(before)
	if r := before.refused(t); len(r) > 0 {
		t.Fatalf("the server refused %q to a user allowed every inbox", r)
	}
	refused := op.refused(t)
	slices.Sort(targets)
	if !slices.Equal(refused, targets) {
		t.Fatalf("the server refused the operator %q, want %q", refused, targets)
	}

	const secret = "jit-config-Secret-of-job-eavesdrop-1"
	req := provision("eavesdrop-1")
	req.Runner = messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: secret}}
	if _, err := submit(w.ctx, admin.js, req, ""); err != nil {
		t.Fatal(err)
	}
	msg, err := fetchOne(w.ctx, cons.Provision)
	if err != nil {
		t.Fatalf("the worker's pull: %v", err)
	}
	if err := msg.Ack(); err != nil {
		t.Fatal(err)
	}
	// The pull reply went to an inbox of the worker's: the user allowed
	// every inbox got it on each of its subscriptions.
	// (On "_INBOX.>" it also sees the admin's replies.)
	for i, sub := range beforeSubs {
		deadline := time.Now().Add(5 * time.Second)
		for {
			m, err := sub.NextMsg(time.Until(deadline))
			if err != nil {
				t.Fatalf("a user allowed every inbox, subscribed to %s: %v; the test cannot see an eavesdropper", targets[i], err)
			}
			// A pulled message keeps its subject and carries the reply
			// subject of its acknowledgement.
			if strings.HasPrefix(m.Reply, "$JS.ACK."+messages.RequestsStream+".") && strings.Contains(string(m.Data), secret) {
				break
			}
		}
	}
	// The server delivered it to every subscriber at once; the operator's
	// subscriptions have nothing.
	for i, sub := range opSubs {
		if m, err := sub.NextMsg(200 * time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
			t.Fatalf("the operator, subscribed to %s, got %v (%v)", targets[i], m, err)
		}
	}
}

// TestInboxesPerRole: each role may subscribe to its own inboxes and no
// other role's, nor to every inbox.
func TestInboxesPerRole(t *testing.T) {
	wpub, wsub := WorkerPermissions("h1")
	w2pub, w2sub := WorkerPermissions("h2")
	opub, osub := client.OrchestratorPermissions()
	ppub, psub := client.OperatorPermissions()
	roles := []struct {
		user, inbox string
		perms       [2][]string
	}{
		{"worker-h1", WorkerInbox("h1"), [2][]string{wpub, wsub}},
		{"worker-h2", WorkerInbox("h2"), [2][]string{w2pub, w2sub}},
		{"orchestrator", client.OrchestratorInbox, [2][]string{opub, osub}},
		{"operator", client.OperatorInbox, [2][]string{ppub, psub}},
	}
	users := map[string][2][]string{}
	for _, r := range roles {
		users[r.user] = r.perms
	}
	srv := startUsersServer(t, users)
	for _, r := range roles {
		for _, other := range roles {
			name := r.user + " subscribes to the inboxes of " + other.user
			t.Run(name, func(t *testing.T) {
				s := connectAs(t, srv, r.user, r.inbox)
				if _, err := s.nc.SubscribeSync(other.inbox + ".>"); err != nil {
					t.Fatal(err)
				}
				refused := s.refused(t)
				if r.user == other.user && len(refused) > 0 {
					t.Fatalf("refused its own inboxes: %q", refused)
				}
				if r.user != other.user && !slices.Equal(refused, []string{other.inbox + ".>"}) {
					t.Fatalf("refused %q, want %s", refused, other.inbox+".>")
				}
			})
		}
		t.Run(r.user+" subscribes to every inbox", func(t *testing.T) {
			s := connectAs(t, srv, r.user, r.inbox)
			if _, err := s.nc.SubscribeSync("_INBOX.>"); err != nil {
				t.Fatal(err)
			}
			if refused := s.refused(t); !slices.Equal(refused, []string{"_INBOX.>"}) {
				t.Fatalf("refused %q, want _INBOX.>", refused)
			}
		})
	}
}

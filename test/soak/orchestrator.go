package soak

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// Mix weighs the kinds of jobs the orchestrator submits.
type Mix struct {
	Run, RunExit, TeardownNone, TeardownEarly, Deadline, Hang, Duplicate, NoImage, Bad int
}

// DefaultMix is the soak's mix of jobs, in parts of 100.
var DefaultMix = Mix{Run: 40, RunExit: 5, TeardownNone: 15, TeardownEarly: 10, Deadline: 5, Hang: 3, Duplicate: 6, NoImage: 5, Bad: 11}

// corpusEntry is one bad request of pkg/messages/testdata/bad.
type corpusEntry struct {
	File           string             `json:"file"`
	Subject        string             `json:"subject"`
	Code           messages.ErrorCode `json:"code"`
	JobID          string             `json:"job_id"`
	FailedEvent    bool               `json:"failed_event"`
	PublishRefused bool               `json:"publish_refused"`
	Requires       string             `json:"requires"`
	data           []byte
}

// loadCorpus reads the bad requests that need nothing but a worker.
func loadCorpus(dir string) ([]corpusEntry, error) {
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, fmt.Errorf("bad-request corpus: %w", err)
	}
	var m struct {
		Entries []corpusEntry `json:"entries"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("bad-request corpus: %w", err)
	}
	var out []corpusEntry
	for _, e := range m.Entries {
		if e.Requires != "" || e.PublishRefused {
			continue
		}
		if e.data, err = os.ReadFile(filepath.Join(dir, e.File)); err != nil {
			return nil, fmt.Errorf("bad-request corpus: %w", err)
		}
		out = append(out, e)
	}
	return out, nil
}

// jobState is what the orchestrator knows of a job, from its events.
type jobState struct {
	job check.Job
	// needsTeardown: the orchestrator ends the job with a teardown.
	needsTeardown bool
	// host is the host of the job's newest event that is not a dropped
	// one: where a teardown goes (docs/protocol.md 2.5).
	host     string
	terminal bool
	sentTo   map[string]bool
	// scheduled: a teardown is due or sent.
	scheduled bool
	// duplicate: the provision's payload and subject, published again
	// once the runner runs; dupSeq is where the copy was stored.
	payload   []byte
	subject   string
	dupSent   bool
	dupDone   bool
	dupSeq    uint64
	firstSeen bool
	// stored: a publish of the provision was stored.
	stored bool
}

// Orchestrator submits the soak's jobs and ends those that need a
// teardown, as an orchestrator of the protocol would.
type Orchestrator struct {
	js jetstream.JetStream
	// c submits the well-formed requests and the teardowns, as an
	// orchestrator on pkg/client would; js publishes what pkg/client
	// cannot (the corpus, a request repeated under another Nats-Msg-Id).
	c *client.Client
	// rng decides the jobs (Submit's goroutine only); erng the delays of
	// teardowns (under mu).
	rng, erng *rand.Rand
	hosts     []check.Host
	runID     string
	mix       Mix
	corpus    []corpusEntry
	logf      func(string, ...any)
	// real: the jobs run on real guests, whose stub runner (test/guest)
	// reads its run time and exit code from its labels.
	real bool

	// ctx bounds the orchestrator's own publishes (teardowns, repeated
	// requests), which outlive the moment that decided them.
	ctx context.Context

	mu       sync.Mutex
	jobs     map[string]*jobState
	order    []string
	requests []check.Request
	nBad     int
	nUnknown int

	tasks conc.WaitGroup
}

// NewOrchestrator makes an orchestrator for hosts; runID prefixes every
// job id.
func NewOrchestrator(js jetstream.JetStream, seed int64, runID string, hosts []check.Host, mix Mix, corpus []corpusEntry, logf func(string, ...any)) *Orchestrator {
	return &Orchestrator{js: js, c: client.New(js, client.WithIdentity("soak")), rng: rand.New(rand.NewPCG(uint64(seed), 0x5eed)), erng: rand.New(rand.NewPCG(uint64(seed), 0xe7e7)), hosts: hosts, runID: runID,
		mix: mix, corpus: corpus, logf: logf, jobs: map[string]*jobState{}}
}

// publish stores a request, trying again with the same Nats-Msg-Id
// while the cluster does not answer (a retry is stored once, 4), until
// ctx ends.
func (o *Orchestrator) publish(ctx context.Context, jobID, op, subject string, data []byte, msgID string) check.Request {
	r := check.Request{Time: time.Now(), JobID: jobID, Op: op, Subject: subject, MsgID: msgID}
	var opts []jetstream.PublishOpt
	if msgID != "" {
		// A bad request goes as the corpus has it, without headers: NATS
		// counts them against the stream's max_msg_size (1).
		opts = append(opts, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.RequestsStream))
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := o.js.Publish(pctx, subject, data, opts...)
		cancel()
		if err == nil {
			r.Stream, r.Duplicate = ack.Sequence, ack.Duplicate
			break
		}
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.Code == 400 || ctx.Err() != nil {
			r.Err = err.Error()
			break
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
	o.mu.Lock()
	o.requests = append(o.requests, r)
	o.mu.Unlock()
	return r
}

func (o *Orchestrator) carriers(image string) []string {
	var out []string
	for _, h := range o.hosts {
		if slices.Contains(h.Images, image) {
			out = append(out, h.ID)
		}
	}
	return out
}

func (o *Orchestrator) images() []string {
	var all []string
	for _, h := range o.hosts {
		for _, img := range h.Images {
			if !slices.Contains(all, img) {
				all = append(all, img)
			}
		}
	}
	slices.Sort(all)
	return all
}

// NoImage is the image no host carries (it matches the hosts' --images
// patterns, so a pinned request is served and fails to clone).
const NoImage = "soak-nobody"

func (o *Orchestrator) pick(weights ...int) int {
	total := 0
	for _, w := range weights {
		total += w
	}
	n := o.rng.IntN(total)
	for i, w := range weights {
		if n < w {
			return i
		}
		n -= w
	}
	return len(weights) - 1
}

// Submit submits job n: it decides its kind, route and image, and
// publishes it.
func (o *Orchestrator) Submit(ctx context.Context, n int) {
	m := o.mix
	hang := m.Hang
	if o.real {
		hang = 0 // a real guest's agent always answers
	}
	kind := o.pick(m.Run, m.RunExit, m.TeardownNone, m.TeardownEarly, m.Deadline, hang, m.Duplicate, m.NoImage, m.Bad)
	if kind == 8 && len(o.corpus) > 0 {
		o.submitBad(ctx)
		return
	}
	imgs := o.images()
	image := imgs[o.rng.IntN(len(imgs))]
	if o.rng.IntN(100) < 50 {
		image = "soak-all" // most jobs run anywhere
		if !slices.Contains(imgs, image) {
			image = imgs[0]
		}
	}
	route := []check.Route{check.RouteShared, check.RouteImage, check.RoutePinned}[o.pick(3, 5, 2)]
	id := fmt.Sprintf("%s-%05d", o.runID, n)
	j := check.Job{Route: route, Image: image, Runner: string(messages.RunnerForgejo)}
	p := messages.Provision{V: messages.SchemaVersion, Image: image, BootTimeoutS: 60, MaxLifetimeS: 3600}
	if o.real {
		p.BootTimeoutS = 300
	}
	st := &jobState{}
	labels := []string{"soak"}
	switch kind {
	case 0, 1:
		j.Kind = check.KindRun
		ms := 300 + o.rng.IntN(7700)
		id += fmt.Sprintf("-r%d", ms)
		labels = append(labels, fmt.Sprintf("stub-sleep=%d", 1+ms/1000))
		if kind == 1 {
			j.ExitCode = 1 + o.rng.IntN(3)
			id += fmt.Sprintf("-x%d", j.ExitCode)
			labels = append(labels, fmt.Sprintf("stub-exit=%d", j.ExitCode))
		}
	case 2:
		j.Kind, j.Runner, st.needsTeardown = check.KindTeardown, string(messages.RunnerNone), true
	case 3:
		j.Kind, st.needsTeardown = check.KindTeardown, true
		id += "-r600000"
		labels = append(labels, "stub-sleep=600")
	case 4:
		j.Kind = check.KindDeadline
		p.MaxLifetimeS = 3 + o.rng.Int64N(3)
		id += "-r600000"
		labels = append(labels, "stub-sleep=600")
	case 5:
		j.Kind = check.KindHang
		p.BootTimeoutS = 2
		id += "-hang"
	case 6:
		// A repeated request (another Nats-Msg-Id) once the machine is
		// ready: 5.2 Q. The job is ended by a teardown once the copy is
		// settled, so that the copy cannot outlive it.
		j.Kind, j.Runner, j.Duplicated, st.needsTeardown = check.KindTeardown, string(messages.RunnerNone), true, true
	case 7:
		j.Kind, j.Image, p.Image = check.KindNoImage, NoImage, NoImage
	}
	if j.Runner == string(messages.RunnerNone) {
		p.Runner = messages.Runner{Kind: messages.RunnerNone}
	} else {
		p.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
			Token: "soak-token-" + strconv.Itoa(n), Labels: labels,
		}}
	}
	subject := messages.ProvisionSubject()
	switch route {
	case check.RouteImage:
		subject = messages.ImageProvisionSubject(p.Image)
	case check.RoutePinned:
		hosts := o.carriers(p.Image)
		if len(hosts) == 0 {
			for _, h := range o.hosts {
				hosts = append(hosts, h.ID)
			}
		}
		j.Host = hosts[o.rng.IntN(len(hosts))]
		subject = messages.HostProvisionSubject(j.Host)
	}
	j.ID, p.JobID = id, id
	p.RequestedAt = time.Now().UTC()
	data, err := messages.Marshal(&p)
	if err != nil {
		o.logf("soak: marshal job %s: %v", id, err)
		return
	}
	j.Submitted = time.Now()
	st.job, st.payload, st.subject, st.sentTo = j, data, subject, map[string]bool{}
	if j.Route == check.RoutePinned {
		st.host = j.Host
	}
	o.mu.Lock()
	o.jobs[id] = st
	o.order = append(o.order, id)
	o.mu.Unlock()
	// The soak's workers hold no sealing keys: the secret goes in the
	// clear, without a registry read per submit.
	opts := []client.SubmitOption{client.WithSealing(client.SealNever)}
	switch route {
	case check.RouteImage:
		opts = append(opts, client.OnImage())
	case check.RoutePinned:
		opts = append(opts, client.OnHost(j.Host))
	}
	o.stored(id, o.submit(ctx, p, opts))
	if o.rng.IntN(20) == 0 {
		// A retried submit within the duplicate window is stored once (4).
		o.submit(ctx, p, opts)
	}
}

// submit submits p through pkg/client and records the request. While a
// NATS node is down the stream may have no leader for a moment (no
// responders): the soak submits again, as an orchestrator would.
func (o *Orchestrator) submit(ctx context.Context, p messages.Provision, opts []client.SubmitOption) check.Request {
	r := check.Request{Time: time.Now(), JobID: p.JobID, Op: "provision", MsgID: "provision:" + p.JobID}
	job, err := retryUnanswered(ctx, func(ctx context.Context) (*client.Job, error) { return o.c.Submit(ctx, p, opts...) })
	if err != nil {
		r.Err = err.Error()
	} else {
		r.Subject, r.Stream, r.Duplicate = job.Receipt.Subject, job.Receipt.Sequence, job.Receipt.Duplicate
	}
	o.mu.Lock()
	o.requests = append(o.requests, r)
	o.mu.Unlock()
	return r
}

// retryUnanswered calls fn until it succeeds, fails otherwise than for
// want of an answer, or ctx ends.
func retryUnanswered[T any](ctx context.Context, fn func(context.Context) (T, error)) (T, error) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		v, err := fn(ctx)
		if err == nil || ctx.Err() != nil || !errors.Is(err, client.ErrUnreachable) && !errors.Is(err, jetstream.ErrNoStreamResponse) {
			return v, err
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

// submitBad publishes a request of the corpus, its job id made unique.
func (o *Orchestrator) submitBad(ctx context.Context) {
	e := o.corpus[o.rng.IntN(len(o.corpus))]
	o.mu.Lock()
	o.nBad++
	n := o.nBad
	o.mu.Unlock()
	data := e.data
	id := fmt.Sprintf("%s-corpus-%04d", o.runID, n)
	if e.JobID != "" {
		// Same length, so that the msgpack around it is unchanged.
		fresh := fmt.Sprintf("%03s%s", strconv.FormatInt(int64(n%46656), 36), e.JobID[3:])
		data = bytes.ReplaceAll(data, []byte(e.JobID), []byte(fresh))
		id = fresh
	}
	j := check.Job{ID: id, Kind: check.KindBad, Route: check.RouteShared, Submitted: time.Now(),
		Bad: &check.Bad{File: e.File, Subject: e.Subject, Code: e.Code, FailedEvent: e.FailedEvent}}
	subject := messages.ProvisionSubject()
	if e.Subject == "teardown" {
		h := o.hosts[o.rng.IntN(len(o.hosts))].ID
		subject, j.Host, j.Route = messages.TeardownSubject(h), h, check.RoutePinned
	}
	o.mu.Lock()
	o.jobs[id] = &jobState{job: j, sentTo: map[string]bool{}}
	o.order = append(o.order, id)
	o.mu.Unlock()
	op := "provision"
	if e.Subject == "teardown" {
		op = "teardown-bad"
	}
	o.stored(id, o.publish(ctx, id, op, subject, data, ""))
}

// stored notes that job id's request was stored.
func (o *Orchestrator) stored(id string, r check.Request) {
	if r.Err != "" {
		return
	}
	o.mu.Lock()
	o.jobs[id].stored = true
	o.mu.Unlock()
}

// OnEvent follows a job from its events: it learns the job's host, and
// sends teardowns and repeated requests when their time has come.
func (o *Orchestrator) OnEvent(ctx context.Context, e check.Event) {
	ev := e.Event
	o.mu.Lock()
	defer o.mu.Unlock()
	st, ok := o.jobs[ev.JobID]
	if !ok || e.Err != "" {
		return
	}
	if ev.State != messages.StateDropped {
		st.host = ev.Host
	}
	if ev.State.Terminal() {
		st.terminal = true
		return
	}
	if st.terminal || !st.needsTeardown {
		return
	}
	if len(st.sentTo) > 0 && !st.sentTo[st.host] && ev.State != messages.StateDropped {
		// The job went on elsewhere after the teardown was sent: send
		// it where the job is now.
		o.teardownLocked(ctx, st, 0)
		return
	}
	if st.scheduled {
		return
	}
	ready := ev.State == messages.StateAgentReady && st.job.Runner == string(messages.RunnerNone) || ev.State == messages.StateRunnerStarted
	switch {
	case st.job.Duplicated && ready && !st.dupSent:
		st.dupSent, st.scheduled = true, true
		delay := time.Duration(o.erng.IntN(10000)) * time.Millisecond
		o.tasks.Go(func() { o.duplicate(ctx, st, delay) })
	case !st.job.Duplicated && st.job.Runner == string(messages.RunnerNone) && ready:
		st.scheduled = true
		o.teardownLocked(ctx, st, time.Duration(o.erng.IntN(2000))*time.Millisecond)
	case !st.job.Duplicated && st.job.Runner != string(messages.RunnerNone) && !st.firstSeen:
		st.firstSeen, st.scheduled = true, true
		o.teardownLocked(ctx, st, time.Duration(o.erng.IntN(3000))*time.Millisecond)
	}
}

// teardownLocked sends a teardown for st to its current host after
// delay; o.mu is held.
func (o *Orchestrator) teardownLocked(ctx context.Context, st *jobState, delay time.Duration) {
	o.tasks.Go(func() {
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		o.mu.Lock()
		host, id := st.host, st.job.ID
		if st.terminal || host == "" || st.sentTo[host] {
			o.mu.Unlock()
			return
		}
		st.sentTo[host] = true
		o.mu.Unlock()
		o.sendTeardown(ctx, id, host)
	})
}

func (o *Orchestrator) sendTeardown(ctx context.Context, id, host string) {
	r := check.Request{Time: time.Now(), JobID: id, Op: "teardown", Subject: messages.TeardownSubject(host), MsgID: "teardown:" + host + ":" + id}
	rc, err := retryUnanswered(ctx, func(ctx context.Context) (client.Receipt, error) {
		return o.c.Job(id, client.AtHost(host)).Teardown(ctx, "soak")
	})
	if err != nil {
		r.Err = err.Error()
	} else {
		r.Stream, r.Duplicate = rc.Sequence, rc.Duplicate
	}
	o.mu.Lock()
	o.requests = append(o.requests, r)
	o.mu.Unlock()
	if r.Err != "" {
		o.mu.Lock()
		if st, ok := o.jobs[id]; ok {
			delete(st.sentTo, host) // Finish sends it again
		}
		o.mu.Unlock()
	}
}

// duplicate publishes st's provision again under another Nats-Msg-Id
// after delay, waits until a worker settled the copy (it left the work
// queue), then ends the job.
func (o *Orchestrator) duplicate(ctx context.Context, st *jobState, delay time.Duration) {
	pause(ctx, delay)
	o.mu.Lock()
	ended := st.terminal
	o.mu.Unlock()
	// An orchestrator repeats a request only for a job that runs; one
	// sent after the job ended reuses its id, which is undefined (4).
	if !ended {
		r := o.publish(ctx, st.job.ID, "provision", st.subject, st.payload, "again:"+st.job.ID)
		if r.Stream != 0 {
			o.waitGone(ctx, r.Stream, 2*time.Minute)
		}
		o.mu.Lock()
		st.dupSeq = r.Stream
		o.mu.Unlock()
	}
	o.mu.Lock()
	st.dupDone = true
	o.teardownLocked(ctx, st, 0)
	o.mu.Unlock()
}

// waitGone waits until the request stream no longer holds message seq.
func (o *Orchestrator) waitGone(ctx context.Context, seq uint64, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		if s, err := o.js.Stream(ctx, messages.RequestsStream); err == nil {
			if _, err := s.GetMsg(ctx, seq); errors.Is(err, jetstream.ErrMsgNotFound) {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Storm sends teardowns to host for every job it serves now, for a few
// jobs it finished (no event may follow) and for a few job ids nobody
// ever submitted (torn_down with unknown_job, 5.2 H).
func (o *Orchestrator) Storm(host string) int {
	o.mu.Lock()
	var live, done []string
	for _, id := range o.order {
		st := o.jobs[id]
		if st.job.Kind == check.KindBad || st.host != host {
			continue
		}
		if st.terminal {
			done = append(done, id)
		} else if len(st.sentTo) == 0 {
			live = append(live, id)
			st.needsTeardown, st.scheduled = true, true
			st.sentTo[host] = true
		}
	}
	if len(done) > 3 {
		done = done[len(done)-3:]
	}
	var unknown []string
	for range 3 {
		o.nUnknown++
		unknown = append(unknown, fmt.Sprintf("%s-never-%04d", o.runID, o.nUnknown))
	}
	o.mu.Unlock()
	all := append(append(live, done...), unknown...)
	for _, id := range all {
		// The storm's teardowns outlive the fault: ctx is the
		// orchestrator's.
		o.tasks.Go(func() { o.sendTeardown(o.ctx, id, host) })
	}
	return len(all)
}

// Finish sends the teardowns still due and waits until every job that
// must end has ended, or no job ended for timeout (a backlog that still
// drains is waited for, however long: the soak asserts what ends, not
// how fast); it returns the jobs still open.
func (o *Orchestrator) Finish(ctx context.Context, timeout time.Duration) []string {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	idle := time.NewTimer(timeout)
	defer idle.Stop()
	last := -1
	for {
		var open []string
		o.mu.Lock()
		for _, id := range o.order {
			st := o.jobs[id]
			if end, _ := mustEnd(st.job); !end || st.terminal || !st.stored {
				continue
			}
			open = append(open, id)
			if st.needsTeardown && st.host != "" && !st.sentTo[st.host] && (!st.job.Duplicated || st.dupDone || !st.dupSent) {
				st.scheduled = true
				o.teardownLocked(ctx, st, 0)
			}
		}
		o.mu.Unlock()
		if len(open) == 0 {
			return nil
		}
		if last < 0 || len(open) < last {
			idle.Reset(timeout)
		}
		last = len(open)
		select {
		case <-ctx.Done():
			return open
		case <-idle.C:
			return open
		case <-t.C:
		}
	}
}

// mustEnd mirrors check's rule of which jobs reach a terminal event.
func mustEnd(j check.Job) (end, silent bool) {
	switch {
	case j.Kind == check.KindNoImage && j.Route == check.RouteImage:
		return false, true
	case j.Kind == check.KindBad:
		return j.Bad.FailedEvent, !j.Bad.FailedEvent
	}
	return true, false
}

// Wait waits for the orchestrator's pending publishes.
func (o *Orchestrator) Wait() { o.tasks.Wait() }

// Jobs and Requests are what the orchestrator did.
func (o *Orchestrator) Jobs() []check.Job {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]check.Job, 0, len(o.order))
	for _, id := range o.order {
		out = append(out, o.jobs[id].job)
	}
	return out
}

func (o *Orchestrator) Requests() []check.Request {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]check.Request(nil), o.requests...)
}

// Open counts the jobs that have not ended yet.
func (o *Orchestrator) Open() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, st := range o.jobs {
		if end, _ := mustEnd(st.job); end && !st.terminal && st.stored {
			n++
		}
	}
	return n
}

// runIDFor names a run by its seed: a letter and four base-36 digits, so
// that job ids stay short and a run's machines are recognisable.
func runIDFor(seed int64) string {
	s := strings.Repeat("0", 4) + strconv.FormatUint(uint64(seed)%1679616, 36)
	return "s" + s[len(s)-4:]
}

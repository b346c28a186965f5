package check

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Violation is one broken promise.
type Violation struct {
	// Invariant names the promise (see Invariants).
	Invariant string `json:"invariant"`
	// Section is where docs/protocol.md makes it.
	Section string `json:"section"`
	JobID   string `json:"job_id,omitempty"`
	Host    string `json:"host,omitempty"`
	Detail  string `json:"detail"`
}

// Invariants lists every promise Check checks, with its section of
// docs/protocol.md and what breaks it.
var Invariants = []struct{ Name, Section, Promise string }{
	{"terminal", "5.1, 8", "every job that must end has exactly one terminal event (torn_down or failed); a job that must not be served (by image, for an image nobody carries; a bad request without a readable job id) has no event"},
	{"outcome", "5.2, 5.5, 6.5", "the terminal event is the one the job's kind asks for (runner exit: torn_down runner_exited; deadline: failed deadline_exceeded; teardown: torn_down requested; agent that never answers: boot_timeout; image nobody carries: image_not_found; bad request: its corpus code), or one its teardown or an injected fault explains"},
	{"exit_code", "5.2 A, 7.5", "runner_exited carries the runner's exit code"},
	{"after_terminal", "5.1, 5.2 notes, 6.1", "no event of a job follows its terminal event (but another host's dropped): no request is served after the job ended"},
	{"one_host", "2.4", "no two hosts run a job's runner at once: the intervals from a host's runner_started to its end of the machine (torn_down, failed, dropped, or a new accepted) never overlap across hosts"},
	{"dropped", "5.1, 5.2 Q R", "a dropped event names a holder other than its host, and the job has events of another host that carry it on (or, when the holder died before its first event, of a later delivery)"},
	{"seq", "5.3", "a job's events in stream order have seq 1, 2, 3 ... (strictly increasing, without gaps: the soak's stream has no limits)"},
	{"transitions", "5.1, 5.2, 5.3", "each host's events of a job follow the state diagram, and a build's steps carry its accepted's attempt"},
	{"msg_id", "8", "every event's Nats-Msg-Id is <job_id>:<state>:<attempt or origin>[...]"},
	{"undecodable", "3.5", "every event decodes, and its subject names its host, job and state"},
	{"leftovers", "5.6, 6.4", "no machine or volume is left on any host once the soak drained"},
	{"requests_left", "2.5, 6.1, 6.2", "the request stream holds nothing at the end but provisions for an image nobody carries sent by image, and those are still there (no request lost)"},
	{"bad_code", "5.2 G, 6.1", "a terminated bad request's advisory gives its documented code"},
	{"capacity", "6.3", "no sample saw more operations in flight than --parallelism, or more machines (the worker's count, or stretchy- domains in its libvirt) than --max-vms"},
}

var sections = func() map[string]string {
	m := map[string]string{}
	for _, in := range Invariants {
		m[in.Name] = in.Section
	}
	return m
}()

// Report is Check's verdict.
type Report struct {
	Violations []Violation `json:"violations"`
	Summary    Summary     `json:"summary"`
}

// Summary counts what the history holds.
type Summary struct {
	Jobs        int                  `json:"jobs"`
	JobsByKind  map[string]int       `json:"jobs_by_kind"`
	Outcomes    map[string]int       `json:"outcomes"`
	Faults      map[FaultKind]int    `json:"faults"`
	Events      int                  `json:"events"`
	Requests    int                  `json:"requests"`
	Settlements int                  `json:"settlements"`
	Samples     int                  `json:"samples"`
	Peak        map[string]PeakUsage `json:"peak"`
	Explained   map[string]int       `json:"explained"`
}

// PeakUsage is the most a host's samples saw.
type PeakUsage struct {
	OpsInFlight int `json:"ops_in_flight"`
	Machines    int `json:"machines"`
	Domains     int `json:"domains"`
}

// jobView is what the history holds of one job id.
type jobView struct {
	id        string
	job       *Job // nil: never submitted (an event of an unknown job)
	events    []Event
	teardowns []Request // published teardowns, in time order
	// terminal is the first terminal event, if any.
	terminal *Event
}

type checker struct {
	h      *History
	jobs   map[string]*jobView
	order  []string
	report Report
}

// Check judges h.
func Check(h *History) Report {
	c := &checker{h: h, jobs: map[string]*jobView{}}
	c.index()
	c.summarize()
	c.checkEvents()
	for _, id := range c.order {
		v := c.jobs[id]
		c.checkTerminal(v)
		c.checkOutcome(v)
		c.checkAfterTerminal(v)
		c.checkSeq(v)
		c.checkTransitions(v)
		c.checkDropped(v)
	}
	c.checkOneHost()
	c.checkLeftovers()
	c.checkRequestsLeft()
	c.checkBadCodes()
	c.checkCapacity()
	return c.report
}

func (c *checker) add(inv, job, host, format string, args ...any) {
	c.report.Violations = append(c.report.Violations, Violation{
		Invariant: inv, Section: sections[inv], JobID: job, Host: host, Detail: fmt.Sprintf(format, args...),
	})
}

func (c *checker) view(id string) *jobView {
	v, ok := c.jobs[id]
	if !ok {
		v = &jobView{id: id}
		c.jobs[id] = v
		c.order = append(c.order, id)
	}
	return v
}

func (c *checker) index() {
	for i := range c.h.Jobs {
		c.view(c.h.Jobs[i].ID).job = &c.h.Jobs[i]
	}
	events := slices.Clone(c.h.Events)
	sort.Slice(events, func(i, j int) bool { return events[i].Stream < events[j].Stream })
	for _, e := range events {
		if e.Err != "" || e.Event.JobID == "" {
			continue
		}
		v := c.view(e.Event.JobID)
		v.events = append(v.events, e)
		if v.terminal == nil && e.Event.State.Terminal() {
			ev := e
			v.terminal = &ev
		}
	}
	reqs := slices.Clone(c.h.Requests)
	sort.SliceStable(reqs, func(i, j int) bool { return reqs[i].Time.Before(reqs[j].Time) })
	for _, r := range reqs {
		if r.Op == "teardown" && r.Err == "" {
			v := c.view(r.JobID)
			v.teardowns = append(v.teardowns, r)
		}
	}
}

func (c *checker) summarize() {
	s := &c.report.Summary
	s.JobsByKind, s.Outcomes, s.Faults = map[string]int{}, map[string]int{}, map[FaultKind]int{}
	s.Peak, s.Explained = map[string]PeakUsage{}, map[string]int{}
	s.Jobs, s.Events, s.Requests = len(c.h.Jobs), len(c.h.Events), len(c.h.Requests)
	s.Settlements, s.Samples = len(c.h.Settlements), len(c.h.Samples)
	for _, j := range c.h.Jobs {
		k := string(j.Kind) + "/" + string(j.Route)
		if j.Duplicated {
			k += "/duplicated"
		}
		s.JobsByKind[k]++
	}
	for _, f := range c.h.Faults {
		s.Faults[f.Kind]++
	}
	for _, sm := range c.h.Samples {
		p := s.Peak[sm.Host]
		p.OpsInFlight, p.Machines, p.Domains = max(p.OpsInFlight, sm.OpsInFlight), max(p.Machines, sm.Machines), max(p.Domains, sm.Domains)
		s.Peak[sm.Host] = p
	}
	for _, id := range c.order {
		if t := c.jobs[id].terminal; t != nil {
			s.Outcomes[outcomeName(t.Event)]++
		} else if c.jobs[id].job != nil {
			s.Outcomes["(none)"]++
		}
	}
}

func outcomeName(ev messages.Event) string {
	s := string(ev.State)
	if ev.Error != nil {
		s += " " + string(ev.Error.Code)
	}
	if ev.Reason != "" {
		s += " (" + ev.Reason + ")"
	}
	return s
}

// mustEnd reports whether the job must reach a terminal event, and
// silent whether it must have no event at all.
func mustEnd(j *Job) (end, silent bool) {
	switch {
	case j.Kind == KindNoImage && j.Route == RouteImage:
		return false, true
	case j.Kind == KindBad:
		return j.Bad.FailedEvent, !j.Bad.FailedEvent
	}
	return true, false
}

// published reports whether a provision of the job was stored.
func (c *checker) published(id string) bool {
	for _, r := range c.h.Requests {
		if r.JobID == id && r.Op == "provision" && r.Err == "" {
			return true
		}
	}
	return false
}

func (c *checker) checkTerminal(v *jobView) {
	var terminals []string
	for _, e := range v.events {
		if e.Event.State.Terminal() {
			terminals = append(terminals, fmt.Sprintf("%s from %s (stream %d)", outcomeName(e.Event), e.Event.Host, e.Stream))
		}
	}
	if v.job == nil {
		if len(v.teardowns) == 0 {
			c.add("terminal", v.id, "", "events of a job nobody submitted or tore down")
		} else if len(terminals) != 1 {
			c.add("terminal", v.id, "", "a teardown for a job never provisioned has %d terminal events, want its one torn_down unknown_job: %s", len(terminals), strings.Join(terminals, "; "))
		}
		return
	}
	end, silent := mustEnd(v.job)
	if !c.published(v.id) && (v.job.Kind != KindBad || v.job.Bad.Subject == "provision") {
		end, silent = false, true // the server stored no provision of it
	}
	switch {
	case silent && len(v.events) > 0:
		c.add("terminal", v.id, "", "a job that must have no event has %d (first: %s from %s)", len(v.events), v.events[0].Event.State, v.events[0].Event.Host)
	case end && len(terminals) == 0:
		c.add("terminal", v.id, "", "no terminal event")
	case len(terminals) > 1:
		c.add("terminal", v.id, "", "%d terminal events: %s", len(terminals), strings.Join(terminals, "; "))
	}
}

// faultsFor are the fault kinds that can explain a failure code a job's
// kind does not ask for, and whether the fault must concern the host
// that published the failure (or, for a guest stop, the job itself).
var faultsFor = map[messages.ErrorCode]struct {
	kinds []FaultKind
	local bool
}{
	// 5.2 K, M: the machine was found shut off or gone.
	messages.CodeMachineStopped: {[]FaultKind{FaultGuestStop, FaultLibvirtRestart}, true},
	// 6.2: every delivery's worker died or lost NATS.
	messages.CodeMaxDeliveries: {[]FaultKind{FaultWorkerKill, FaultWorkerStop, FaultNATSKill, FaultNATSKillTwo, FaultLibvirtRestart}, false},
	// 5.5: libvirt unreachable on the final delivery, or the guest
	// stopped while it booted.
	messages.CodeCloneFailed:       {[]FaultKind{FaultLibvirtRestart}, true},
	messages.CodeBootFailed:        {[]FaultKind{FaultLibvirtRestart, FaultGuestStop}, true},
	messages.CodeAgentFailed:       {[]FaultKind{FaultLibvirtRestart, FaultGuestStop}, true},
	messages.CodeRunnerStartFailed: {[]FaultKind{FaultLibvirtRestart, FaultGuestStop}, true},
	// 5.5: event publishing or libvirt lookups failed on the final delivery.
	messages.CodeInternal: {[]FaultKind{FaultLibvirtRestart, FaultNATSKill, FaultNATSKillTwo, FaultWorkerStop, FaultWorkerKill}, false},
	// A host whose libvirtd restarted has no image until it is defined
	// again (the test driver starts empty; the soak defines its images
	// at once).
	messages.CodeImageNotFound: {[]FaultKind{FaultLibvirtRestart}, true},
}

// faultSlack is how long after a fault healed it may still explain an
// outcome: an image list refreshed every 30 s, a reconciliation every
// minute, a redelivery's backoff.
const faultSlack = 90 * time.Second

// explainingFault returns a fault that explains e's failure for v.
func (c *checker) explainingFault(v *jobView, e Event) (Fault, bool) {
	if e.Event.Error == nil {
		return Fault{}, false
	}
	rule, ok := faultsFor[e.Event.Error.Code]
	if e.Event.Error.Code == messages.CodeAgentFailed && e.Event.Reason == messages.ReasonRunnerLost {
		// 5.2 notes: the agent reported the exit to a worker killed
		// before it stored runner_exited; qemu-ga reports it once.
		rule, ok = struct {
			kinds []FaultKind
			local bool
		}{[]FaultKind{FaultWorkerKill}, true}, true
	}
	if !ok {
		return Fault{}, false
	}
	from := e.Stored
	if v.job != nil {
		from = v.job.Submitted
	}
	for _, f := range c.h.Faults {
		if !slices.Contains(rule.kinds, f.Kind) || f.Start.After(e.Stored) || f.End.Add(faultSlack).Before(from) {
			continue
		}
		if rule.local {
			if f.Kind == FaultGuestStop && f.Target != v.id {
				continue
			}
			if f.Kind != FaultGuestStop && f.Target != e.Event.Host {
				continue
			}
		}
		return f, true
	}
	return Fault{}, false
}

// teardownBefore returns the first teardown published for v before t,
// to host when host is not empty.
func (v *jobView) teardownBefore(t time.Time, host string) (Request, bool) {
	for _, r := range v.teardowns {
		if r.Time.Before(t) && (host == "" || r.Subject == messages.TeardownSubject(host)) {
			return r, true
		}
	}
	return Request{}, false
}

func code(ev messages.Event) messages.ErrorCode {
	if ev.Error == nil {
		return ""
	}
	return ev.Error.Code
}

// wanted reports whether ev is the outcome j's kind asks for.
func wanted(j *Job, ev messages.Event) bool {
	switch j.Kind {
	case KindRun:
		return ev.State == messages.StateTornDown && ev.Error == nil && ev.Reason == messages.ReasonRunnerExited
	case KindDeadline:
		return ev.State == messages.StateFailed && code(ev) == messages.CodeDeadlineExceeded && ev.Reason == messages.ReasonDeadline
	case KindTeardown:
		return ev.State == messages.StateTornDown && ev.Error == nil && ev.Reason == messages.ReasonRequested
	case KindHang:
		return ev.State == messages.StateFailed && code(ev) == messages.CodeBootTimeout
	case KindNoImage:
		return ev.State == messages.StateFailed && code(ev) == messages.CodeImageNotFound
	case KindBad:
		// A refused request's failed names no image or domain (5.2 G); a
		// shared request for an image nobody carries names its image (6.5).
		refused := j.Bad.Code != messages.CodeImageNotFound
		return ev.State == messages.StateFailed && code(ev) == j.Bad.Code && ev.Domain == "" && (!refused || ev.Image == "")
	}
	return false
}

func (c *checker) checkOutcome(v *jobView) {
	t := v.terminal
	if t == nil {
		return
	}
	ev := t.Event
	if v.job == nil {
		if len(v.teardowns) > 0 && !(ev.State == messages.StateTornDown && code(ev) == messages.CodeUnknownJob) {
			c.add("outcome", v.id, ev.Host, "a teardown for a job never provisioned ended %s, want torn_down unknown_job", outcomeName(ev))
		}
		return
	}
	if wanted(v.job, ev) {
		c.checkExitCode(v)
		return
	}
	// A teardown request the orchestrator published before the end
	// explains torn_down (requested), and unknown_job from the host it
	// was sent to (5.2 B, H, I).
	if _, ok := v.teardownBefore(t.Stored, ""); ok && ev.State == messages.StateTornDown && ev.Error == nil && ev.Reason == messages.ReasonRequested {
		c.report.Summary.Explained["teardown"]++
		return
	}
	if _, ok := v.teardownBefore(t.Stored, ev.Host); ok && ev.State == messages.StateTornDown && code(ev) == messages.CodeUnknownJob {
		c.report.Summary.Explained["teardown, unknown_job"]++
		return
	}
	if ev.State == messages.StateFailed {
		if f, ok := c.explainingFault(v, *t); ok {
			c.report.Summary.Explained[string(code(ev))+" by "+string(f.Kind)]++
			return
		}
	}
	c.add("outcome", v.id, ev.Host, "%s job (%s) ended %s; nothing the orchestrator sent or injected explains it", v.job.Kind, v.job.Route, outcomeName(ev))
}

func (c *checker) checkExitCode(v *jobView) {
	if v.job.Kind != KindRun {
		return
	}
	for _, e := range v.events {
		if e.Event.State != messages.StateRunnerExited {
			continue
		}
		if e.Event.ExitCode == nil || *e.Event.ExitCode != v.job.ExitCode {
			got := "none"
			if e.Event.ExitCode != nil {
				got = fmt.Sprint(*e.Event.ExitCode)
			}
			c.add("exit_code", v.id, e.Event.Host, "runner_exited exit_code %s, the runner exited with %d", got, v.job.ExitCode)
		}
	}
}

func (c *checker) checkAfterTerminal(v *jobView) {
	if v.terminal == nil {
		return
	}
	for _, e := range v.events {
		if e.Stream <= v.terminal.Stream {
			continue
		}
		if e.Event.State == messages.StateDropped && e.Event.Host != v.terminal.Event.Host {
			continue
		}
		if e.Event.State == messages.StateReleased && !v.terminal.Event.HeldUntil.IsZero() {
			continue
		}
		c.add("after_terminal", v.id, e.Event.Host, "%s (seq %d, attempt %d) after the terminal %s of %s", e.Event.State, e.Event.Seq, e.Event.Attempt, outcomeName(v.terminal.Event), v.terminal.Event.Host)
	}
}

func (c *checker) checkSeq(v *jobView) {
	for i, e := range v.events {
		if want := uint64(i + 1); e.Event.Seq != want {
			c.add("seq", v.id, e.Event.Host, "event %d of the job in stream order (%s, stream %d) has seq %d, want %d", i+1, e.Event.State, e.Stream, e.Event.Seq, want)
			return
		}
	}
}

// follows lists the states each state may be followed by on the same
// host (5.1's diagram). accepted (a new attempt, 5.2 F), tearing_down
// (a teardown, reconciliation), failed (a final delivery, max
// deliveries) and dropped may follow any state that is not terminal;
// torn_down with unknown_job may come at any time.
var follows = map[messages.State][]messages.State{
	"":                          {messages.StateAccepted, messages.StateTearingDown, messages.StateFailed, messages.StateDropped},
	messages.StateAccepted:      {messages.StateCloning},
	messages.StateCloning:       {messages.StateCloned},
	messages.StateCloned:        {messages.StateBooting},
	messages.StateBooting:       {messages.StateRunning},
	messages.StateRunning:       {messages.StateAgentReady},
	messages.StateAgentReady:    {messages.StateRunnerStarted},
	messages.StateRunnerStarted: {messages.StateRunnerExited},
	messages.StateRunnerExited:  nil,
	messages.StateTearingDown:   {messages.StateTornDown},
	messages.StateDropped:       nil,
	messages.StateTornDown:      {messages.StateReleased},
	messages.StateFailed:        {messages.StateReleased},
	messages.StateReleased:      nil,
}

// chain are the steps of one attempt after accepted: they carry its attempt.
var chain = []messages.State{messages.StateCloning, messages.StateCloned, messages.StateBooting, messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted}

func (c *checker) checkTransitions(v *jobView) {
	prev := map[string]*messages.Event{}
	for i := range v.events {
		ev := v.events[i].Event
		p := prev[ev.Host]
		prev[ev.Host] = &v.events[i].Event
		var from messages.State
		if p != nil {
			from = p.State
		}
		if from.Terminal() {
			continue // after_terminal's business
		}
		ok := slices.Contains(follows[from], ev.State)
		switch ev.State {
		case messages.StateAccepted, messages.StateTearingDown, messages.StateFailed, messages.StateDropped:
			ok = true
		case messages.StateTornDown:
			ok = ok || code(ev) == messages.CodeUnknownJob
		}
		if !ok {
			c.add("transitions", v.id, ev.Host, "%s (seq %d) after %s on the same host", ev.State, ev.Seq, stateName(from))
			continue
		}
		switch {
		case ev.State == messages.StateAccepted && p != nil && p.Attempt > 0 && p.State != messages.StateDropped && ev.Attempt <= p.Attempt:
			c.add("transitions", v.id, ev.Host, "accepted (seq %d) with attempt %d after %s with attempt %d: a new attempt must have a higher one", ev.Seq, ev.Attempt, p.State, p.Attempt)
		case slices.Contains(chain, ev.State) && p != nil && ev.Attempt != p.Attempt:
			c.add("transitions", v.id, ev.Host, "%s (seq %d) with attempt %d after %s with attempt %d", ev.State, ev.Seq, ev.Attempt, p.State, p.Attempt)
		}
	}
}

func stateName(s messages.State) string {
	if s == "" {
		return "nothing"
	}
	return string(s)
}

func (c *checker) checkDropped(v *jobView) {
	for _, e := range v.events {
		ev := e.Event
		if ev.State != messages.StateDropped {
			continue
		}
		if ev.Holder == ev.Host {
			c.add("dropped", v.id, ev.Host, "dropped (seq %d) names its own host as the holder", ev.Seq)
		}
		// The job goes on: another host's events carry it (the holder's,
		// before or after), or, when the holder died between its claim
		// and its first event, the redelivery's: any host's, this one's
		// too, with a higher attempt after the dropped.
		other := false
		for _, o := range v.events {
			if o.Event.State == messages.StateDropped {
				continue
			}
			if o.Event.Host != ev.Host || o.Stream > e.Stream && o.Event.Attempt > ev.Attempt {
				other = true
				break
			}
		}
		if !other {
			c.add("dropped", v.id, ev.Host, "dropped (seq %d, reason %s, holder %q) but no host carries the job on: no other host has an event of it, and this one none of a later delivery", ev.Seq, ev.Reason, ev.Holder)
		}
	}
}

// interval is a host's runner of a job, from its runner_started to its
// end, in stream sequences; end 0 is open.
type interval struct {
	host       string
	start, end uint64
}

func (c *checker) checkOneHost() {
	for _, id := range c.order {
		v := c.jobs[id]
		var ivs []interval
		open := map[string]int{} // host -> index in ivs
		for _, e := range v.events {
			ev := e.Event
			if i, ok := open[ev.Host]; ok {
				switch {
				case ev.State.Terminal(), ev.State == messages.StateDropped, ev.State == messages.StateAccepted:
					ivs[i].end = e.Stream
					delete(open, ev.Host)
				}
			}
			if ev.State == messages.StateRunnerStarted {
				open[ev.Host] = len(ivs)
				ivs = append(ivs, interval{host: ev.Host, start: e.Stream})
			}
		}
		for i := range ivs {
			for j := i + 1; j < len(ivs); j++ {
				a, b := ivs[i], ivs[j]
				if a.host == b.host {
					continue
				}
				if (a.end == 0 || b.start < a.end) && (b.end == 0 || a.start < b.end) {
					c.add("one_host", id, b.host, "%s started the runner (stream %d) while %s's runner (stream %d) ran until %s", b.host, b.start, a.host, a.start, endName(a.end))
				}
			}
		}
	}
}

func endName(end uint64) string {
	if end == 0 {
		return "the end of the history"
	}
	return fmt.Sprintf("stream %d", end)
}

func (c *checker) checkEvents() {
	for _, e := range c.h.Events {
		if e.Err != "" {
			c.add("undecodable", "", "", "event at stream %d (%s): %s", e.Stream, e.Subject, e.Err)
			continue
		}
		ev := e.Event
		if ev.JobID == "" {
			continue // a warm machine's own event
		}
		if want := messages.EventSubject(ev.Host, ev.JobID, ev.State); e.Subject != want {
			c.add("undecodable", ev.JobID, ev.Host, "event at stream %d on %s, its fields name %s", e.Stream, e.Subject, want)
		}
		if !msgIDPattern.MatchString(e.MsgID) || !strings.HasPrefix(e.MsgID, ev.JobID+":"+string(ev.State)+":") {
			c.add("msg_id", ev.JobID, ev.Host, "%s (seq %d) stored with Nats-Msg-Id %q", ev.State, ev.Seq, e.MsgID)
		}
	}
}

// msgIDPattern is section 8's form: the job, the state, then the
// attempt or an origin, and for some events more parts.
var msgIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}:[a-z_]+:([0-9]+|deadline|runner_exited|machine_stopped|runner_lost|reconcile|claim_lost|max_deliveries|[a-z_]+)(:[A-Za-z0-9_.-]+)*$`)

func (c *checker) checkLeftovers() {
	if c.h.Final.Err != "" {
		c.add("leftovers", "", "", "the final state was not read: %s", c.h.Final.Err)
		return
	}
	hosts := make([]string, 0, len(c.h.Final.Leftovers))
	for h := range c.h.Final.Leftovers {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, h := range hosts {
		for _, left := range c.h.Final.Leftovers[h] {
			job := ""
			if _, rest, ok := strings.Cut(left, messages.DomainName("")); ok {
				job = strings.SplitN(rest, "-", 2)[0]
				for _, id := range c.order {
					if strings.HasPrefix(rest, id) && len(id) > len(job) {
						job = id
					}
				}
			}
			c.add("leftovers", job, h, "left on the host: %s", left)
		}
	}
}

func (c *checker) checkRequestsLeft() {
	left := map[string]bool{}
	for _, r := range c.h.Final.Requests {
		left[r.JobID] = true
		v, ok := c.jobs[r.JobID]
		if ok && v.job != nil && v.job.Kind == KindNoImage && v.job.Route == RouteImage && strings.Contains(r.Subject, ".req.image.") {
			continue
		}
		c.add("requests_left", r.JobID, "", "request %d on %s is still in the request stream", r.Stream, r.Subject)
	}
	if c.h.Final.Err != "" {
		return
	}
	for _, j := range c.h.Jobs {
		if j.Kind == KindNoImage && j.Route == RouteImage && !left[j.ID] {
			c.add("requests_left", j.ID, "", "a provision by image for an image nobody carries is gone from the request stream without an event")
		}
	}
}

// serverDeleted is nats-server's reason in a MSG_TERMINATED advisory of a
// message deleted while a consumer had it pending, not a worker's.
const serverDeleted = "Unacknowledged message was deleted"

func (c *checker) checkBadCodes() {
	bySeq := map[uint64]*Job{}
	for _, r := range c.h.Requests {
		if v, ok := c.jobs[r.JobID]; ok && v.job != nil && v.job.Kind == KindBad && r.Stream != 0 && !r.Duplicate {
			bySeq[r.Stream] = v.job
		}
	}
	for _, t := range c.h.Terminations {
		j, ok := bySeq[t.Stream]
		// The server also announces a message that left the stream while
		// a consumer held it (after a node restarted) with this reason.
		if !ok || t.Reason == serverDeleted {
			continue
		}
		if t.Reason != string(j.Bad.Code) {
			c.add("bad_code", j.ID, "", "%s was terminated with reason %q, want %q", j.Bad.File, t.Reason, j.Bad.Code)
		}
	}
}

func (c *checker) checkCapacity() {
	bounds := map[string]Host{}
	for _, h := range c.h.Fleet.Hosts {
		bounds[h.ID] = h
	}
	for _, s := range c.h.Samples {
		b, ok := bounds[s.Host]
		if !ok {
			continue
		}
		at := s.Time.Format("15:04:05.000")
		if b.Parallelism > 0 && s.OpsInFlight > b.Parallelism {
			c.add("capacity", "", s.Host, "%d operations in flight at %s, --parallelism %d", s.OpsInFlight, at, b.Parallelism)
		}
		if b.MaxVMs > 0 && s.Machines > b.MaxVMs {
			c.add("capacity", "", s.Host, "the worker counted %d machines at %s, --max-vms %d", s.Machines, at, b.MaxVMs)
		}
		if b.MaxVMs > 0 && s.Domains > b.MaxVMs {
			c.add("capacity", "", s.Host, "%d stretchy- domains in libvirt at %s, --max-vms %d", s.Domains, at, b.MaxVMs)
		}
	}
}

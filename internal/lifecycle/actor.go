package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Phase is where a machine is in its life. Each actor holds exactly one;
// transitions lists the moves it may make.
type Phase int

// The phases, roughly in the order a machine passes them.
const (
	// PhaseNew: the actor exists, its first command is not handled yet.
	PhaseNew Phase = iota
	// PhaseBuilding: the build's steps run (claim, clone, boot, guest
	// agent, runner); the provision's caller holds an operation slot.
	PhaseBuilding
	// PhaseRollingBack: the build failed or was stopped; what it built is
	// being removed and its outcome published, still in the build's slot.
	PhaseRollingBack
	// PhaseReady: the runner runs (kind none: the guest agent answered);
	// ticks watch the deadline, the guest and the runner.
	PhaseReady
	// PhaseEnding: the machine decided its own end (runner exited,
	// deadline, guest stopped, claim lost) and waits for a slot.
	PhaseEnding
	// PhaseTearingDown: the machine is being removed and its end published.
	PhaseTearingDown
	// PhaseWarming: a warm machine is cloned and booted for a pool,
	// before any job exists.
	PhaseWarming
	// PhaseIdle: a warm machine waits, agent ready, for a job to bind it.
	PhaseIdle
	// PhaseHeld: the job ended, and its machine is kept, shut off, until
	// its hold ends or an operator releases it (hold.go).
	PhaseHeld
	// PhaseRemoving: a build's rollback could not remove its machine,
	// which may run the job's runner: it still counts, keeps the job's
	// claim, and its removal is tried again at ticks; provisions of its
	// job wait for that, a teardown request ends the job.
	PhaseRemoving
	// PhaseSettling: work for a job with no machine known yet: finding
	// out whether one exists (a teardown, an adoption) or publishing what
	// a request or a restart needs (a refusal, an end cut off by a crash).
	PhaseSettling
	// PhaseGone: nothing is left to do; the actor stops.
	PhaseGone
)

var phaseNames = map[Phase]string{
	PhaseNew: "new", PhaseBuilding: "building", PhaseRollingBack: "rolling_back", PhaseReady: "ready",
	PhaseEnding: "ending", PhaseTearingDown: "tearing_down", PhaseSettling: "settling", PhaseGone: "gone",
	PhaseWarming: "warming", PhaseIdle: "idle", PhaseHeld: "held", PhaseRemoving: "removing",
}

func (p Phase) String() string { return phaseNames[p] }

// transitions are the moves between phases. Every phase may go to
// PhaseGone when the Manager closes: the machine is left as it is for the
// next process to adopt.
var transitions = map[Phase][]Phase{
	PhaseNew:         {PhaseBuilding, PhaseSettling, PhaseWarming},
	PhaseWarming:     {PhaseIdle, PhaseRollingBack},
	PhaseIdle:        {PhaseBuilding, PhaseTearingDown},
	PhaseBuilding:    {PhaseReady, PhaseRollingBack},
	PhaseRollingBack: {PhaseGone, PhaseHeld, PhaseIdle, PhaseRemoving},
	PhaseReady:       {PhaseEnding, PhaseTearingDown},
	PhaseEnding:      {PhaseTearingDown, PhaseReady},
	PhaseTearingDown: {PhaseGone, PhaseReady, PhaseHeld, PhaseRemoving},
	PhaseRemoving:    {PhaseTearingDown},
	PhaseHeld:        {PhaseTearingDown},
	PhaseSettling:    {PhaseReady, PhaseTearingDown, PhaseHeld, PhaseGone},
}

// allowed reports whether a machine in phase from may move to to.
func allowed(from, to Phase) bool {
	return to == PhaseGone || slices.Contains(transitions[from], to)
}

// A command is what the Manager sends an actor. The actor answers each one
// it takes exactly once, on the channel setReply gave it.
type command interface{ setReply(chan answer) }

type replyTo struct{ reply chan answer }

func (r *replyTo) setReply(c chan answer) { r.reply = c }

// answer is an actor's reply to a command.
type answer struct {
	err error
	// served: a buildOnly teardown was taken by the build in flight.
	served bool
	// finished and absent are the Manager's own answers: the job
	// finished here recently, or no actor serves it.
	finished, absent bool
	// retry: the actor stopped before it could handle the command; the
	// Manager asks the registry again.
	retry bool
}

// provisionCmd delivers a provision request. warm: the registry gave the
// job this idle warm machine, which the build binds instead of cloning.
type provisionCmd struct {
	replyTo
	ctx  context.Context // the caller's: when it ends, the build stops
	req  messages.Provision
	d    Delivery
	warm bool
	// left: the caller is gone and the build was cancelled for it; the
	// actor waits for the build to end, no longer for the caller.
	left bool
}

// warmCmd makes a new actor a warm machine of image; release frees the
// operation slot of its clone and boot.
type warmCmd struct {
	replyTo
	image   string
	size    Size // the image's
	release func()
}

// retireCmd retires an idle warm machine the registry took out of its
// pool (a cold build needs its room).
type retireCmd struct {
	replyTo
	reason string
}

// teardownCmd delivers a teardown request. buildOnly: only a build in
// flight may take it (TeardownBuild).
type teardownCmd struct {
	replyTo
	reason    string
	cause     *messages.Error
	d         Delivery
	buildOnly bool
}

// adoptCmd hands a machine found on the host to a new actor (Reconcile).
// extra: the job has another machine, which its actor tracks; this one is
// removed without events.
type adoptCmd struct {
	replyTo
	mach  provision.Machine
	extra bool
}

// rejectCmd publishes the failed event of a refused request.
type rejectCmd struct {
	replyTo
	image string
	code  messages.ErrorCode
	cause error
	d     Delivery
}

// finishCmd publishes the end of a teardown a dead process cut off after
// it removed the machine (FinishTeardowns).
type finishCmd struct {
	replyTo
	last  messages.Event // the job's newest event, as the journal has it
	state messages.State
	cause *messages.Error
	// reason is the teardown's; vanished: last is not a tearing_down but
	// the job was ready, and its machine went while no worker ran, so
	// the teardown's tearing_down comes first.
	reason   string
	vanished bool
}

// holdCmd holds the machine (hold.go): when its job ends, or longer when
// it is held already.
type holdCmd struct {
	replyTo
	ctx context.Context
	d   time.Duration
	out *HoldInfo
}

// releaseCmd removes a held machine in its caller's slot, or cancels the
// hold of a machine whose job runs.
type releaseCmd struct {
	replyTo
	ctx context.Context
	out *HoldInfo
}

// consoleCmd asks where the machine's console log is and which secrets
// to scrub from it.
type consoleCmd struct {
	replyTo
	out *consoleSource
}

// tickCmd is a tick whose caller waits until the actor is idle again.
type tickCmd struct{ replyTo }

// ending is how the machine ends: a teardown's reason, cause and delivery.
type ending struct {
	reason string
	cause  *messages.Error
	d      Delivery
	// self: the machine decided it (Tick), not a request.
	self bool
	// release: the end of a held machine, whose job ended before
	// (hold.go); its removal publishes released.
	release bool
	// hold keeps the machine that long instead of removing it; set as
	// the teardown begins (holdFor).
	hold time.Duration
	// back is the phase a teardown that must be tried again returns to;
	// set as it begins.
	back Phase
}

// record is everything known of one machine and its job. Only the actor's
// own goroutine reads or writes it; activities get copies of what they need
// and return what they found as a closure the actor applies.
type record struct {
	phase    Phase
	image    string
	domain   string
	deadline time.Time
	kind     string // the runner kind, as the machine's metadata has it
	em       emitter
	// counted: the machine counts against the host's capacity.
	counted bool
	claim   claim
	runner  runnerState
	// retryAt delays the next look at a machine whose teardown failed.
	retryAt time.Time
	// finished: the job ended here for good; set as the actor stops.
	finished bool
	// saved: a warm machine of a saved pool, which waits saved to disk,
	// not running, and is restored when a job binds it.
	saved bool
	// generation is the image generation a warm machine was cloned from.
	generation string
	// retiring is why a warm machine no job bound is being retired, after
	// an attempt failed.
	retiring string
	// holdOnFailure is how long the machine is kept if its job fails (the
	// request's hold_on_failure_s, capped by Config.MaxHold); holdFor an
	// operator's hold, kept whenever the job ends.
	holdOnFailure, holdFor time.Duration
	// removeFailures counts the failed attempts to remove a machine a
	// rollback could not remove (PhaseRemoving), to report every sixth.
	removeFailures int
	// heldUntil is when a held machine's hold ends; holdRecorded: the
	// hold is in its metadata and it is shut off.
	heldUntil    time.Time
	holdRecorded bool
}

// runnerState is what is known of a machine's runner.
type runnerState struct {
	os    string // guest OS family
	pid   int    // guest-agent pid of its launcher; 0 when none was started
	since time.Time
	// secrets are the job's secret values, scrubbed from its output; an
	// adopted machine's are not known (secretsKnown false), so its
	// output is withheld.
	secrets      []string
	secretsKnown bool
	// exit is the runner's end once seen; reported once runner_exited is
	// published.
	exit     *runnerExit
	reported bool
	// endReason is why an adopted machine whose end had begun ends.
	endReason string
	// statusFailures counts checks in a row in which the agent denied
	// knowing the runner.
	statusFailures int
}

type runnerExit struct {
	code     int
	output   string
	withheld bool
}

// activity is the one piece of work an actor has running, in its own
// goroutine. done delivers the closure that applies its outcome to the
// record, in the actor's goroutine.
type activity struct {
	name string
	// finish: the activity runs to its end when the Manager closes (a
	// teardown or a rollback under way is not cut off half-way).
	finish bool
	cancel context.CancelCauseFunc
	done   chan func()
}

// claimRequest is an activity asking its actor to take or confirm the
// job's claim before a step.
type claimRequest struct {
	ctx   context.Context
	take  bool
	d     Delivery
	reply chan error
}

// actor owns one machine (or one job's bookkeeping while no machine is
// known). Its goroutine is the only one that touches rec.
type actor struct {
	m *Manager
	// jobID is the job the machine serves: from the start for a cold
	// machine, from its binding for a warm one (empty until then). It is
	// set in the actor's goroutine while no activity runs, and only read
	// after that.
	jobID string
	// key names the machine, stretchy-<key>: the job id for a cold
	// machine, a warm key for a warm one. It is set before the actor's
	// first activity and never changes after.
	key string
	// registered is the job the registry maps to this actor, guarded by
	// the Manager's mu.
	registered string
	// size is what the machine holds of the host while it counts,
	// guarded by the Manager's mu.
	size Size
	// pooled is a warm machine's entry in its pool when a job last took
	// it from there, guarded by the Manager's mu.
	pooled idleMachine
	// inbox is unbuffered: a command is either taken by the running actor
	// or, once stopped is closed, not at all.
	inbox   chan command
	ticks   chan struct{}
	claims  chan claimRequest
	stopped chan struct{}
	work    conc.WaitGroup

	rec record
	act *activity
	// build is the provision delivery whose build runs or rolls back.
	build *provisionCmd
	// waiting are provision deliveries that wait for that build's
	// outcome: repeated deliveries.
	waiting []chan answer
	// end is the decided end while the machine ends; enders wait for it.
	end    *ending
	enders []chan answer
	// pending is the end a teardown request asked for while the actor
	// could not begin it at once (a look at the runner, or the wait of an
	// end the machine began itself for a slot, was under way); its caller
	// is among enders.
	pending *ending
	// idle are tick callers waiting until no activity runs.
	idle []chan answer
	// releasers are operators' releases that came while the machine's
	// hold was being made; they are answered once it is removed.
	releasers []chan answer
	// poll times the runner polls between ticks (runnerPoll); pollArmed
	// says it runs.
	poll      *time.Timer
	pollArmed bool
	// wakeups counts the actor's turns of its loop, for the tests that
	// check it sleeps while it has nothing to do.
	wakeups atomic.Uint64
}

func newActor(m *Manager, jobID string) *actor {
	return &actor{
		m: m, jobID: jobID, key: jobID,
		inbox:   make(chan command),
		ticks:   make(chan struct{}, 1),
		claims:  make(chan claimRequest),
		stopped: make(chan struct{}),
		rec:     record{em: emitter{cfg: &m.cfg, jobID: jobID}},
	}
}

// poke asks the actor to tick, unless a tick is pending already.
func (a *actor) poke() {
	select {
	case a.ticks <- struct{}{}:
	default:
	}
}

// to moves the machine to phase p; a move the table does not allow is a
// bug of this package.
func (a *actor) to(p Phase) {
	if !allowed(a.rec.phase, p) {
		panic(fmt.Sprintf("lifecycle: machine of job %s: %s -> %s is not a transition", a.jobID, a.rec.phase, p))
	}
	if a.rec.phase == PhaseHeld || p == PhaseHeld {
		a.m.noteHeld(a, p == PhaseHeld)
	}
	a.rec.phase = p
	if p == PhaseGone && a.rec.counted {
		// The machine is gone (or left for the next process): it stops
		// counting now, before anyone is told.
		a.rec.counted = false
		a.m.countMachine(a, false, a.rec.image, Size{})
	}
	if p == PhaseReady {
		// The machine exists and runs: deliveries of its provision that
		// waited for that are done.
		a.answerWaiting(answer{})
	}
}

// run is the actor's goroutine: it takes commands, ticks, claim requests
// of its activity and the outcomes of its activities until the machine is
// gone or the Manager closes.
func (a *actor) run(root context.Context) {
	defer a.stop()
	for a.rec.phase != PhaseGone {
		var done <-chan func()
		if a.act != nil {
			done = a.act.done
		}
		var callerGone <-chan struct{}
		if a.rec.phase == PhaseBuilding && a.build != nil && !a.build.left {
			callerGone = a.build.ctx.Done()
		}
		select {
		case cmd := <-a.inbox:
			a.handle(root, cmd)
		case <-a.ticks:
			a.tick(root)
		case <-a.runnerPoll():
			a.pollArmed = false
			if a.pollsRunner() {
				a.launch(root, "look at runner", a.pollRunner())
			}
		case req := <-a.claims:
			req.reply <- a.serveClaim(req)
		case apply := <-done:
			a.act = nil
			apply()
			if e := a.pending; e != nil && a.act == nil {
				a.pending = nil
				a.startTeardown(root, e, nil)
			}
		case <-callerGone:
			// The worker stops: roll the build back and hand the request
			// back (6.4).
			a.build.left = true
			a.act.cancel(context.Canceled)
		case <-root.Done():
			a.close()
		}
		a.wakeups.Add(1)
		if a.act == nil {
			for _, c := range a.idle {
				c <- answer{}
			}
			a.idle = nil
		}
	}
}

// close stops the actor with the Manager: the running activity is
// stopped and waited for (a build in flight rolls back), and the machine
// is left as it is.
func (a *actor) close() {
	if a.rec.phase == PhaseIdle && a.m.cfg.Pool != nil && a.m.cfg.Pool.RetireOnClose && a.m.leavePool(a) {
		a.retire(context.WithoutCancel(a.m.root), messages.ReasonShutdown)
	}
	for a.act != nil {
		if !a.act.finish {
			a.act.cancel(errClosed)
		}
		// A rollback confirms the claim before it decides anything.
		select {
		case req := <-a.claims:
			req.reply <- a.serveClaim(req)
		case apply := <-a.act.done:
			a.act = nil
			apply()
		}
	}
	a.rec.phase = PhaseGone
}

// stop retires the actor: the registry forgets it, the machine stops
// counting, and every caller still waiting gets an answer.
func (a *actor) stop() {
	if a.poll != nil {
		a.poll.Stop()
	}
	if a.rec.counted {
		a.m.countMachine(a, false, a.rec.image, Size{})
	}
	a.m.retire(a, a.rec.finished)
	close(a.stopped)
	a.work.Wait()
	rest := answer{retry: true}
	if a.rec.finished {
		rest = answer{}
	}
	for _, c := range a.waiting {
		c <- rest
	}
	if a.build != nil {
		a.build.reply <- answer{err: errClosed}
	}
	for _, c := range a.enders {
		c <- rest
	}
	for _, c := range a.releasers {
		c <- answer{err: errClosed}
	}
	for _, c := range a.idle {
		c <- answer{}
	}
}

// launch starts an activity; work runs in its own goroutine with a context
// the actor cancels, and returns what the actor applies once it is done.
func (a *actor) launch(root context.Context, name string, work func(ctx context.Context) (apply func())) {
	if a.act != nil {
		panic(fmt.Sprintf("lifecycle: machine of job %s: %s while %s runs", a.jobID, name, a.act.name))
	}
	finish := name == "tear down" || name == "roll back"
	base := root
	if finish {
		base = context.WithoutCancel(root)
	}
	ctx, cancel := context.WithCancelCause(base)
	act := &activity{name: name, finish: finish, cancel: cancel, done: make(chan func(), 1)}
	a.act = act
	a.work.Go(func() {
		defer cancel(nil)
		act.done <- work(ctx)
	})
}

// handle takes one command.
func (a *actor) handle(root context.Context, cmd command) {
	switch c := cmd.(type) {
	case *provisionCmd:
		a.onProvision(root, c)
	case *teardownCmd:
		a.onTeardown(root, c)
	case *adoptCmd:
		a.onAdopt(root, c)
	case *rejectCmd:
		a.onReject(root, c)
	case *finishCmd:
		a.onFinish(root, c)
	case *warmCmd:
		a.startWarm(root, c)
	case *retireCmd:
		if a.rec.phase != PhaseIdle {
			c.reply <- answer{}
			return
		}
		a.enders = append(a.enders, c.reply)
		a.retire(root, c.reason)
	case *holdCmd:
		a.onHold(c)
	case *releaseCmd:
		a.onRelease(root, c)
	case *consoleCmd:
		a.onConsole(c)
	case *tickCmd:
		a.tick(root)
		if a.act == nil {
			c.reply <- answer{}
		} else {
			a.idle = append(a.idle, c.reply)
		}
	default:
		panic(fmt.Sprintf("lifecycle: unknown command %T", cmd))
	}
}

// onProvision: a new job is built; a repeated delivery waits for the build
// in flight, and one for a machine that exists is a no-op.
func (a *actor) onProvision(root context.Context, c *provisionCmd) {
	switch a.rec.phase {
	case PhaseNew:
		a.startBuild(root, c)
	case PhaseIdle:
		if !c.warm {
			c.reply <- answer{retry: true} // not the registry's binding: ask again
			return
		}
		a.startBuild(root, c)
	case PhaseBuilding, PhaseRollingBack, PhaseSettling:
		a.waiting = append(a.waiting, c.reply)
	case PhaseRemoving:
		// The machine an earlier delivery built goes first, in this
		// delivery's slot; once it is gone the delivery builds anew.
		a.waiting = append(a.waiting, c.reply)
		if a.act == nil {
			a.removeLeftover(root)
		}
	default:
		c.reply <- answer{}
	}
}

// onTeardown: a teardown request ends a build in flight through the build,
// ends a ready machine in the caller's slot, takes over an end the machine
// began itself but has no slot for yet, and is a no-op while the machine is
// torn down already.
func (a *actor) onTeardown(root context.Context, c *teardownCmd) {
	e := &ending{reason: c.reason, cause: c.cause, d: c.d}
	switch {
	case a.rec.phase == PhaseBuilding:
		a.end = e
		a.enders = append(a.enders, c.reply)
		a.act.cancel(ErrSuperseded)
	case c.buildOnly:
		c.reply <- answer{served: false}
	case a.rec.phase == PhaseNew:
		a.to(PhaseSettling)
		a.enders = append(a.enders, c.reply)
		a.launch(root, "look up machine", a.lookUpForTeardown(e))
	case a.rec.phase == PhaseReady || a.rec.phase == PhaseEnding || a.rec.phase == PhaseRemoving:
		a.enders = append(a.enders, c.reply)
		if a.pending != nil {
			return // a teardown is about to begin: its end answers this one too
		}
		if a.act == nil {
			a.startTeardown(root, e, nil)
			return
		}
		// A look at the runner, or the slot wait of an end the machine
		// began itself, is under way: this request, which holds a slot,
		// goes first once that stopped.
		a.pending = e
		a.act.cancel(errOvertaken)
	case a.rec.phase == PhaseRollingBack, a.rec.phase == PhaseSettling:
		a.enders = append(a.enders, c.reply)
	default: // tearing down
		c.reply <- answer{}
	}
}

// errOvertaken stops a self-started end's wait for a slot when a teardown
// request that holds one takes over.
var errOvertaken = errors.New("overtaken by a teardown request")

// onAdopt takes over a machine found on the host.
func (a *actor) onAdopt(root context.Context, c *adoptCmd) {
	if a.rec.phase != PhaseNew {
		c.reply <- answer{} // served already: the build or a request got here first
		return
	}
	a.to(PhaseSettling)
	a.enders = append(a.enders, c.reply)
	if c.extra {
		key := a.key
		a.launch(root, "remove a second machine", func(ctx context.Context) func() {
			err := a.m.removeOwn(ctx, key, false)
			if err != nil {
				err = fmt.Errorf("remove %s, a second machine of job %s: %w", messages.DomainName(key), a.jobID, err)
			}
			return func() { a.settled(false, err) }
		})
		return
	}
	a.launch(root, "adopt", a.adopt(c.mach))
}

func (a *actor) onReject(root context.Context, c *rejectCmd) {
	if a.rec.phase != PhaseNew {
		c.reply <- answer{}
		return
	}
	a.to(PhaseSettling)
	a.rec.image = c.image
	a.rec.em.identify(a.rec)
	em := a.rec.em
	jobID := a.jobID
	a.launch(root, "reject", func(ctx context.Context) func() {
		// A copy of the request that another host refused first (a
		// request delivered twice at once after a NATS node restarted):
		// the job ended with that host's failed, and a second terminal
		// event would end it twice (5.1). The refusal stands, silently.
		ended, err := a.m.ended(ctx, jobID)
		if err == nil && !ended {
			err = em.emit(ctx, messages.StateFailed, c.d, 0, "", &messages.Error{Code: c.code, Message: c.cause.Error()})
		}
		return func() {
			a.rec.em = em
			c.reply <- answer{err: err}
			a.to(PhaseGone)
		}
	})
}

func (a *actor) onFinish(root context.Context, c *finishCmd) {
	if a.rec.phase != PhaseNew {
		c.reply <- answer{}
		return
	}
	a.to(PhaseSettling)
	a.rec.image, a.rec.domain, a.rec.runner.os = c.last.Image, c.last.Domain, c.last.OS
	a.rec.em.identify(a.rec)
	a.rec.em.machine = c.last.Machine
	em := a.rec.em
	a.launch(root, "finish teardown", func(ctx context.Context) func() {
		finished, err := a.m.finishTeardown(ctx, &em, c)
		return func() {
			a.rec.em = em
			a.rec.finished = finished
			c.reply <- answer{err: err}
			a.to(PhaseGone)
		}
	})
}

// tick looks after the machine once (Manager.Tick).
func (a *actor) tick(root context.Context) {
	switch a.rec.phase {
	case PhaseIdle:
		if reason := a.m.retireReason(a); reason != "" && a.m.leavePool(a) {
			a.retire(root, reason)
		}
	case PhaseHeld:
		a.tickHeld(root)
	case PhaseRemoving:
		a.tickRemoving(root)
	case PhaseBuilding:
		if !a.rec.claim.taken {
			return // the build has not claimed the job yet
		}
		if err := a.keepClaim(root); errors.As(err, new(*Dropped)) {
			a.act.cancel(err)
		}
	case PhaseReady:
		if a.act != nil || a.m.cfg.Now().Before(a.rec.retryAt) {
			return
		}
		if a.jobID == "" {
			a.retire(root, a.rec.retiring)
			return
		}
		if err := a.keepClaim(root); errors.As(err, new(*Dropped)) {
			a.decideEnd(root, &ending{reason: messages.ReasonClaimLost, self: true})
			return
		}
		if end := a.overdue(); end != nil {
			a.decideEnd(root, end)
			return
		}
		a.launch(root, "look at runner", a.probe())
	}
}

// overdue returns the end of a machine past its deadline or whose runner's
// exit is known and published, checked before the guest is asked anything.
func (a *actor) overdue() *ending {
	now := a.m.cfg.Now()
	if !a.rec.deadline.IsZero() && now.After(a.rec.deadline) {
		_, cause, _ := causeOf(messages.ReasonDeadline, a.rec.domain)
		return &ending{reason: messages.ReasonDeadline, cause: cause, self: true}
	}
	if r := a.rec.runner; r.exit != nil && r.reported {
		reason := r.endReason
		if reason == "" {
			reason = messages.ReasonRunnerExited
		}
		// An adopted teardown ends as it would have (a stopped machine
		// fails).
		_, cause, _ := causeOf(reason, a.rec.domain)
		return &ending{reason: reason, cause: cause, self: true}
	}
	return nil
}

// decideEnd begins an end the machine decided by itself: it waits for an
// operation slot (PhaseEnding), then tears down.
func (a *actor) decideEnd(root context.Context, e *ending) {
	if e.d == (Delivery{}) {
		// No request caused it: its events are named for their origin,
		// <job_id>:<state>:<reason> (docs/protocol.md 5.6, 8), so that
		// two ends of one job for different reasons stay apart.
		e.d = Delivery{Origin: e.reason, Request: a.rec.claim.request}
	}
	a.to(PhaseEnding)
	// Overtaken by a request (run resumes it) or closing: ready again.
	a.teardownInSlot(root, e, func() { a.to(PhaseReady) })
}

// teardownInSlot waits for an operation slot, then tears down for e;
// overtaken (a request or an operator's release came first, which run
// begins) or closing, it calls overtaken instead.
func (a *actor) teardownInSlot(root context.Context, e *ending, overtaken func()) {
	slots := a.m.cfg.Slots
	a.launch(root, "wait for a slot", func(ctx context.Context) func() {
		release := func() {}
		var err error
		if slots != nil {
			release, err = slots.Acquire(ctx)
		}
		return func() {
			if err == nil && a.pending == nil {
				a.startTeardown(root, e, release)
				return
			}
			if err == nil {
				release()
			}
			overtaken()
		}
	})
}

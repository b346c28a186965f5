package lifecycle

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// cleanupTimeout bounds the rollback of a failed provision and the
// publishing of its outcome, which run even when the build was stopped.
const cleanupTimeout = 2 * time.Minute

// prepareTimeout bounds each preparation command in the guest.
const prepareTimeout = time.Minute

// phaseClock says what an event's phase_ms measures.
type phaseClock int

const (
	noPhase         phaseClock = iota // 0: the event begins a phase
	sinceRequest                      // the time since the request's requested_at (queueing)
	sincePhaseStart                   // the time since the last step that starts a phase
)

// buildMode is what a build makes: the steps of the table that run, and
// those whose work is done already.
type buildMode uint8

const (
	// coldBuild makes a job's machine from its image.
	coldBuild buildMode = 1 << iota
	// warmPrepare makes a warm machine, to agent_ready, with no job; its
	// events are the machine's.
	warmPrepare
	// warmBind gives a warm machine to a job: claim, binding, the job's
	// events, runner. Cloning, booting and the agent are done already, so
	// their events report the binding's moment.
	warmBind
	// savedPrepare is warmPrepare for a saved pool: the guest's clock is
	// set once, which proves the agent may, and the machine is saved
	// (provision.Provisioner.Save) once agent-ready.
	savedPrepare
	// savedBind is warmBind for a saved machine: bound while saved, it is
	// restored (its boot: running reports the restore), bound again as
	// it runs, its agent waited for and its clock set to the host's.
	savedBind

	prepareModes = warmPrepare | savedPrepare
	bindModes    = warmBind | savedBind
	allModes     = coldBuild | prepareModes | bindModes
	jobModes     = coldBuild | bindModes
)

// buildStep is one row of the build's step table. The runner (build.run)
// does the claim confirmations, the timing, the event and the fault points
// of every row the same way, so a row says only what differs.
type buildStep struct {
	name string
	// modes are the builds the step belongs to; doing those whose action
	// runs, when fewer (a warm machine's bind reports the clone but does
	// not clone). Zero doing means modes.
	modes, doing buildMode
	// skip leaves the step out of this build.
	skip func(b *build) bool
	// confirm: the claim is confirmed before the action, a step another
	// host must not repeat.
	confirm bool
	// startsPhase: the phase that the next timed event reports begins
	// before this step's action.
	startsPhase bool
	// beforeAction is the fault point between the confirmation and the
	// action.
	beforeAction string
	// action does the step's work; nil for a step that only reports.
	action func(b *build, ctx context.Context) error
	// afterAction is the fault point between the action and the event.
	afterAction string
	// state is the event published once the action succeeded; "" for
	// none. The claim is confirmed before every event of a job: a host
	// that lost the job publishes nothing more of it but dropped.
	state messages.State
	clock phaseClock
	// afterEvent is the fault point after the event.
	afterEvent string
}

// buildSteps is the build, in order: clone the image, boot the clone, wait
// for its guest agent, start the job's runner. A warm machine runs the
// middle of it ahead of time (warmPrepare), and the rest when a job binds
// it (warmBind).
var buildSteps = []buildStep{
	{name: "claim the job", modes: jobModes, action: (*build).takeClaim},
	{name: "remove a leftover", modes: coldBuild, action: (*build).removeLeftover},
	{name: "bind the warm machine", modes: bindModes, action: (*build).bindMachine},
	{name: "accept", modes: jobModes, state: messages.StateAccepted, clock: sinceRequest, afterEvent: FaultAfterAccept},
	{name: "begin the clone", modes: allModes, confirm: true, state: messages.StateCloning, afterEvent: FaultBeforeClone},
	{name: "clone", modes: allModes, doing: coldBuild | prepareModes, confirm: true, startsPhase: true,
		action: (*build).clone, afterAction: FaultAfterClone, state: messages.StateCloned, clock: sincePhaseStart},
	{name: "begin the boot", modes: allModes, state: messages.StateBooting},
	{name: "boot", modes: allModes, doing: coldBuild | prepareModes | savedBind, confirm: true, startsPhase: true,
		beforeAction: FaultBeforeStart, action: (*build).boot, afterAction: FaultAfterStart, state: messages.StateRunning, clock: sincePhaseStart, afterEvent: FaultWaitingAgent},
	{name: "give back the slot", modes: prepareModes, action: (*build).releaseSlot},
	{name: "wait for the guest agent", modes: coldBuild | prepareModes | savedBind, skip: noAgent, confirm: true, startsPhase: true, action: (*build).waitAgent},
	{name: "set the guest's clock", modes: savedPrepare | savedBind, skip: noClock, confirm: true, action: (*build).setClock},
	{name: "detect the guest OS", modes: allModes, doing: coldBuild | prepareModes, skip: noAgent, confirm: true,
		action: (*build).detectOS, state: messages.StateAgentReady, clock: sincePhaseStart, afterEvent: FaultAfterAgentReady},
	{name: "save the machine", modes: savedPrepare, action: (*build).save},
	{name: "plan the runner", modes: jobModes, skip: noAgent, action: (*build).planRunner},
	{name: "prepare the runner", modes: jobModes, skip: noRunner, confirm: true, startsPhase: true, action: (*build).prepareRunner},
	{name: "start the runner", modes: jobModes, skip: noRunner, confirm: true, action: (*build).launchRunner,
		state: messages.StateRunnerStarted, clock: sincePhaseStart, afterEvent: FaultAfterRunnerStart},
	// The request is acknowledged next: only while the job is this host's.
	{name: "acknowledge", modes: jobModes, confirm: true},
}

func noAgent(b *build) bool  { return b.cfg.Agent == nil }
func noRunner(b *build) bool { return noAgent(b) || b.plan.Empty() }
func noClock(b *build) bool  { return noAgent(b) || b.cfg.Pool.Clock == nil }

// build is the working state of one build activity. The actor hands it the
// job's emitter and gets it back with the outcome; everything else in it is
// the build's own.
type build struct {
	// a is the build's actor; the build touches only what is guarded by
	// the Manager's mu (its size).
	a     *actor
	cfg   *Config
	m     *Manager
	mode  buildMode
	jobID string
	key   string // the machine's, which names it (actor.key)
	// generation is a warm machine's image generation, for its metadata.
	generation string
	// release frees the operation slot of a warm machine's clone and
	// boot, once they are done; nil otherwise.
	release  func()
	domain   string
	deadline time.Time
	req      messages.Provision
	d        Delivery
	em       emitter
	claim    claimer

	// claimed: the claim was taken, so what carries the job's name on
	// the host is this build's to remove.
	claimed bool
	// cloned: the machine was defined (or a warm one bound), so it has a
	// console log, and a failure may hold it.
	cloned bool
	// bindTried: a warm machine's binding was asked of libvirt, so its
	// metadata may name the job; bound: it does.
	bindTried, bound bool
	// machineEm is a warm machine's own emitter, from before its binding,
	// for its events should the binding fail.
	machineEm emitter
	// holdOnFailure is recorded with the machine, for a later process.
	holdOnFailure time.Duration
	phaseStart    time.Time
	imageOS       string // the OS the image declares, from the clone
	// imageGeneration is the generation of the image the clone was
	// made from, under which the guest's OS is remembered.
	imageGeneration string
	plan            runners.Plan
	pid             int
	since           time.Time // when the runner started
}

// run runs the step table.
func (b *build) run(ctx context.Context) error {
	for _, s := range buildSteps {
		if s.modes&b.mode == 0 || s.skip != nil && s.skip(b) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: %w", s.name, context.Cause(ctx))
		}
		if s.confirm {
			if err := b.claim.confirm(ctx); err != nil {
				return err
			}
		}
		if s.startsPhase {
			b.phaseStart = b.cfg.Now()
		}
		if s.action != nil && (s.doing == 0 || s.doing&b.mode != 0) {
			b.cfg.Faults.At(s.beforeAction)
			if err := s.action(b, ctx); err != nil {
				return err
			}
		}
		b.cfg.Faults.At(s.afterAction)
		if s.state != "" {
			if err := b.claim.confirm(ctx); err != nil {
				return err
			}
			var phase time.Duration
			switch s.clock {
			case sinceRequest:
				phase = b.em.since(b.req.RequestedAt)
			case sincePhaseStart:
				phase = b.em.since(b.phaseStart)
			}
			var fill []func(*messages.Event)
			if s.state == messages.StateRunnerStarted {
				fill = append(fill, func(ev *messages.Event) { ev.RunnerPID = b.pid })
			}
			if err := b.em.emit(ctx, s.state, b.d, phase, "", nil, fill...); err != nil {
				return err
			}
		}
		b.cfg.Faults.At(s.afterEvent)
	}
	return nil
}

// stepError attaches the error code of the step that failed.
type stepError struct {
	code messages.ErrorCode
	err  error
}

func (e *stepError) Error() string { return e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

// warmKey is the key a warm machine is cloned under; "" for a cold one,
// named for its job.
func (b *build) warmKey() string {
	if b.mode&prepareModes != 0 {
		return b.key
	}
	return ""
}

// releaseSlot frees a warm machine's slot once it is booted: waiting for
// its guest holds none, so refills never keep a request waiting that long.
func (b *build) releaseSlot(context.Context) error {
	if b.release != nil {
		b.release()
		b.release = nil
	}
	return nil
}

// bindMachine records the job in the warm machine's metadata, so that a
// worker started later knows the machine as the job's.
func (b *build) bindMachine(ctx context.Context) error {
	b.bindTried = true
	mach, err := b.cfg.Pool.Machines.Bind(ctx, b.key, b.binding())
	if err != nil {
		return err
	}
	b.bound, b.cloned = true, true
	if !mach.Running && b.mode != savedBind {
		return fmt.Errorf("bind warm machine %s: it is not running", b.domain)
	}
	return nil
}

// binding is what the job records in a warm machine's metadata.
func (b *build) binding() provision.Binding {
	return provision.Binding{
		JobID: b.jobID, RunnerKind: string(b.req.Runner.Kind), RequestedAt: b.req.RequestedAt, Deadline: b.deadline,
		HoldOnFailure: b.holdOnFailure,
	}
}

func (b *build) takeClaim(ctx context.Context) error {
	if err := b.claim.take(ctx); err != nil {
		return err
	}
	b.claimed = true
	return nil
}

// removeLeftover removes a machine an earlier delivery of this request
// left half-built: that delivery was never acknowledged, so nobody relies
// on it.
func (b *build) removeLeftover(ctx context.Context) error {
	if _, found, err := b.cfg.Machines.Lookup(ctx, b.key); err != nil {
		return err
	} else if found {
		if _, err := b.cfg.Machines.Remove(ctx, b.key); err != nil {
			return err
		}
	}
	return nil
}

func (b *build) clone(ctx context.Context) error {
	mach, err := b.cfg.Machines.Clone(ctx, provision.Spec{
		JobID: b.jobID, Key: b.warmKey(), Generation: b.generation, Image: b.req.Image, Host: b.cfg.Host, RunnerKind: string(b.req.Runner.Kind),
		RequestedAt: b.req.RequestedAt, Deadline: b.deadline,
		VCPUs: b.req.VCPUs, MemoryMiB: b.req.MemoryMiB, ScratchGiB: b.req.ScratchDiskGiB, ConsoleDir: b.cfg.ConsoleDir,
		HoldOnFailure: b.holdOnFailure,
	})
	if err != nil {
		return &stepError{code: cloneCode(err), err: err}
	}
	b.cloned = true
	b.imageOS, b.imageGeneration = mach.OS, mach.ImageGeneration
	sz := machineSize(mach)
	sz.VCPUs, sz.MemoryMiB = cmp.Or(sz.VCPUs, b.req.VCPUs), cmp.Or(sz.MemoryMiB, b.req.MemoryMiB)
	b.m.resize(b.a, sz)
	return nil
}

func cloneCode(err error) messages.ErrorCode {
	switch {
	case errors.Is(err, provision.ErrImageNotFound):
		return messages.CodeImageNotFound
	case errors.Is(err, provision.ErrImageInvalid):
		return messages.CodeImageInvalid
	}
	return messages.CodeCloneFailed
}

func (b *build) boot(ctx context.Context) error {
	if b.mode == savedBind {
		return b.restore(ctx)
	}
	if err := b.cfg.Machines.Start(ctx, b.key); err != nil {
		return &stepError{code: messages.CodeBootFailed, err: err}
	}
	return nil
}

// restore starts a saved warm machine the job bound, from its saved
// memory (or afresh, when libvirt could not restore it: the next step
// then waits for its agent as after a boot), and records the job in its
// running definition, which is the one it was saved with.
func (b *build) restore(ctx context.Context) error {
	pm := b.cfg.Pool.Machines
	if _, err := pm.Restore(ctx, b.key); err != nil {
		return &stepError{code: messages.CodeBootFailed, err: err}
	}
	_, err := pm.Bind(ctx, b.key, b.binding())
	return err
}

// setClock sets the guest's clock to the host's: a restored guest's clock
// stands where it was saved, which TLS and the runners' tokens mind. A
// saved pool's preparation sets it once too, so that an image whose agent
// may not do it fails there, not in a job.
func (b *build) setClock(ctx context.Context) error {
	if err := b.cfg.Pool.Clock.SetTime(ctx, b.domain, b.cfg.Now()); err != nil {
		return &stepError{code: messages.CodeAgentFailed,
			err: fmt.Errorf("set the clock of %s (saved warm pools need the guest agent's guest-set-time): %w", b.domain, err)}
	}
	return nil
}

// saveRetry is how often a saved pool's preparation looks for a free
// operation slot for its save.
const saveRetry = 100 * time.Millisecond

// save stops an agent-ready warm machine of a saved pool with its memory
// on disk. The save is a stop operation: it waits for an operation slot
// that no request needs (Slots.TryAcquire), so that it never keeps one
// waiting.
func (b *build) save(ctx context.Context) error {
	release := func() {}
	if s := b.cfg.Slots; s != nil {
		for {
			var ok bool
			if release, ok = s.TryAcquire(); ok {
				break
			}
			t := time.NewTimer(saveRetry)
			select {
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("save %s: %w", b.domain, context.Cause(ctx))
			case <-t.C:
			}
		}
	}
	defer release()
	return b.cfg.Pool.Machines.Save(ctx, b.key)
}

// waitAgent waits for the guest agent, within the request's boot timeout.
func (b *build) waitAgent(ctx context.Context) error {
	bctx, cancel := context.WithTimeout(ctx, b.req.BootTimeout())
	err := b.cfg.Agent.WaitReady(bctx, b.domain)
	cancel()
	if err == nil {
		return nil
	}
	if ctx.Err() == nil && (errors.Is(err, qga.ErrAgentTimeout) || errors.Is(err, context.DeadlineExceeded)) {
		return &stepError{code: messages.CodeBootTimeout,
			err: fmt.Errorf("the guest agent of %s did not answer within the boot timeout of %s: %w", b.domain, b.req.BootTimeout(), err)}
	}
	return &stepError{code: messages.CodeAgentFailed, err: err}
}

// detectOS takes the image's declared OS family, or what an earlier
// clone of the same image generation said, or asks the guest.
func (b *build) detectOS(ctx context.Context) error {
	if os, ok := b.m.guestOS(b.req.Image, b.imageGeneration); ok && b.imageOS == "" {
		b.em.os = string(os)
		return nil
	}
	os, err := detectOS(ctx, b.cfg.Agent, b.domain, b.imageOS)
	if err != nil {
		return &stepError{code: messages.CodeAgentFailed, err: err}
	}
	if b.imageOS == "" {
		b.m.learnGuestOS(b.req.Image, b.imageGeneration, os)
	}
	b.em.os = string(os)
	return nil
}

func (b *build) planRunner(context.Context) error {
	plan, err := runners.For(b.jobID, runners.OS(b.em.os), b.req.Runner, b.req.MaxLifetime())
	switch {
	case errors.Is(err, runners.ErrUnsupported):
		return &stepError{code: messages.CodeRunnerUnsupported, err: err}
	case err != nil:
		return &stepError{code: messages.CodeInvalidRequest, err: err}
	}
	b.plan = plan
	return nil
}

// prepareRunner writes the runner's secret, configuration and launch script.
func (b *build) prepareRunner(ctx context.Context) error {
	for _, c := range b.plan.Prepare {
		pctx, cancel := context.WithTimeout(ctx, prepareTimeout)
		_, err := b.cfg.Agent.Run(pctx, b.domain, execRequest(c, false))
		cancel()
		if err != nil {
			return &stepError{code: messages.CodeRunnerStartFailed, err: fmt.Errorf("%s: %w", c.Purpose, err)}
		}
	}
	return nil
}

func (b *build) launchRunner(ctx context.Context) error {
	pid, err := b.cfg.Agent.Start(ctx, b.domain, execRequest(b.plan.Launch, true))
	if err != nil {
		return &stepError{code: messages.CodeRunnerStartFailed, err: fmt.Errorf("%s: %w", b.plan.Launch.Purpose, err)}
	}
	b.pid, b.since = pid, b.cfg.Now()
	return nil
}

// classify returns the code of err and whether retrying cannot help. A
// build that was stopped (the worker shuts down), lost connections and
// unpublished events are transient; what libvirt or the guest refused for
// this request is permanent.
func classify(stopped bool, err error) (messages.ErrorCode, bool) {
	var se *stepError
	code := messages.CodeInternal
	if errors.As(err, &se) {
		code = se.code
	}
	switch {
	case stopped:
		return messages.CodeShutdown, false
	case provision.IsUnavailable(err):
		return code, false
	case se != nil:
		return code, true
	}
	return code, false
}

// startBuild begins a new job's build in the caller's slot.
func (a *actor) startBuild(root context.Context, c *provisionCmd) {
	req := c.req
	// The lifetime counts from the request, but never from the future: a
	// skewed orchestrator clock must not make a machine immortal.
	start := req.RequestedAt
	if now := a.m.cfg.Now(); start.After(now) {
		start = now
	}
	mode := coldBuild
	machineEm := a.rec.em
	if c.warm {
		// The job binds this warm machine: from now on its events are
		// the job's, numbered from the job's own history.
		mode = warmBind
		if a.rec.saved {
			mode = savedBind
		}
		a.jobID = req.JobID
		a.rec.em = emitter{cfg: &a.m.cfg, jobID: req.JobID, machine: a.key}
	}
	a.to(PhaseBuilding)
	a.build = c
	a.rec.image, a.rec.domain = req.Image, messages.DomainName(a.key)
	a.rec.deadline, a.rec.kind = start.Add(req.MaxLifetime()), string(req.Runner.Kind)
	if h := req.HoldOnFailure(); h > 0 && a.m.holdsOn() {
		a.rec.holdOnFailure = min(h, a.m.cfg.MaxHold)
	}
	a.rec.em.identify(a.rec)
	if !a.rec.counted {
		// The request's size until the clone tells the machine's, which
		// may be the image's; the provision's reservation covers the gap.
		a.rec.counted = true
		a.m.countMachine(a, true, a.rec.image, Size{VCPUs: req.VCPUs, MemoryMiB: req.MemoryMiB})
	}
	b := &build{
		a: a, cfg: &a.m.cfg, m: a.m, mode: mode, jobID: a.jobID, key: a.key, domain: a.rec.domain, deadline: a.rec.deadline,
		req: req, d: c.d, em: a.rec.em, claim: claimer{a: a, d: c.d}, holdOnFailure: a.rec.holdOnFailure,
		machineEm: machineEm,
	}
	// The table of runner kinds says which fields are secrets.
	secrets := runners.Secrets(req.Runner)
	// Known from the request on: the console of a machine held after a
	// failed build is scrubbed of them too.
	a.rec.runner.secrets, a.rec.runner.secretsKnown = secrets, true
	a.launch(root, "build", func(ctx context.Context) func() {
		err := b.run(ctx)
		stopped := context.Cause(ctx)
		return func() {
			a.rec.em = b.em
			a.rec.runner.os = b.em.os
			if err == nil && a.end == nil {
				a.rec.runner.pid, a.rec.runner.since = b.pid, b.since
				a.to(PhaseReady)
				a.build.reply <- answer{}
				a.build = nil
				a.answerWaiting(answer{})
				return
			}
			if err == nil {
				// A teardown came as the last step finished: it still ends
				// the job here, in this operation's slot.
				err = ErrSuperseded
			}
			a.to(PhaseRollingBack)
			a.launch(root, "roll back", a.rollback(b, err, stopped))
		}
	})
}

// startWarm prepares a new warm machine of c.image, to agent_ready, in the
// slot c.release frees after the boot.
func (a *actor) startWarm(root context.Context, c *warmCmd) {
	a.to(PhaseWarming)
	c.reply <- answer{}
	image := c.image
	a.rec.image, a.rec.domain = image, messages.DomainName(a.key)
	a.rec.generation = a.m.generation(image)
	a.rec.saved = a.m.cfg.Pool.Saved[image]
	mode := warmPrepare
	if a.rec.saved {
		mode = savedPrepare
	}
	a.rec.em.identify(a.rec)
	a.rec.counted = true
	a.m.countMachine(a, true, image, c.size)
	b := &build{
		a: a, cfg: &a.m.cfg, m: a.m, mode: mode, key: a.key, domain: a.rec.domain, generation: a.rec.generation,
		req: messages.Provision{Image: image, Runner: messages.Runner{Kind: messages.RunnerNone}},
		d:   Delivery{Origin: "warm"},
		em:  a.rec.em, claim: claimer{a: a, none: true}, release: c.release,
	}
	gen := a.rec.generation
	a.launch(root, "warm", func(ctx context.Context) func() {
		err := b.run(ctx)
		_ = b.releaseSlot(ctx)
		stopped := context.Cause(ctx)
		return func() {
			a.rec.em = b.em
			a.rec.runner.os = b.em.os
			if err == nil {
				a.to(PhaseIdle)
				a.m.warmed(a, image, gen, true)
				return
			}
			a.m.warmed(a, image, gen, false)
			if stopped == nil && a.m.cfg.Report != nil {
				a.m.cfg.Report("warm "+image, a.key, err)
			}
			a.to(PhaseRollingBack)
			em := a.rec.em
			key := a.key
			a.launch(root, "roll back", func(context.Context) func() {
				ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
				defer cancel()
				rerr := a.m.removeOwn(ctx, key, true)
				code, _ := classify(stopped != nil, err)
				if rerr == nil {
					_ = em.emit(ctx, messages.StateFailed, Delivery{Origin: "warm"}, 0, "", &messages.Error{Code: code, Message: err.Error()})
				}
				return func() {
					a.rec.em = em
					a.to(PhaseGone)
				}
			})
		}
	})
}

// retire removes an idle warm machine the pool took back, publishing the
// machine's tearing_down and torn_down with reason.
func (a *actor) retire(root context.Context, reason string) {
	a.startTeardown(root, &ending{reason: reason, d: Delivery{Origin: reason}, self: true}, nil)
}

// answerWaiting answers the repeated deliveries waiting for the build.
func (a *actor) answerWaiting(ans answer) {
	for _, c := range a.waiting {
		c <- ans
	}
	a.waiting = nil
}

// rollback removes what a failed or stopped build made and publishes its
// outcome: dropped when another host took the job, the superseding
// teardown's end, failed for a permanent failure or on the final delivery,
// nothing for a transient one (the request comes again). It runs in the
// build's slot, to the end even when the build was stopped.
//
// The outcome is this host's to decide only while it holds the job's
// claim: the claim is confirmed before anything is decided and again
// before an outcome is published, so a host that stalled inside a step and
// lost the job meanwhile ends the build with dropped, whatever the step's
// error; one that cannot confirm it publishes nothing and hands the
// request back.
//
// A warm machine the job took but did not bind (its claim was held
// elsewhere, or the build stopped first) goes back to its pool: nothing of
// the job reached it. One whose binding libvirt refused is retired, as
// its metadata is not known. A machine the rollback cannot remove is not
// forgotten: it stays counted, with its job's claim, and its removal is
// tried again at ticks (PhaseRemoving).
func (a *actor) rollback(b *build, err, stopped error) func(context.Context) func() {
	em, d, holder := a.rec.em, a.build.d, a.rec.claim.lostTo
	claimed := b.claimed
	var end ending
	superseded := a.end != nil
	if superseded {
		end = *a.end
	}
	jobID, key := a.jobID, a.key
	claim := claimer{a: a, d: d}
	unbound := b.mode&bindModes != 0 && !b.bindTried
	retireWarm := b.mode&bindModes != 0 && b.bindTried && !b.bound
	machineEm := b.machineEm
	// A failure of a machine that was built may hold it, and its failed
	// event carries its console; the job's secrets come from its request.
	var hold time.Duration
	var con consoleSource
	if b.cloned {
		hold = a.holdFor(&ending{cause: &messages.Error{}})
		con = a.consoleSource()
		con.secrets, con.known = runners.Secrets(a.build.req.Runner), true
	}
	var heldUntil time.Time
	holdRecorded := false
	return func(context.Context) func() {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		// result is what the build's caller, the deliveries waiting for the
		// build and the teardowns that superseded it are told.
		var result, ended error
		finished, release := false, true
		// leftover: a machine of the job's is still there, which this host
		// could not remove.
		leftover := false
		removeMine := func(orphans bool) error {
			if unbound {
				return nil // the pool's, not the job's
			}
			rerr := a.m.removeOwn(ctx, key, orphans)
			if rerr != nil {
				leftover = true
			}
			return rerr
		}
		// ours confirms the claim before an outcome is decided: nil while
		// this host holds the job, *Dropped once another host took it,
		// another error when that cannot be told now.
		ours := func() error {
			if !claimed {
				return nil
			}
			return claim.confirm(ctx)
		}
		// drop undoes what this delivery built and says so: another host
		// serves the job now, and the request is left to it.
		drop := func(dropped *Dropped) {
			release = false
			if dropped.Holder == "" {
				dropped.Holder = holder
			}
			result = dropped
			if claimed {
				if rerr := removeMine(false); rerr != nil {
					result = errors.Join(dropped, rerr)
				}
			}
			if result == error(dropped) {
				if perr := em.emit(ctx, messages.StateDropped, d, 0, dropped.Reason, nil,
					func(ev *messages.Event) { ev.Holder = dropped.Holder }); perr != nil {
					result = errors.Join(dropped, perr)
				}
			}
			// The teardown is answered by its next delivery, which finds
			// no machine of the job here (unknown_job).
			ended = fmt.Errorf("job %s went to host %s while its teardown waited", jobID, dropped.Holder)
		}
		// unsure hands the request back without an outcome: whether the
		// job is still this host's is not known.
		unsure := func(cerr error) {
			result = errors.Join(err, cerr)
			ended = fmt.Errorf("the claim of job %s could not be confirmed: %w", jobID, cerr)
		}
		dropped, isDrop := isDropped(err)
		if !isDrop {
			dropped, isDrop = isDropped(stopped)
		}
		var uncertain error
		if !isDrop {
			if cerr := ours(); cerr != nil {
				if dropped, isDrop = isDropped(cerr); !isDrop {
					uncertain = cerr
				}
			}
		}
		switch {
		case !claimed && errors.Is(err, errJobEnded):
			// The job ended before this delivery: nothing was built,
			// nothing is told, the request is acked.
			result, release, finished = nil, false, !unbound
		case !claimed && !isDrop:
			// Nothing was built, nobody was told: the request comes again.
			result, release = err, false
			ended = fmt.Errorf("job %s was not claimed: %w", jobID, err)
		case isDrop:
			drop(dropped)
		case uncertain != nil:
			unsure(uncertain)
			if rerr := removeMine(true); rerr != nil {
				result = errors.Join(result, rerr)
			}
		case unbound:
			// The build stopped between the claim and the binding: the
			// machine goes back to its pool, the request comes again.
			result = err
			ended = fmt.Errorf("job %s was not built: %w", jobID, err)
		case retireWarm:
			result = err
			ended = fmt.Errorf("job %s was not built: %w", jobID, err)
			outcome, _, rerr := a.m.remove(ctx, key, &machineEm,
				ending{reason: messages.ReasonBindFailed, d: Delivery{Origin: messages.ReasonBindFailed}}, "", consoleSource{})
			if outcome != tornDown {
				leftover = true
				result = errors.Join(result, rerr)
			}
		case !superseded && hold > 0 && failsForGood(stopped != nil, err, d):
			// The job fails, and its machine is kept for whoever debugs it.
			code, _ := classify(stopped != nil, err)
			until := a.m.cfg.Now().Add(hold).UTC().Truncate(time.Second)
			if perr := em.emit(ctx, messages.StateFailed, d, 0, "", &messages.Error{Code: code, Message: err.Error()},
				con.fill(), func(ev *messages.Event) { ev.HeldUntil = until }); perr != nil {
				// Unpublished: nobody knows of the hold; remove the
				// machine and let the request come again.
				result = errors.Join(err, perr)
				if rerr := removeMine(true); rerr != nil {
					result = errors.Join(result, rerr)
				}
				break
			}
			result, finished, heldUntil = &Failure{Code: code, Err: err}, true, until
			holdRecorded = a.m.recordHold(ctx, key, until) == nil
		default:
			var fill []func(*messages.Event)
			if !superseded && failsForGood(stopped != nil, err, d) {
				fill = append(fill, con.fill()) // read before the machine and its log go
			}
			if rerr := removeMine(true); rerr != nil {
				// The machine is still there: it is removed later, and
				// the request, which comes again, waits for that.
				result = errors.Join(err, rerr)
				ended = fmt.Errorf("roll back the build of job %s: %w", jobID, rerr)
				break
			}
			code, permanent := classify(stopped != nil, err)
			if !superseded && !permanent && !d.Final {
				result = err
				break
			}
			// The removal took a while: the job must still be this
			// host's when its end is published.
			if cerr := ours(); cerr != nil {
				if dropped, lost := isDropped(cerr); lost {
					drop(dropped)
				} else {
					unsure(cerr)
				}
				break
			}
			if superseded {
				// A teardown superseded the build: end the job for it,
				// with the teardown's delivery.
				result, ended = ErrSuperseded, a.m.endSuperseded(ctx, &em, end)
				finished = ended == nil
				break
			}
			if perr := em.emit(ctx, messages.StateFailed, d, 0, "", &messages.Error{Code: code, Message: err.Error()}, fill...); perr != nil {
				result = errors.Join(err, perr)
				break
			}
			result, finished = &Failure{Code: code, Err: err}, true
		}
		return func() {
			switch {
			case unbound:
				a.rec.em = em
				if release {
					a.releaseClaim()
				}
				a.returnToPool(machineEm)
			case leftover:
				a.rec.em = em
				a.rec.retryAt = time.Time{}
				a.to(PhaseRemoving)
				// The claim stays while the machine does: no other host
				// builds the job beside a machine that may run its runner.
			case heldUntil.IsZero():
				a.rec.em = em
				a.to(PhaseGone)
			default:
				a.rec.em = em
				a.enterHeld(heldUntil, holdRecorded)
			}
			if release && !unbound && !leftover {
				// The job's claim goes: a redelivery may be served by
				// any host at once.
				a.releaseClaim()
			}
			a.rec.finished = finished
			a.build.reply <- answer{err: result}
			a.build = nil
			waiting := answer{}
			if !finished {
				waiting = answer{err: fmt.Errorf("the earlier delivery of job %s did not build its machine", jobID)}
			}
			a.answerWaiting(waiting)
			for _, c := range a.enders {
				switch {
				case superseded:
					c <- answer{served: true, err: ended}
				case finished:
					c <- answer{}
				default:
					// A teardown that came while the build rolled back: this
					// host has no machine of the job now (or one that is
					// being removed); ask again.
					c <- answer{retry: true}
				}
			}
			a.enders, a.end = nil, nil
		}
	}
}

// failsForGood reports whether a build's failure ends its job with a
// failed event, rather than handing its request back for another try.
func failsForGood(stopped bool, err error, d Delivery) bool {
	if _, drop := isDropped(err); drop {
		return false
	}
	_, permanent := classify(stopped, err)
	return permanent || d.Final
}

// endSuperseded publishes the end of a job whose build a teardown stopped,
// once the build's machine is removed. When that fails the teardown's next
// delivery ends it: this host has no machine of the job any more.
func (m *Manager) endSuperseded(ctx context.Context, em *emitter, e ending) error {
	if err := em.emit(ctx, messages.StateTearingDown, e.d, 0, e.reason, nil); err != nil {
		return err
	}
	state := messages.StateTornDown
	if e.cause != nil {
		state = messages.StateFailed
	}
	return em.emit(ctx, state, e.d, 0, e.reason, e.cause)
}

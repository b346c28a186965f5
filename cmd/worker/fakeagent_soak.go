//go:build soak

package main

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// Only a worker built with the tag soak (test/soak) has a fake guest
// agent, and only with STRETCHY_SOAK_AGENT=fake in its environment: the
// soak runs thousands of jobs on libvirt's test driver, whose domains
// run no guest. A production build has neither the variable nor the code
// (TestNoFakeAgentInNormalBuild).
const fakeAgentEnv = "STRETCHY_SOAK_AGENT"

// fakeGuestAgent returns the fake agent when the environment asks for it,
// on the worker's own libvirt connection, else nil.
func fakeGuestAgent(lv *libvirt.Libvirt, caller qga.Caller) (lifecycle.Agent, error) {
	switch v := os.Getenv(fakeAgentEnv); v {
	case "":
		return nil, nil
	case "fake":
		return &fakeAgent{doms: lv, caller: caller, now: time.Now}, nil
	default:
		return nil, fmt.Errorf("%s=%q: the only value is fake", fakeAgentEnv, v)
	}
}

// fakeDomains are the libvirt calls of the fake agent.
type fakeDomains interface {
	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainSetMetadata(dom libvirt.Domain, typ int32, metadata libvirt.OptString, key libvirt.OptString, uri libvirt.OptString, flags libvirt.DomainModificationImpact) error
}

// fakeAgentNS is the metadata namespace where the fake agent keeps what
// a guest would know: its runner's pid, when it started and whether its
// exit was reported. It lives with the domain, in libvirtd, so that a
// worker killed and started again finds the runner as it would in a real
// guest, whose qemu-ga outlives the worker.
const fakeAgentNS = "https://stretchy-ci.dev/xmlns/soak-agent/1"

// fakeRunner is the fake guest's record of its runner.
type fakeRunner struct {
	XMLName  xml.Name `xml:"runner"`
	PID      int      `xml:"pid,attr"`
	Started  int64    `xml:"started,attr"` // Unix nanoseconds
	Reported bool     `xml:"reported,attr"`
}

// fakeAgent is a guest agent without a guest. The guest is Linux (debian),
// answers at once, runs every preparation command successfully, and runs
// its runner as long as the job id says: the job id's "-"-separated parts
// r<ms> (how long the runner runs, default 1000 ms), x<code> (its exit
// code, default 0) and hang (the agent never answers, so the boot times
// out). A domain that does not run answers as qemu-ga's does through
// libvirt: qga.ErrDomainNotFound or qga.ErrDomainNotRunning. Like
// qemu-ga, it reports a runner's exit once and then no longer knows the
// pid.
type fakeAgent struct {
	doms   fakeDomains
	caller qga.Caller
	now    func() time.Time
}

// fakeCallTimeout bounds each libvirt call of the fake agent.
const fakeCallTimeout = 10 * time.Second

// fakeJob is what a job id asks of the fake guest.
type fakeJob struct {
	run  time.Duration
	exit int
	hang bool
}

func parseFakeJob(domain string) fakeJob {
	j := fakeJob{run: time.Second}
	id := strings.TrimPrefix(domain, messages.DomainName(""))
	for part := range strings.SplitSeq(id, "-") {
		switch {
		case part == "hang":
			j.hang = true
		case len(part) > 1 && part[0] == 'r':
			if ms, err := strconv.Atoi(part[1:]); err == nil {
				j.run = time.Duration(ms) * time.Millisecond
			}
		case len(part) > 1 && part[0] == 'x':
			if c, err := strconv.Atoi(part[1:]); err == nil {
				j.exit = c
			}
		}
	}
	return j
}

// call makes fn on the worker's libvirt connection, bounded.
func (a *fakeAgent) call(ctx context.Context, fn func() error) error {
	if a.caller == nil {
		return fn()
	}
	return a.caller.Call(ctx, fakeCallTimeout, fn)
}

// running returns the domain when it runs, else the error qga gives.
func (a *fakeAgent) running(ctx context.Context, domain string) (libvirt.Domain, error) {
	var d libvirt.Domain
	var state int32
	err := a.call(ctx, func() error {
		var err error
		if d, err = a.doms.DomainLookupByName(domain); err != nil {
			return err
		}
		state, _, err = a.doms.DomainGetState(d, 0)
		return err
	})
	var le libvirt.Error
	switch {
	case errors.As(err, &le) && libvirt.ErrorNumber(le.Code) == libvirt.ErrNoDomain:
		return d, fmt.Errorf("fake agent on %s: %w: %w", domain, qga.ErrDomainNotFound, err)
	case err != nil:
		return d, fmt.Errorf("fake agent on %s: %w", domain, err)
	case libvirt.DomainState(state) != libvirt.DomainRunning:
		return d, fmt.Errorf("fake agent on %s: %w (state %d)", domain, qga.ErrDomainNotRunning, state)
	}
	return d, nil
}

// WaitReady answers at once for a running domain, or never for a job
// that asks the agent to hang.
func (a *fakeAgent) WaitReady(ctx context.Context, domain string) error {
	if _, err := a.running(ctx, domain); err != nil {
		return err
	}
	if parseFakeJob(domain).hang {
		<-ctx.Done()
		return fmt.Errorf("fake agent on %s: %w: %w", domain, qga.ErrAgentTimeout, ctx.Err())
	}
	return nil
}

// OSInfo says the guest is Debian.
func (a *fakeAgent) OSInfo(ctx context.Context, domain string) (qga.OSInfo, error) {
	if _, err := a.running(ctx, domain); err != nil {
		return qga.OSInfo{}, err
	}
	return qga.OSInfo{ID: "debian", Name: "Debian GNU/Linux"}, nil
}

// Run runs a preparation command: it succeeds at once.
func (a *fakeAgent) Run(ctx context.Context, domain string, _ qga.ExecRequest) (qga.Status, error) {
	if _, err := a.running(ctx, domain); err != nil {
		return qga.Status{}, err
	}
	return qga.Status{Exited: true}, nil
}

// Start starts the runner: it records in the domain when it started.
func (a *fakeAgent) Start(ctx context.Context, domain string, _ qga.ExecRequest) (int, error) {
	d, err := a.running(ctx, domain)
	if err != nil {
		return 0, err
	}
	h := fnv.New32a()
	h.Write([]byte(domain))
	r := fakeRunner{PID: 1000 + int(h.Sum32()%30000), Started: a.now().UnixNano()}
	if err := a.write(ctx, d, r); err != nil {
		return 0, fmt.Errorf("fake agent on %s: start the runner: %w", domain, err)
	}
	return r.PID, nil
}

// Status tells whether the runner has run as long as its job id says.
func (a *fakeAgent) Status(ctx context.Context, domain string, pid int) (qga.Status, error) {
	d, err := a.running(ctx, domain)
	if err != nil {
		return qga.Status{}, err
	}
	r, found, err := a.read(ctx, d)
	if err != nil {
		return qga.Status{}, fmt.Errorf("fake agent on %s: %w", domain, err)
	}
	if !found || r.PID != pid || r.Reported {
		return qga.Status{}, fmt.Errorf("fake agent on %s: guest-exec-status of pid %d: %w", domain, pid, qga.ErrCommandFailed)
	}
	job := parseFakeJob(domain)
	if a.now().Sub(time.Unix(0, r.Started)) < job.run {
		return qga.Status{ExitCode: -1}, nil
	}
	r.Reported = true
	if err := a.write(ctx, d, r); err != nil {
		return qga.Status{}, fmt.Errorf("fake agent on %s: %w", domain, err)
	}
	return qga.Status{Exited: true, ExitCode: job.exit, Stdout: []byte("soak runner done\n")}, nil
}

func (a *fakeAgent) read(ctx context.Context, d libvirt.Domain) (fakeRunner, bool, error) {
	var doc string
	err := a.call(ctx, func() error {
		var err error
		doc, err = a.doms.DomainGetMetadata(d, int32(libvirt.DomainMetadataElement), libvirt.OptString{fakeAgentNS}, libvirt.DomainAffectLive)
		return err
	})
	var le libvirt.Error
	if errors.As(err, &le) && libvirt.ErrorNumber(le.Code) == libvirt.ErrNoDomainMetadata {
		return fakeRunner{}, false, nil
	}
	if err != nil {
		return fakeRunner{}, false, fmt.Errorf("read the runner: %w", err)
	}
	var r fakeRunner
	if err := xml.Unmarshal([]byte(doc), &r); err != nil {
		return fakeRunner{}, false, fmt.Errorf("read the runner: %w", err)
	}
	return r, true, nil
}

func (a *fakeAgent) write(ctx context.Context, d libvirt.Domain, r fakeRunner) error {
	doc, err := xml.Marshal(r)
	if err != nil {
		return err
	}
	return a.call(ctx, func() error {
		return a.doms.DomainSetMetadata(d, int32(libvirt.DomainMetadataElement), libvirt.OptString{string(doc)},
			libvirt.OptString{"soak"}, libvirt.OptString{fakeAgentNS}, libvirt.DomainAffectLive)
	})
}

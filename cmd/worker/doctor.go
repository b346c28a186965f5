package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

const doctorUsage = `usage: worker doctor [--image NAME ...] [--boot] [--json] [--libvirt-uri U] [--nats-url U]
                     [--host H] [--domain-type kvm|qemu] [--boot-timeout D]

Checks this host for the worker: libvirt access, storage pools and their
free space, each --image as Clone sees it (defined, shut off, not named
stretchy-..., writable disks and NVRAM in storage pools, valid settings)
and, with --nats-url, the NATS server, streams and this host's consumers.
--boot also clones and boots each image that passed, as machine
stretchy-doctor-<random> of host doctor-<random> (workers leave it alone),
waits for its guest agent, detects its OS, runs "echo Hello" (Windows:
Write-Host 'Hello'), looks for each runner's program and asks it for its
version as stretchy, looks for files that make a runner fail every job
(a Forgejo Runner registration, <home>/.runner), checks the agent's
version, says which interfaces the guest filter covers and tries, from
inside the guest, to connect to each control-plane address (NATS,
--http-addr, libvirtd, --isolate-from; docs/security.md 4.5), and removes
the machine again, also on failure or Ctrl-C.

Each check prints a line "ok", "warn" or "fail" with what it found and,
unless ok, a hint how to fix it. The exit status is 1 if a check failed
(warnings do not fail), else 0.

--json prints one JSON document once all checks ran, instead of lines:
  {"status": "ok"|"warn"|"fail",                  the worst status
   "checks": [{"check": "image.state",             what was checked
               "target": "tiny-linux",             image, pool, stream ...
               "status": "ok"|"warn"|"fail",
               "message": "shut off",
               "hint": "...",                      unless ok
               "duration_ms": 3520}]}              boot steps only
Check names: libvirt, pool, pool.space, image, image.name, image.state,
image.settings, image.storage, image.nvram, boot.start, boot.agent, boot.os,
boot.echo, boot.home, boot.runner.forgejo, boot.runner.github,
boot.runner.jenkins, boot.agent_version, boot.nics, boot.isolation,
boot.cleanup, nats, nats.stream,
nats.claims, nats.consumer.

`

// Thresholds of the checks.
const (
	// minPoolFree is the free space under which a pool gets a warning:
	// linked clones take little, but grow with what the guests write.
	minPoolFree = 10 << 30
	// minAgentMajor is the oldest qemu-ga major version that passes.
	minAgentMajor = 8
	// doctorCallTimeout bounds single steps that should answer at once.
	doctorCallTimeout = 30 * time.Second
	// doctorCleanupTimeout bounds removing the boot check's machine.
	doctorCleanupTimeout = 2 * time.Minute
	// runnerVersionTimeout bounds asking one runner program for its
	// version: a JVM or .NET start under TCG takes seconds.
	runnerVersionTimeout = time.Minute
	// maxVersionText bounds the version or reason quoted in a check.
	maxVersionText = 120
)

// windowsPowerShell is the PowerShell pkg/runners starts runners with.
const windowsPowerShell = `C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe`

type status string

const (
	statusOK   status = "ok"
	statusWarn status = "warn"
	statusFail status = "fail"
)

// check is the outcome of one check, one line of output.
type check struct {
	Name       string `json:"check"`
	Target     string `json:"target,omitempty"`
	Status     status `json:"status"`
	Message    string `json:"message"`
	Hint       string `json:"hint,omitempty"`
	DurationMS int64  `json:"duration_ms,omitempty"`
}

func ok(name, target, format string, args ...any) check {
	return check{Name: name, Target: target, Status: statusOK, Message: fmt.Sprintf(format, args...)}
}

func warn(name, target, hint, format string, args ...any) check {
	return check{Name: name, Target: target, Status: statusWarn, Message: fmt.Sprintf(format, args...), Hint: hint}
}

func fail(name, target, hint, format string, args ...any) check {
	return check{Name: name, Target: target, Status: statusFail, Message: fmt.Sprintf(format, args...), Hint: hint}
}

func (c check) took(d time.Duration) check {
	c.DurationMS = max(d.Milliseconds(), 1)
	return c
}

// doctorConfig is what "worker doctor" is asked to check.
type doctorConfig struct {
	Images      labels
	Boot        bool
	JSON        bool
	LibvirtURI  string
	NATSURL     string
	NATS        NATSAuth
	InboxPrefix string
	Host        string
	DomainType  string
	BootTimeout time.Duration
	// Isolation is the control plane the boot check probes from inside
	// the guest (doctor_isolation.go).
	Isolation doctorIsolation
}

func (c *doctorConfig) register(fs *flag.FlagSet) {
	fs.Var(&c.Images, "image", "an image (libvirt domain) to check; repeat the flag for more")
	fs.BoolVar(&c.Boot, "boot", false, "also clone, boot and remove each image that passed, checking its guest agent and runners")
	fs.BoolVar(&c.JSON, "json", false, "print one JSON document instead of lines")
	fs.StringVar(&c.LibvirtURI, "libvirt-uri", envString("STRETCHY_LIBVIRT_URI", "qemu:///system"), "libvirt connection URI, as for virsh -c (STRETCHY_LIBVIRT_URI)")
	fs.StringVar(&c.NATSURL, "nats-url", envString("STRETCHY_NATS_URL", ""), "NATS URL(s) to check; empty skips the NATS checks (STRETCHY_NATS_URL)")
	c.NATS.register(fs)
	fs.StringVar(&c.NATS.EmbeddedDir, "nats-data-dir", envString("STRETCHY_NATS_DATA_DIR", defaultNATSDataDir),
		"--nats-data-dir of worker run on this host: given no other credentials, a --nats-url on loopback is checked with its embedded server's credentials there (STRETCHY_NATS_DATA_DIR)")
	fs.StringVar(&c.InboxPrefix, "inbox-prefix", envString("STRETCHY_INBOX_PREFIX", ""),
		"prefix of the inboxes of the NATS checks, as worker run's; empty: "+bus.WorkerInbox("<host>")+", the --host's worker's (STRETCHY_INBOX_PREFIX)")
	fs.StringVar(&c.Host, "host", envString("STRETCHY_HOST", defaultHost()), "host id whose consumers to look for, as for worker run (STRETCHY_HOST)")
	fs.StringVar(&c.DomainType, "domain-type", envString("STRETCHY_DOMAIN_TYPE", ""), `--boot: domain type of the clone, "kvm", "qemu" or empty to keep the image's (STRETCHY_DOMAIN_TYPE)`)
	fs.DurationVar(&c.BootTimeout, "boot-timeout", messages.DefaultBootTimeout, "--boot: how long the guest agent may take to answer")
	c.Isolation.register(fs)
}

// Validate fails fast, naming the flag at fault.
func (c *doctorConfig) Validate() error {
	var errs []error
	if !messages.ValidHost(c.Host) {
		errs = append(errs, fmt.Errorf("--host %q: must be 1-64 characters of A-Z a-z 0-9 _ -", c.Host))
	}
	if u, err := url.Parse(c.LibvirtURI); err != nil || u.Scheme == "" {
		errs = append(errs, fmt.Errorf("--libvirt-uri %q: not a libvirt URI such as qemu:///system", c.LibvirtURI))
	}
	switch c.DomainType {
	case "", "kvm", "qemu":
	default:
		errs = append(errs, fmt.Errorf(`--domain-type %q: must be "kvm", "qemu" or empty`, c.DomainType))
	}
	if given := c.NATS.given(); c.NATSURL == "" && len(given) > 0 {
		errs = append(errs, fmt.Errorf("%s: needs --nats-url", strings.Join(given, ", ")))
	} else if c.NATSURL != "" {
		if err := c.NATS.Validate(c.NATSURL); err != nil {
			errs = append(errs, err)
		}
	}
	if c.BootTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--boot-timeout %s: must be positive", c.BootTimeout))
	}
	if c.Boot && len(c.Images) == 0 {
		errs = append(errs, errors.New("--boot needs at least one --image"))
	}
	return errors.Join(errs...)
}

// doctor runs the checks and reports them.
type doctor struct {
	cfg    doctorConfig
	out    io.Writer
	checks []check
}

// add records c and, for people, prints it at once: boot checks take a
// while.
func (d *doctor) add(c check) {
	d.checks = append(d.checks, c)
	if !d.cfg.JSON {
		printCheck(d.out, c)
	}
}

func printCheck(w io.Writer, c check) {
	subject := c.Message
	if c.Target != "" {
		subject = c.Target + ": " + c.Message
	}
	fmt.Fprintf(w, "%-4s  %-19s  %s\n", c.Status, c.Name, subject)
	if c.Hint != "" {
		fmt.Fprintf(w, "      hint: %s\n", c.Hint)
	}
}

// worst returns the most severe status of checks.
func worst(checks []check) status {
	s := statusOK
	for _, c := range checks {
		switch {
		case c.Status == statusFail:
			return statusFail
		case c.Status == statusWarn:
			s = statusWarn
		}
	}
	return s
}

func doctorCommand(ctx context.Context, args []string) error {
	var cfg doctorConfig
	fs := flag.NewFlagSet("worker doctor", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), doctorUsage); fs.PrintDefaults() }
	cfg.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; images are given with --image", fs.Args())
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	d := &doctor{cfg: cfg, out: os.Stdout}
	d.run(ctx)
	return d.finish(ctx)
}

// run runs every check that applies; checks that depend on a failed one
// are skipped.
func (d *doctor) run(ctx context.Context) {
	if link := d.checkLibvirt(ctx); link != nil {
		p := d.guestFilterProvisioner(ctx, link)
		agent := qga.New(link.Libvirt(), qga.Options{Caller: link})
		d.checkPools(ctx, p)
		for _, image := range d.cfg.Images {
			if ctx.Err() != nil {
				break
			}
			if d.checkImage(ctx, p, image) && d.cfg.Boot {
				d.boot(ctx, p, agent, image)
			}
		}
		// Disconnecting is bounded by the Link; its error changes nothing
		// about the host's health.
		_ = link.Close()
	}
	if d.cfg.NATSURL != "" && ctx.Err() == nil {
		d.checkNATS(ctx)
	}
}

// finish prints the JSON document or the summary line and turns failed
// checks into the command's error, hence exit status 1.
func (d *doctor) finish(ctx context.Context) error {
	var okN, warnN, failN int
	for _, c := range d.checks {
		switch c.Status {
		case statusOK:
			okN++
		case statusWarn:
			warnN++
		default:
			failN++
		}
	}
	if d.cfg.JSON {
		enc := json.NewEncoder(d.out)
		enc.SetIndent("", "  ")
		doc := struct {
			Status status  `json:"status"`
			Checks []check `json:"checks"`
		}{worst(d.checks), d.checks}
		if doc.Checks == nil {
			doc.Checks = []check{}
		}
		if err := enc.Encode(doc); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(d.out, "\n%d checks: %d ok, %d warn, %d fail\n", len(d.checks), okN, warnN, failN)
	}
	switch {
	case ctx.Err() != nil:
		return errors.New("interrupted; the checks above ran")
	case failN > 0:
		return fmt.Errorf("%d of %d checks failed", failN, len(d.checks))
	}
	return nil
}

// checkLibvirt connects to libvirt and lists the managed machines, which
// needs the access a worker needs. It returns nil if that fails.
func (d *doctor) checkLibvirt(ctx context.Context) *provision.Link {
	uri := d.cfg.LibvirtURI
	link := provision.NewLink(uri, provision.LinkOptions{})
	cctx, cancel := context.WithTimeout(ctx, doctorCallTimeout)
	defer cancel()
	err := link.Connect(cctx)
	var machines []provision.Machine
	if err == nil {
		machines, err = provision.New(link.Libvirt(), provision.Options{Link: link}).List(cctx)
		if err != nil {
			_ = link.Close()
		}
	}
	if err != nil {
		d.add(fail("libvirt", uri, libvirtHint(err, uri), "%v", err))
		return nil
	}
	d.add(ok("libvirt", uri, "connected; %d machines (stretchy-…) on this host", len(machines)))
	return link
}

// libvirtHint says how to fix a failed libvirt connection.
func libvirtHint(err error, uri string) string {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return "libvirtd is not running (no socket at " + provision.DefaultSocket + "): start it, e.g. systemctl start libvirtd " +
			"(or libvirtd -d); on a test machine: go tool task libvirt:up"
	case provision.IsAccessDenied(err):
		return "this user may not manage libvirt: run the worker as root, or add its user to the group libvirt " +
			"(usermod -aG libvirt USER, then log in again) and check with: virsh -c " + uri + " list --all"
	case errors.Is(err, provision.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return "libvirtd does not answer: look at its log (journalctl -u libvirtd) and restart it"
	}
	return "check that this works: virsh -c " + uri + " list --all"
}

// checkPools checks that every pool is active and has room for clones.
func (d *doctor) checkPools(ctx context.Context, p *provision.Provisioner) {
	uri := d.cfg.LibvirtURI
	pools, err := p.InspectPools(ctx)
	if err != nil {
		d.add(fail("pool", "", "check that this works: virsh -c "+uri+" pool-list --all", "%v", err))
		return
	}
	if len(pools) == 0 {
		d.add(warn("pool", "", "create one, e.g. virsh -c "+uri+" pool-define-as ci-images dir --target /var/lib/libvirt/ci-images, "+
			"then pool-build, pool-start and pool-autostart ci-images",
			"no storage pools; writable disks of images must be pool volumes to be cloned"))
		return
	}
	for _, pool := range pools {
		if !pool.Active {
			d.add(warn("pool", pool.Name, fmt.Sprintf("start it: virsh -c %s pool-start %s; and start it with libvirtd: virsh -c %s pool-autostart %s",
				uri, pool.Name, uri, pool.Name), "inactive (%s, %s); clones of images in it fail", pool.Type, pool.Path))
			continue
		}
		d.add(ok("pool", pool.Name, "active (%s, %s)", pool.Type, pool.Path))
		if pool.Available < minPoolFree {
			d.add(warn("pool.space", pool.Name, "clones grow with what their guests write: free space in "+pool.Path+" or move images to a larger pool",
				"%s free of %s, under %s", gib(pool.Available), gib(pool.Capacity), gib(minPoolFree)))
		} else {
			d.add(ok("pool.space", pool.Name, "%s free of %s", gib(pool.Available), gib(pool.Capacity)))
		}
	}
}

func gib(b uint64) string { return strconv.FormatFloat(float64(b)/(1<<30), 'f', 1, 64) + " GiB" }

// checkImage checks image as Clone would and reports whether it passed.
func (d *doctor) checkImage(ctx context.Context, p *provision.Provisioner, image string) bool {
	uri := d.cfg.LibvirtURI
	r, err := p.InspectImage(ctx, image)
	switch {
	case errors.Is(err, provision.ErrImageNotFound):
		d.add(fail("image", image, "check the name (it is case-sensitive) with: virsh -c "+uri+" list --all; or define the image",
			"no domain of this name at %s", uri))
		for _, pr := range r.Problems {
			d.add(fail("image."+string(pr.Part), image, imageHint(pr, r, uri), "%v", pr))
		}
		return false
	case err != nil && !errors.Is(err, provision.ErrImageInvalid):
		d.add(fail("image", image, "check that this works: virsh -c "+uri+" dumpxml "+image, "%v", err))
		return false
	}
	d.add(ok("image", image, "defined"))
	parts := map[provision.ImagePart]string{
		provision.PartName:     "name is not reserved for machines",
		provision.PartState:    r.State,
		provision.PartSettings: imageSettings(r),
		provision.PartStorage:  imageStorage(r),
	}
	for _, part := range []provision.ImagePart{provision.PartName, provision.PartState, provision.PartSettings, provision.PartStorage} {
		failed := false
		for _, pr := range r.Problems {
			if pr.Part == part {
				d.add(fail("image."+string(part), image, imageHint(pr, r, uri), "%v", pr))
				failed = true
			}
		}
		if !failed {
			d.add(ok("image."+string(part), image, "%s", parts[part]))
		}
	}
	switch {
	case r.NVRAM == "":
	case r.NVRAMPool == "":
		d.add(warn("image.nvram", image, "to copy it like the disks, keep it in a pool: copy the file into a pool's directory, "+
			"run virsh -c "+uri+" pool-refresh POOL, and point the image's <nvram> at the copy",
			"NVRAM %s is outside every storage pool; clones upload a copy of it through libvirt", r.NVRAM))
	default:
		d.add(ok("image.nvram", image, "NVRAM %s in pool %s", r.NVRAM, r.NVRAMPool))
	}
	return len(r.Problems) == 0
}

func imageSettings(r provision.ImageReport) string {
	s := "clone mode " + string(r.CloneMode)
	if r.OS != "" {
		return s + ", OS " + r.OS + " (declared)"
	}
	return s + ", OS detected at boot"
}

func imageStorage(r provision.ImageReport) string {
	if len(r.Disks) == 0 {
		return "no writable disks"
	}
	var parts []string
	for _, disk := range r.Disks {
		parts = append(parts, fmt.Sprintf("disk %s: %s (%s, pool %s)", disk.Target, disk.Source, disk.Format, disk.Pool))
	}
	return strings.Join(parts, "; ")
}

// imageHint says how to fix an image problem.
func imageHint(pr provision.ImageProblem, r provision.ImageReport, uri string) string {
	switch pr.Part {
	case provision.PartName:
		return "the prefix stretchy- is reserved for the machines workers create, which they adopt or remove: " +
			"rename the image while it is shut off: virsh -c " + uri + " domrename " + r.Name + " NEW-NAME"
	case provision.PartState:
		return "shut it down: virsh -c " + uri + " shutdown " + r.Name + " (images are cloned, never run themselves)"
	case provision.PartSettings:
		return "fix the settings (docs/protocol.md 7.4): virsh -c " + uri + " metadata " + r.Name +
			" https://stretchy-ci.dev/xmlns/libvirt-worker/1 --key stretchy --config --set '<image clone-mode=\"linked\"/>'"
	}
	if errors.Is(pr, provision.ErrReflinkUnsupported) {
		return "use clone mode linked or copy for this image (docs/protocol.md 7.4)"
	}
	return "keep every writable disk as a volume of a dir, fs or netfs storage pool: move the file into the pool's directory, " +
		"run virsh -c " + uri + " pool-refresh POOL and point the disk at it; disks shared by all clones can be marked " +
		"<readonly/> or <shareable/>"
}

// boot clones image, boots the clone and checks its guest, then removes
// it, whatever happened.
func (d *doctor) boot(ctx context.Context, p *provision.Provisioner, agent *qga.Agent, image string) {
	suffix := randomHex()
	job := "doctor-" + suffix
	machine := provision.DomainName(job)
	defer d.removeMachine(ctx, p, image, job)

	start := time.Now()
	m, err := p.Clone(ctx, provision.Spec{
		JobID: job, Image: image,
		// A host id no worker has: workers leave its machine alone.
		Host: "doctor-" + suffix, RunnerKind: string(messages.RunnerNone),
		RequestedAt: start.UTC(), Deadline: start.Add(d.cfg.BootTimeout + time.Hour).UTC(),
	})
	if err == nil {
		err = p.Start(ctx, job)
	}
	if err != nil {
		d.add(fail("boot.start", image, startHint(err), "%v", err).took(time.Since(start)))
		return
	}
	started := time.Now()
	d.add(ok("boot.start", image, "cloned (%s) as %s and started", m.CloneMode, machine).took(started.Sub(start)))

	wctx, cancel := context.WithTimeout(ctx, d.cfg.BootTimeout)
	err = agent.WaitReady(wctx, machine)
	cancel()
	boot := time.Since(started)
	if err != nil {
		if ctx.Err() != nil {
			d.add(fail("boot.agent", image, "run doctor again for the remaining checks", "interrupted while waiting for the guest agent").took(boot))
			return
		}
		d.add(fail("boot.agent", image, agentHint(err, d.cfg.BootTimeout), "%v", err).took(boot))
		return
	}
	d.add(ok("boot.agent", image, "the guest agent answered %s after start", boot.Round(time.Millisecond)).took(boot))

	osFamily, how, err := detectGuestOS(ctx, agent, machine, m.OS)
	if err != nil {
		d.add(fail("boot.os", image, "declare the OS: virsh -c "+d.cfg.LibvirtURI+" metadata "+image+
			" https://stretchy-ci.dev/xmlns/libvirt-worker/1 --key stretchy --config --set '<image os=\"linux\"/>' "+
			"(keep its clone-mode attribute, if any)", "%v", err))
		return
	}
	d.add(ok("boot.os", image, "%s (%s)", osFamily, how))
	if !d.checkEcho(ctx, agent, image, machine, osFamily) {
		return
	}
	d.checkRunners(ctx, agent, image, job, osFamily)
	d.checkAgentVersion(ctx, agent, image, machine)
	d.checkIsolation(ctx, p, agent, image, job, osFamily)
}

// removeMachine removes the boot check's machine, also after ctx ended.
func (d *doctor) removeMachine(ctx context.Context, p *provision.Provisioner, image, job string) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), doctorCleanupTimeout)
	defer cancel()
	machine := provision.DomainName(job)
	existed, err := p.Remove(cctx, job)
	switch {
	case err != nil:
		u := d.cfg.LibvirtURI
		d.add(fail("boot.cleanup", image, fmt.Sprintf("remove it by hand: virsh -c %s destroy %s; virsh -c %s undefine --nvram %s; "+
			"and delete its volumes %s-*", u, machine, u, machine, machine), "%v", err))
	case existed:
		d.add(ok("boot.cleanup", image, "removed %s and its volumes", machine))
	default:
		d.add(ok("boot.cleanup", image, "nothing of %s left to remove", machine))
	}
}

func startHint(err error) string {
	switch {
	case errors.Is(err, provision.ErrReflinkUnsupported):
		return "the pool's file system cannot share extents: use clone mode linked or copy (docs/protocol.md 7.4)"
	case errors.Is(err, provision.ErrImageInvalid):
		return "fix the image as the error says"
	}
	return "see /var/log/libvirt/qemu/<machine>.log and libvirtd's log; without KVM (/dev/kvm) use --domain-type qemu"
}

func agentHint(err error, timeout time.Duration) string {
	switch {
	case errors.Is(err, qga.ErrAgentNotConfigured):
		return "give the image a guest agent channel: <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel> " +
			"(virt-manager: Add Hardware, Channel, org.qemu.guest_agent.0)"
	case errors.Is(err, qga.ErrDomainNotRunning):
		return "the machine stopped while booting: see /var/log/libvirt/qemu/<machine>.log and the guest's console"
	}
	return fmt.Sprintf("install qemu-guest-agent in the image and enable it at boot, or raise --boot-timeout (now %s) "+
		"for a slow guest; without KVM, guests boot much slower", timeout)
}

// detectGuestOS names the guest's OS family the way the worker does
// (internal/lifecycle detectOS, docs/protocol.md 7.1): the image's declared
// OS, else guest-get-osinfo's id, else that id with `uname -s`. It also
// says how it found out.
func detectGuestOS(ctx context.Context, agent *qga.Agent, machine, declared string) (runners.OS, string, error) {
	if declared != "" {
		family, err := runners.ParseOS(declared, "")
		return family, "declared by the image", err
	}
	info, err := agent.OSInfo(ctx, machine)
	if err != nil {
		return "", "", fmt.Errorf("detect the OS: %w", err)
	}
	family, err := runners.ParseOS(info.ID, "")
	if err == nil {
		return family, fmt.Sprintf("guest-get-osinfo id %q", info.ID), nil
	}
	uctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	st, uerr := agent.Run(uctx, machine, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "uname -s"}, Capture: true})
	if uerr != nil {
		return "", "", fmt.Errorf("detect the OS: %w (uname: %v)", err, uerr)
	}
	kernel := strings.TrimSpace(string(st.Stdout))
	family, err = runners.ParseOS(info.ID, kernel)
	if err != nil {
		return "", "", fmt.Errorf("detect the OS: %w", err)
	}
	return family, fmt.Sprintf("guest-get-osinfo id %q, uname -s %q", info.ID, kernel), nil
}

// checkEcho runs the seed checklist's echo through the guest agent.
func (d *doctor) checkEcho(ctx context.Context, agent *qga.Agent, image, machine string, osFamily runners.OS) bool {
	req := qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "echo Hello"}, Capture: true}
	hint := "the guest agent must allow guest-exec and guest-exec-status (qemu-ga's --block-rpcs/--allow-rpcs " +
		"or qemu-ga.conf), and /bin/sh must exist"
	if osFamily == runners.Windows {
		req = qga.ExecRequest{Path: windowsPowerShell, Args: []string{"-NoProfile", "-NonInteractive", "-Command", "Write-Host 'Hello'"}, Capture: true}
		hint = "the guest agent must allow guest-exec and guest-exec-status, and Windows PowerShell must be at " + windowsPowerShell
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	start := time.Now()
	st, err := agent.Run(rctx, machine, req)
	switch {
	case err != nil:
		d.add(fail("boot.echo", image, hint, "%v", err))
		return false
	case strings.TrimSpace(string(st.Stdout)) != "Hello":
		d.add(fail("boot.echo", image, hint, "printed %q instead of Hello", st.Stdout))
		return false
	}
	d.add(ok("boot.echo", image, "%s printed Hello", req.Path).took(time.Since(start)))
	return true
}

// checkRunners looks for stretchy's home and the program of each runner
// kind of the table (pkg/runners) where the worker will start it, asks
// the program for its version, and fails a kind whose Conflicts, files
// that make it fail every job, the image holds.
func (d *doctor) checkRunners(ctx context.Context, agent *qga.Agent, image, job string, osFamily runners.OS) {
	machine := provision.DomainName(job)
	homeChecked := false
	for _, k := range runners.Kinds() {
		if !k.Starts() {
			continue
		}
		name := "boot.runner." + string(k.Kind)
		program, err := k.Program(osFamily)
		switch {
		case errors.Is(err, runners.ErrUnsupported):
			d.add(ok(name, image, "not supported on %s; requests for it fail with %s", osFamily, messages.CodeRunnerUnsupported))
			continue
		case err != nil:
			d.add(fail(name, image, "", "no launch plan: %v", err))
			continue
		}
		if !homeChecked {
			homeChecked = true
			home := runners.Home(osFamily)
			if found, err := guestPathExists(ctx, agent, machine, osFamily, home); err != nil || !found {
				d.add(warn("boot.home", image, "add the local user "+runners.User+" with this home directory (docs/protocol.md 7); "+
					"runners run as "+runners.User, "%s", missing(home, err)))
			} else {
				d.add(ok("boot.home", image, "%s exists", home))
			}
		}
		found, err := guestPathExists(ctx, agent, machine, osFamily, program)
		if err != nil || !found {
			d.add(warn(name, image, fmt.Sprintf("if the image is for %s jobs, install it at that path (docs/protocol.md 7.2)", k.Kind),
				"%s", missing(program, err)))
			continue
		}
		version := runnerVersion(ctx, agent, machine, job, osFamily, k.Kind)
		if c, err := conflict(ctx, agent, machine, osFamily, k); err != nil {
			d.add(warn(name, image, "run doctor again", "%s exists, %s; could not look for %s: %v", program, version, c.Path, err))
		} else if c.Path != "" {
			d.add(fail(name, image, "remove "+c.Path+" from the image (docs/protocol.md 7.4)",
				"%s exists, %s, but %s exists: %s", program, version, c.Path, c.Why))
		} else {
			d.add(ok(name, image, "%s exists, %s", program, version))
		}
	}
}

// conflict returns the first file of k's Conflicts that the guest holds,
// or none (an empty Path); on an error, the Conflict it could not look
// for.
func conflict(ctx context.Context, agent *qga.Agent, machine string, osFamily runners.OS, k runners.Kind) (runners.Conflict, error) {
	for _, c := range k.Conflicts(osFamily) {
		found, err := guestPathExists(ctx, agent, machine, osFamily, c.Path)
		if err != nil || found {
			return c, err
		}
	}
	return runners.Conflict{}, nil
}

// runnerVersion asks the program of kind for its version as stretchy,
// the way the worker starts runners (runners.VersionPlan), and says what
// it answered or why there is no answer. The version is not checked
// against the minimum docs/protocol.md 7.5 names: the programs print it in
// different forms.
func runnerVersion(ctx context.Context, agent *qga.Agent, machine, job string, osFamily runners.OS, kind messages.RunnerKind) string {
	plan, err := runners.VersionPlan(job, osFamily, kind)
	if err != nil {
		return versionUnknown(err.Error())
	}
	vctx, cancel := context.WithTimeout(ctx, runnerVersionTimeout)
	defer cancel()
	for _, c := range plan.Prepare {
		if _, err := agent.Run(vctx, machine, qga.ExecRequest{Path: c.Path, Args: c.Args, Env: c.Env, Stdin: c.Stdin}); err != nil {
			return versionUnknown(c.Purpose + ": " + err.Error())
		}
	}
	c := plan.Launch
	st, err := agent.Run(vctx, machine, qga.ExecRequest{Path: c.Path, Args: c.Args, Env: c.Env, Capture: true})
	if ctx.Err() != nil {
		return versionUnknown("interrupted")
	}
	return versionAnswer(st, err, runnerVersionTimeout)
}

// versionAnswer turns the outcome of a version call into the text of the
// runner's check: the first line the program printed, or why not.
func versionAnswer(st qga.Status, err error, timeout time.Duration) string {
	var exit *qga.ExitError
	switch {
	case errors.Is(err, qga.ErrRunTimeout):
		return versionUnknown(fmt.Sprintf("no answer within %s", timeout))
	case errors.As(err, &exit) && st.Signal != 0:
		return versionUnknown(fmt.Sprintf("killed by signal %d", st.Signal))
	case errors.As(err, &exit):
		why := fmt.Sprintf("exit code %d", st.ExitCode)
		if line := firstLine(st.Stderr); line != "" {
			why += ": " + line
		} else if line := firstLine(st.Stdout); line != "" {
			why += ": " + line
		}
		return versionUnknown(why)
	case err != nil:
		return versionUnknown(err.Error())
	}
	if line := firstLine(st.Stdout); line != "" {
		return fmt.Sprintf("version %q", line)
	}
	return versionUnknown("it printed nothing")
}

func versionUnknown(why string) string {
	return "version unknown: " + clip(why)
}

// firstLine returns the first non-blank line of out, without control
// characters, at most maxVersionText bytes long.
func firstLine(out []byte) string {
	for line := range strings.Lines(strings.ToValidUTF8(string(out), "\uFFFD")) {
		line = strings.Map(func(r rune) rune {
			if r < ' ' || r == 0x7f {
				return -1
			}
			return r
		}, line)
		if line = strings.TrimSpace(line); line != "" {
			return clip(line)
		}
	}
	return ""
}

func clip(s string) string {
	if len(s) <= maxVersionText {
		return s
	}
	cut := maxVersionText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

func missing(path string, err error) string {
	if err != nil {
		return fmt.Sprintf("could not look for %s: %v", path, err)
	}
	return path + " is missing"
}

// guestPathExists tests for path in the guest through the agent. The path
// comes from pkg/runners, yet it is passed as an argument (Unix) or
// single-quoted (PowerShell), never spliced into a shell command.
func guestPathExists(ctx context.Context, agent *qga.Agent, machine string, osFamily runners.OS, path string) (bool, error) {
	req := qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", `test -e "$1"`, "sh", path}, Capture: true}
	if osFamily == runners.Windows {
		quoted := "'" + strings.ReplaceAll(path, "'", "''") + "'"
		req = qga.ExecRequest{Path: windowsPowerShell, Capture: true, Args: []string{"-NoProfile", "-NonInteractive", "-Command",
			"if (Test-Path -LiteralPath " + quoted + ") { exit 0 } else { exit 1 }"}}
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	_, err := agent.Run(rctx, machine, req)
	var exit *qga.ExitError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &exit) && exit.Status.Signal == 0 && exit.Status.ExitCode == 1:
		return false, nil
	}
	return false, err
}

// checkAgentVersion warns about a guest agent older than minAgentMajor.
func (d *doctor) checkAgentVersion(ctx context.Context, agent *qga.Agent, image, machine string) {
	info, err := agent.Info(ctx, machine)
	if err != nil {
		d.add(warn("boot.agent_version", image, "", "guest-info: %v", err))
		return
	}
	major, minor, valid := agentVersion(info.Version)
	hint := fmt.Sprintf("update qemu-guest-agent in the image to %d.0 or newer", minAgentMajor)
	switch {
	case !valid:
		d.add(warn("boot.agent_version", image, hint, "qemu-ga reports version %q, which is not MAJOR.MINOR", info.Version))
	case major < minAgentMajor:
		d.add(warn("boot.agent_version", image, hint, "qemu-ga %s is older than %d.0", info.Version, minAgentMajor))
	default:
		d.add(ok("boot.agent_version", image, "qemu-ga %s (%d.%d)", info.Version, major, minor))
	}
}

// agentVersion parses the major and minor of a version such as "7.2.22".
func agentVersion(v string) (major, minor int, valid bool) {
	parts := strings.SplitN(strings.TrimSpace(v), ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil || major < 0 || minor < 0 {
		return 0, 0, false
	}
	return major, minor, true
}

// checkNATS checks the server, the streams, the claims bucket and this
// host's consumers.
func (d *doctor) checkNATS(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, doctorCallTimeout)
	defer cancel()
	shown := redactURL(d.cfg.NATSURL)
	// The checks are the worker's view of NATS, as with its credentials.
	inbox := d.cfg.InboxPrefix
	if inbox == "" {
		inbox = bus.WorkerInbox(d.cfg.Host)
	}
	nc, js, err := connectNATS(d.cfg.NATSURL, d.cfg.NATS, natsClient{Name: "stretchy-libvirt-worker doctor", InboxPrefix: inbox})
	if err != nil {
		d.add(fail("nats", shown, "check the URL, the credentials and that nats-server runs with JetStream (-js) and is reachable "+
			"from this host; without --nats-url, worker run starts an embedded server instead", "%v", err))
		return
	}
	defer nc.Close()
	// A request the server refuses fails at once, explained.
	ctx, stop := nc.failFast(ctx)
	defer stop()
	if _, err = js.AccountInfo(ctx); err != nil {
		err = nc.explain(err)
		hint := "check the account's JetStream access"
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			hint = "enable JetStream: nats-server -js, or jetstream {} in its configuration (and for the account)"
		}
		d.add(fail("nats", shown, hint, "connected to %s, but JetStream: %v", nc.ConnectedUrlRedacted(), err))
		return
	}
	d.add(ok("nats", shown, "connected to %s (nats-server %s), JetStream enabled", nc.ConnectedUrlRedacted(), nc.ConnectedServerVersion()))

	var requests jetstream.Stream
	for _, name := range []string{messages.RequestsStream, messages.EventsStream} {
		s, err := js.Stream(ctx, name)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			d.add(warn("nats.stream", name, "start worker run with this --nats-url once; until then nothing serves requests",
				"missing; a worker creates it when it starts"))
			continue
		case err != nil:
			d.add(fail("nats.stream", name, "check the account's JetStream permissions", "%v", nc.explain(err)))
			continue
		}
		d.add(ok("nats.stream", name, "present, %d messages", s.CachedInfo().State.Msgs))
		if name == messages.RequestsStream {
			requests = s
		}
	}
	switch kv, err := js.KeyValue(ctx, messages.ClaimsBucket); {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		d.add(warn("nats.claims", messages.ClaimsBucket, "start worker run with this --nats-url once",
			"missing; a worker creates it when it starts"))
	case err != nil:
		d.add(fail("nats.claims", messages.ClaimsBucket, "check the account's JetStream permissions", "%v", nc.explain(err)))
	default:
		st, err := kv.Status(ctx)
		if err != nil {
			d.add(fail("nats.claims", messages.ClaimsBucket, "check the account's JetStream permissions", "%v", nc.explain(err)))
			break
		}
		d.add(ok("nats.claims", messages.ClaimsBucket, "present, TTL %s, %d claims", st.TTL(), st.Values()))
	}
	if requests == nil {
		return
	}
	for _, name := range []string{bus.SharedProvisionConsumer, bus.HostProvisionConsumer(d.cfg.Host), bus.HostTeardownConsumer(d.cfg.Host)} {
		c, err := requests.Consumer(ctx, name)
		switch {
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			d.add(warn("nats.consumer", name, "start worker run --host "+d.cfg.Host+" with this --nats-url, or give doctor the --host the worker uses",
				"missing; the worker of host %s creates it when it starts", d.cfg.Host))
		case err != nil:
			d.add(fail("nats.consumer", name, "check the account's JetStream permissions", "%v", nc.explain(err)))
		default:
			d.add(ok("nats.consumer", name, "present, %d requests pending", c.CachedInfo().NumPending))
		}
	}
}

// randomHex returns 8 random hex digits for the boot check's names.
func randomHex() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return hex.EncodeToString(b)
}

package messages

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"unicode"
)

// Identifier rules. A job id becomes part of a libvirt domain name
// (stretchy-<job_id>), of volume file names and of NATS subject tokens, so
// it is limited to characters that are safe in all three. Host ids are
// subject tokens too.
var (
	idPattern    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)
	imagePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$`)
)

// Limits on the runner section.
const (
	maxLabels      = 64
	maxLabelLen    = 256
	maxSecretLen   = 16 << 10
	maxFieldLen    = 1024
	maxURLLen      = 2048
	maxReasonLen   = 256
	ManagedPattern = `^stretchy-[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`
)

// ValidationError lists every problem found in a message. Its text names
// fields and rules but never repeats secret values.
type ValidationError struct {
	Problems []string
}

func (e *ValidationError) Error() string {
	return "invalid request: " + strings.Join(e.Problems, "; ")
}

type problems []string

func (p *problems) add(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

func (p problems) err() error {
	if len(p) == 0 {
		return nil
	}
	return &ValidationError{Problems: p}
}

// ErrUnsupportedVersion is returned for messages whose "v" is not
// SchemaVersion.
var ErrUnsupportedVersion = errors.New("unsupported schema version")

// ValidJobID reports whether id is an acceptable job id.
func ValidJobID(id string) bool { return idPattern.MatchString(id) }

// ValidHost reports whether h is an acceptable host id.
func ValidHost(h string) bool { return idPattern.MatchString(h) }

func checkVersion(v int) error {
	if v != SchemaVersion {
		return fmt.Errorf("%w: v=%d, this worker reads v=%d", ErrUnsupportedVersion, v, SchemaVersion)
	}
	return nil
}

func (p *problems) jobID(id string) {
	if !ValidJobID(id) {
		p.add("job_id: must be 1-64 characters of A-Z a-z 0-9 _ - starting with a letter or digit (got %s)", describe(id))
	}
}

// describe shows a possibly hostile value safely and briefly.
func describe(s string) string {
	if s == "" {
		return "empty"
	}
	const show = 40
	r := []rune(s)
	if len(r) > show {
		return fmt.Sprintf("%q... (%d bytes)", string(r[:show]), len(s))
	}
	return fmt.Sprintf("%q", s)
}

// Validate checks every field of p and returns a *ValidationError listing all
// problems, or ErrUnsupportedVersion.
func (p *Provision) Validate() error {
	if err := checkVersion(p.V); err != nil {
		return err
	}
	var ps problems
	ps.jobID(p.JobID)
	switch {
	case !imagePattern.MatchString(p.Image):
		ps.add("image: must be 1-128 characters of A-Z a-z 0-9 . _ + : - starting with a letter or digit (got %s)", describe(p.Image))
	case strings.HasPrefix(p.Image, ManagedPrefix):
		ps.add("image: %q starts with %q, which is reserved for machines the worker creates", p.Image, ManagedPrefix)
	}
	if p.BootTimeoutS < 0 || p.BootTimeoutS > int64(MaxBootTimeout.Seconds()) {
		ps.add("boot_timeout_s: must be between 0 (default %s) and %d, got %d", DefaultBootTimeout, int64(MaxBootTimeout.Seconds()), p.BootTimeoutS)
	}
	if p.MaxLifetimeS < 0 || p.MaxLifetimeS > int64(MaxMaxLifetime.Seconds()) {
		ps.add("max_lifetime_s: must be between 0 (default %s) and %d, got %d", DefaultMaxLifetime, int64(MaxMaxLifetime.Seconds()), p.MaxLifetimeS)
	}
	if p.RequestedAt.IsZero() {
		ps.add("requested_at: missing")
	}
	p.Runner.validate(&ps)
	return ps.err()
}

func (r *Runner) validate(ps *problems) {
	sections := 0
	for _, set := range []bool{r.Forgejo != nil, r.GitHub != nil, r.Jenkins != nil} {
		if set {
			sections++
		}
	}
	switch r.Kind {
	case RunnerNone:
		if sections != 0 {
			ps.add("runner: kind %q takes no settings section", r.Kind)
		}
	case RunnerForgejo:
		if r.Forgejo == nil {
			ps.add("runner.forgejo: missing for kind %q", r.Kind)
			return
		}
		f := r.Forgejo
		checkURL(ps, "runner.forgejo.url", f.URL)
		checkText(ps, "runner.forgejo.uuid", f.UUID, maxFieldLen, true)
		checkSecret(ps, "runner.forgejo.token", f.Token)
		checkText(ps, "runner.forgejo.handle", f.Handle, maxFieldLen, false)
		if len(f.Labels) == 0 || len(f.Labels) > maxLabels {
			ps.add("runner.forgejo.labels: must hold 1-%d labels, got %d", maxLabels, len(f.Labels))
		}
		for i, l := range f.Labels {
			field := fmt.Sprintf("runner.forgejo.labels[%d]", i)
			checkText(ps, field, l, maxLabelLen, true)
			if strings.TrimSpace(l) != l {
				ps.add("%s: has leading or trailing spaces, which Forgejo Runner refuses", field)
			}
		}
	case RunnerGitHub:
		if r.GitHub == nil {
			ps.add("runner.github: missing for kind %q", r.Kind)
			return
		}
		checkSecret(ps, "runner.github.jit_config", r.GitHub.JITConfig)
	case RunnerJenkins:
		if r.Jenkins == nil {
			ps.add("runner.jenkins: missing for kind %q", r.Kind)
			return
		}
		j := r.Jenkins
		checkURL(ps, "runner.jenkins.url", j.URL)
		checkText(ps, "runner.jenkins.agent_name", j.AgentName, maxFieldLen, true)
		checkSecret(ps, "runner.jenkins.secret", j.Secret)
		checkText(ps, "runner.jenkins.work_dir", j.WorkDir, maxFieldLen, false)
		// agent.jar reads any argument starting with @ as a file of arguments.
		if strings.HasPrefix(j.AgentName, "@") {
			ps.add("runner.jenkins.agent_name: must not start with @")
		}
		if strings.HasPrefix(j.WorkDir, "@") {
			ps.add("runner.jenkins.work_dir: must not start with @")
		}
	default:
		ps.add("runner.kind: must be one of none, forgejo, github, jenkins (got %s)", describe(string(r.Kind)))
	}
	if sections > 1 {
		ps.add("runner: only the section of kind %q may be set", r.Kind)
	}
}

func checkText(ps *problems, field, v string, max int, required bool) {
	switch {
	case v == "" && required:
		ps.add("%s: missing", field)
	case len(v) > max:
		ps.add("%s: longer than %d bytes", field, max)
	case strings.IndexFunc(v, unicode.IsControl) >= 0:
		ps.add("%s: contains control characters", field)
	}
}

// checkSecret never includes the value in a problem.
func checkSecret(ps *problems, field, v string) {
	switch {
	case v == "":
		ps.add("%s: missing", field)
	case len(v) > maxSecretLen:
		ps.add("%s: longer than %d bytes", field, maxSecretLen)
	case strings.IndexFunc(v, unicode.IsControl) >= 0:
		ps.add("%s: contains control characters", field)
	}
}

// checkURL accepts absolute http and https URLs without credentials. It does
// not repeat the URL, which may carry credentials by mistake.
func checkURL(ps *problems, field, v string) {
	if v == "" {
		ps.add("%s: missing", field)
		return
	}
	if len(v) > maxURLLen || strings.IndexFunc(v, func(r rune) bool { return unicode.IsControl(r) || unicode.IsSpace(r) }) >= 0 {
		ps.add("%s: must be a URL of at most %d bytes without spaces or control characters", field, maxURLLen)
		return
	}
	u, err := url.Parse(v)
	switch {
	case err != nil:
		ps.add("%s: not a URL", field)
	case u.Scheme != "http" && u.Scheme != "https":
		ps.add("%s: scheme must be http or https", field)
	case u.Host == "":
		ps.add("%s: has no host", field)
	case u.User != nil:
		ps.add("%s: must not carry credentials", field)
	}
}

// Validate checks every field of t.
func (t *Teardown) Validate() error {
	if err := checkVersion(t.V); err != nil {
		return err
	}
	var ps problems
	ps.jobID(t.JobID)
	checkText(&ps, "reason", t.Reason, maxReasonLen, false)
	return ps.err()
}

// Validate checks the fields a reader of events relies on.
func (e *Event) Validate() error {
	if err := checkVersion(e.V); err != nil {
		return err
	}
	var ps problems
	ps.jobID(e.JobID)
	if !ValidHost(e.Host) {
		ps.add("host: invalid (got %s)", describe(e.Host))
	}
	if !e.State.Valid() {
		ps.add("state: unknown (got %s)", describe(string(e.State)))
	}
	if e.Time.IsZero() {
		ps.add("time: missing")
	}
	if e.Seq == 0 {
		ps.add("seq: must start at 1")
	}
	return ps.err()
}

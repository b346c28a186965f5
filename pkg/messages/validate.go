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
	uuidPattern  = regexp.MustCompile(`^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$`)
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

// addIf adds problem unless it is "".
func (p *problems) addIf(problem string) {
	if problem != "" {
		*p = append(*p, problem)
	}
}

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
		p.add("job_id: must be 1-64 characters of A-Z a-z 0-9 _ - starting with a letter or digit (got %s)", Describe(id))
	}
}

// Describe shows a possibly hostile value safely and briefly, for a
// problem: quoted with Go escapes, its first 40 characters only. It is for
// identifiers and kinds, never for a secret or a URL.
func Describe(s string) string {
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

// ValidateEnvelope checks the fields of p outside its runner section: v,
// job_id, image, boot_timeout_s, max_lifetime_s, requested_at, vcpus,
// memory_mib, scratch_disk_gib and hold_on_failure_s (docs/protocol.md
// 3.1, 3.2). Only the wire's bounds apply; a host's bounds on sizes are
// its own. It returns an error wrapping
// ErrUnsupportedVersion, or a *ValidationError listing every problem
// with them.
//
// It does not look at p.Runner: what a runner section must hold is
// described, with the rest of each runner kind, by the table of kinds in
// pkg/runners, whose Validate checks a whole request, this envelope and
// then the runner section (its kind, which sections are set, each field
// of the kind's section by the rules CheckText, CheckURL, CheckUUID,
// CheckSecret and CheckLabels, and the kind's own checks). Readers of requests use
// runners.Validate; the name of this one says it is not enough.
func (p *Provision) ValidateEnvelope() error {
	if err := checkVersion(p.V); err != nil {
		return err
	}
	var ps problems
	ps.jobID(p.JobID)
	switch {
	case !imagePattern.MatchString(p.Image):
		ps.add("image: must be 1-128 characters of A-Z a-z 0-9 . _ + : - starting with a letter or digit (got %s)", Describe(p.Image))
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
	if p.VCPUs < 0 || p.VCPUs > MaxVCPUs {
		ps.add("vcpus: must be between 0 (the image's) and %d, got %d", MaxVCPUs, p.VCPUs)
	}
	if p.MemoryMiB != 0 && (p.MemoryMiB < MinMemoryMiB || p.MemoryMiB > MaxMemoryMiB) {
		ps.add("memory_mib: must be 0 (the image's) or between %d and %d, got %d", MinMemoryMiB, MaxMemoryMiB, p.MemoryMiB)
	}
	if p.ScratchDiskGiB < 0 || p.ScratchDiskGiB > MaxScratchDiskGiB {
		ps.add("scratch_disk_gib: must be between 0 (none) and %d, got %d", MaxScratchDiskGiB, p.ScratchDiskGiB)
	}
	if p.HoldOnFailureS < 0 || p.HoldOnFailureS > int64(MaxHoldOnFailure.Seconds()) {
		ps.add("hold_on_failure_s: must be between 0 (no hold) and %d, got %d", int64(MaxHoldOnFailure.Seconds()), p.HoldOnFailureS)
	}
	return ps.err()
}

// The rules of the fields of runner sections (docs/protocol.md 3.3);
// pkg/runners says which field follows which. Each returns the problem
// with the value v of field, "<field>: ...", or "" if there is none. An
// empty v is "<field>: missing": an optional field is checked only when it
// is set. No problem repeats v, which may be a secret or, for a URL, carry
// one by mistake.

// CheckText checks a text: at most 1024 bytes, no control characters.
func CheckText(field, v string) string { return checkText(field, v, maxFieldLen) }

// CheckSecret checks a secret: at most 16384 bytes, no control characters.
func CheckSecret(field, v string) string { return checkText(field, v, maxSecretLen) }

// CheckSealed checks a sealed secret's envelope (its box is opened by the
// worker that holds the key): a key id of 16 lowercase hex digits, and a
// box at least SealOverhead and at most MaxSealedBox bytes long.
func CheckSealed(field string, s SealedSecret) []string {
	var ps []string
	if len(s.KeyID) != 16 || strings.Trim(s.KeyID, "0123456789abcdef") != "" {
		ps = append(ps, fmt.Sprintf("%s.key_id: must be 16 lowercase hex digits (got %s)", field, Describe(s.KeyID)))
	}
	if len(s.Box) <= SealOverhead || len(s.Box) > MaxSealedBox {
		ps = append(ps, fmt.Sprintf("%s.box: must be more than %d and at most %d bytes (got %d)", field, SealOverhead, MaxSealedBox, len(s.Box)))
	}
	return ps
}

// CheckURL checks a URL: an absolute http or https URL with a host and
// without credentials, of at most 2048 bytes without spaces or control
// characters.
func CheckURL(field, v string) string {
	if v == "" {
		return field + ": missing"
	}
	if len(v) > maxURLLen || strings.IndexFunc(v, func(r rune) bool { return unicode.IsControl(r) || unicode.IsSpace(r) }) >= 0 {
		return fmt.Sprintf("%s: must be a URL of at most %d bytes without spaces or control characters", field, maxURLLen)
	}
	u, err := url.Parse(v)
	switch {
	case err != nil:
		return field + ": not a URL"
	case u.Scheme != "http" && u.Scheme != "https":
		return field + ": scheme must be http or https"
	case u.Host == "":
		return field + ": has no host"
	case u.User != nil:
		return field + ": must not carry credentials"
	}
	return ""
}

// CheckUUID checks a UUID in its usual text form, the one Forgejo gives
// runners: 32 hexadecimal digits of either case in groups of
// 8-4-4-4-12, separated by hyphens.
func CheckUUID(field, v string) string {
	switch {
	case v == "":
		return field + ": missing"
	case !uuidPattern.MatchString(v):
		return field + ": must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"
	}
	return ""
}

// CheckLabels checks a list of runner labels: 1 to 64 of them, each a
// text of at most 256 bytes. The problems of a label name it
// "<field>[i]"; each, unless nil, adds its own problem with a label after
// the label's rule.
func CheckLabels(field string, labels []string, each func(field, label string) string) []string {
	var ps problems
	if len(labels) == 0 || len(labels) > maxLabels {
		ps.add("%s: must hold 1-%d labels, got %d", field, maxLabels, len(labels))
	}
	for i, l := range labels {
		f := fmt.Sprintf("%s[%d]", field, i)
		ps.addIf(checkText(f, l, maxLabelLen))
		if each != nil {
			ps.addIf(each(f, l))
		}
	}
	return ps
}

// checkText checks a non-empty text of at most max bytes without control
// characters.
func checkText(field, v string, max int) string {
	switch {
	case v == "":
		return field + ": missing"
	case len(v) > max:
		return fmt.Sprintf("%s: longer than %d bytes", field, max)
	case strings.IndexFunc(v, unicode.IsControl) >= 0:
		return field + ": contains control characters"
	}
	return ""
}

// Validate checks every field of t.
func (t *Teardown) Validate() error {
	if err := checkVersion(t.V); err != nil {
		return err
	}
	var ps problems
	ps.jobID(t.JobID)
	if t.Reason != "" {
		ps.addIf(checkText("reason", t.Reason, maxReasonLen))
	}
	return ps.err()
}

// Validate checks the fields a reader of events relies on.
func (e *Event) Validate() error {
	if err := checkVersion(e.V); err != nil {
		return err
	}
	var ps problems
	switch {
	case e.JobID == "" && e.Machine != "":
		if !ValidWarmKey(e.Machine) {
			ps.add("machine: invalid (got %s)", Describe(e.Machine))
		}
	default:
		ps.jobID(e.JobID)
	}
	if !ValidHost(e.Host) {
		ps.add("host: invalid (got %s)", Describe(e.Host))
	}
	if !e.State.Valid() {
		ps.add("state: unknown (got %s)", Describe(string(e.State)))
	}
	if e.Time.IsZero() {
		ps.add("time: missing")
	}
	if e.Seq == 0 {
		ps.add("seq: must start at 1")
	}
	return ps.err()
}

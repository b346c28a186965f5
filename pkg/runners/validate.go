package runners

import (
	"errors"
	"fmt"
	"strings"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Validate checks the whole of provision request p: what
// messages.Provision.ValidateEnvelope checks (every field outside the
// runner section), then the runner section by the table of kinds: that
// its kind is known, that the kind's section and no other is set, each
// field of the section by its rule, and what the kind itself refuses,
// such as a Jenkins agent name starting with "@" (docs/protocol.md 3.3).
// It returns an error wrapping messages.ErrUnsupportedVersion, or a
// *messages.ValidationError listing every problem, those outside the
// runner section first; no problem repeats a secret. Every reader of
// provision requests validates them with it.
func Validate(p *messages.Provision) error {
	var problems []string
	var ve *messages.ValidationError
	switch err := p.ValidateEnvelope(); {
	case errors.As(err, &ve):
		problems = ve.Problems
	case err != nil:
		return err
	}
	problems = append(problems, runnerProblems(p.Runner)...)
	if len(problems) == 0 {
		return nil
	}
	return &messages.ValidationError{Problems: problems}
}

// runnerProblems checks the runner section r.
func runnerProblems(r messages.Runner) []string {
	var ps []string
	sections := 0
	for _, k := range kinds {
		if k.has != nil && k.has(r) {
			sections++
		}
	}
	k, known := lookup(r.Kind)
	switch {
	case !known:
		names := make([]string, len(kinds))
		for i, k := range kinds {
			names[i] = string(k.Kind)
		}
		ps = append(ps, fmt.Sprintf("runner.kind: must be one of %s (got %s)", strings.Join(names, ", "), messages.Describe(string(r.Kind))))
	case k.has == nil:
		if sections != 0 {
			ps = append(ps, fmt.Sprintf("runner: kind %q takes no settings section", r.Kind))
		}
	case !k.has(r):
		return []string{fmt.Sprintf("%s: missing for kind %q", k.Section, r.Kind)}
	default:
		for _, f := range k.Fields {
			ps = append(ps, f.problems(r)...)
		}
		if k.check != nil {
			ps = append(ps, k.check(r)...)
		}
	}
	if sections > 1 {
		ps = append(ps, fmt.Sprintf("runner: only the section of kind %q may be set", r.Kind))
	}
	if r.Sealed != nil {
		switch {
		case !known:
		case secretField(k) == nil:
			ps = append(ps, fmt.Sprintf("runner.sealed: kind %q has no secret to seal", r.Kind))
		default:
			ps = append(ps, messages.CheckSealed("runner.sealed", *r.Sealed)...)
		}
	}
	return ps
}

// secretField returns the secret field of kind k, nil for a kind without
// one.
func secretField(k Kind) *Field {
	for i := range k.Fields {
		if k.Fields[i].Secret {
			return &k.Fields[i]
		}
	}
	return nil
}

// Unseal puts the secret a worker opened from r.Sealed into the secret
// field of r's kind and drops r.Sealed, so that the runner is planned,
// and its output scrubbed, as for a request that carried the secret
// itself.
func Unseal(r *messages.Runner, secret string) error {
	k, ok := lookup(r.Kind)
	if !ok {
		return fmt.Errorf("runner kind %q: %w", r.Kind, ErrInvalid)
	}
	f := secretField(k)
	if f == nil {
		return fmt.Errorf("runner kind %q has no secret: %w", r.Kind, ErrInvalid)
	}
	f.Set(r, secret)
	r.Sealed = nil
	return nil
}

// Secrets returns the values of the secret fields of every section set in
// r, of its kind or not, in the order of the table: what must be scrubbed
// from the runner's output (runner_exited.output) and never be logged.
// The table says which fields are secrets, so a secret field added to it
// is scrubbed too.
func Secrets(r messages.Runner) []string {
	var s []string
	for _, k := range kinds {
		if k.has == nil || !k.has(r) {
			continue
		}
		for _, f := range k.Fields {
			if f.Secret {
				s = append(s, f.Value(r))
			}
		}
	}
	return s
}

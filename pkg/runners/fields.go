package runners

import (
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Rule is the rule a field's value follows, one of those docs/protocol.md
// 3.3 lists; pkg/messages holds the checks.
type Rule int

// The rules of runner section fields. The zero Rule is none: every field
// has one.
const (
	// RuleText is a text: at most 1024 bytes, no control characters
	// (messages.CheckText).
	RuleText Rule = iota + 1
	// RuleURL is an absolute http or https URL with a host and without
	// credentials (messages.CheckURL).
	RuleURL
	// RuleSecret is a secret: at most 16384 bytes, no control characters
	// (messages.CheckSecret). A field with this rule is a Secret.
	RuleSecret
	// RuleLabels is a list of 1 to 64 runner labels (messages.CheckLabels),
	// the rule of a list field.
	RuleLabels
	// RuleUUID is a UUID as 8-4-4-4-12 hexadecimal digits
	// (messages.CheckUUID).
	RuleUUID
)

// Field is one field of a runner kind's section in a provision request.
type Field struct {
	// Wire is the field's name in problems and in docs/protocol.md 3.3,
	// such as "runner.forgejo.token".
	Wire string
	// Rule is the rule its value follows.
	Rule Rule
	// Required says the field must be set; the rule of an optional field
	// applies only when it is.
	Required bool
	// Secret says the value is a secret: it reaches the guest only as the
	// standard input of a command marked SecretStdin, and Secrets returns
	// it, to be scrubbed from what the runner prints.
	Secret bool
	// Flag is the name of the worker submit flag that sets the field. A
	// secret's is "secret-file": the flag names the file it is read from.
	Flag string
	// Usage says what the field holds, for worker submit's help: "the
	// runner's UUID"; for a secret, which the help of --secret-file lists,
	// its name: "GitHub JIT config".
	Usage string

	// get and set read and write a string field, getList and setList a
	// list field; set and setList create the section when it is nil.
	get     func(r messages.Runner) string
	set     func(r *messages.Runner, v string)
	getList func(r messages.Runner) []string
	setList func(r *messages.Runner, v []string)
	// each, if set, is the kind's own check of each entry of a list
	// field, after the rule's: the problem with it, or "".
	each func(field, v string) string
}

// List reports whether f holds a list of strings (Values, SetValues)
// rather than a string (Value, Set).
func (f Field) List() bool { return f.getList != nil }

// Value returns the value of the string field f in r, "" when its
// section is not set.
func (f Field) Value(r messages.Runner) string {
	if f.get == nil {
		return ""
	}
	return f.get(r)
}

// Values returns the entries of the list field f in r, nil when its
// section is not set.
func (f Field) Values(r messages.Runner) []string {
	if f.getList == nil {
		return nil
	}
	return f.getList(r)
}

// Set sets the string field f of r to v, creating its section if r has
// none.
func (f Field) Set(r *messages.Runner, v string) {
	if f.set != nil {
		f.set(r, v)
	}
}

// SetValues sets the list field f of r to v, creating its section if r
// has none.
func (f Field) SetValues(r *messages.Runner, v []string) {
	if f.setList != nil {
		f.setList(r, v)
	}
}

// problems checks f in r, whose section is set.
func (f Field) problems(r messages.Runner) []string {
	if f.List() {
		v := f.Values(r)
		if len(v) == 0 && !f.Required {
			return nil
		}
		if f.Rule != RuleLabels {
			return []string{f.Wire + ": has no rule for a list"}
		}
		return messages.CheckLabels(f.Wire, v, f.each)
	}
	v := f.Value(r)
	if f.Secret && r.Sealed != nil {
		// The secret travels in runner.sealed, opened by the worker.
		if v != "" {
			return []string{f.Wire + ": must be empty when the secret is sealed (runner.sealed)"}
		}
		return nil
	}
	if v == "" && !f.Required {
		return nil
	}
	var p string
	switch f.Rule {
	case RuleText:
		p = messages.CheckText(f.Wire, v)
	case RuleURL:
		p = messages.CheckURL(f.Wire, v)
	case RuleUUID:
		p = messages.CheckUUID(f.Wire, v)
	case RuleSecret:
		p = messages.CheckSecret(f.Wire, v)
	default:
		// A field the table gives no rule for is refused rather than
		// passed unchecked.
		p = f.Wire + ": has no rule"
	}
	if p == "" {
		return nil
	}
	return []string{p}
}

// section is how the table reaches the section of type S in a runner
// section: &r.Forgejo and the like.
type section[S any] func(r *messages.Runner) **S

// present reports whether r holds the section.
func (s section[S]) present(r messages.Runner) bool { return *s(&r) != nil }

// make returns r's section, creating it if r has none.
func (s section[S]) make(r *messages.Runner) *S {
	p := s(r)
	if *p == nil {
		*p = new(S)
	}
	return *p
}

// text completes f as the string field at of the section.
func (s section[S]) text(f Field, at func(*S) *string) Field {
	f.get = func(r messages.Runner) string {
		if p := *s(&r); p != nil {
			return *at(p)
		}
		return ""
	}
	f.set = func(r *messages.Runner, v string) { *at(s.make(r)) = v }
	return f
}

// list completes f as the list field at of the section.
func (s section[S]) list(f Field, at func(*S) *[]string) Field {
	f.getList = func(r messages.Runner) []string {
		if p := *s(&r); p != nil {
			return *at(p)
		}
		return nil
	}
	f.setList = func(r *messages.Runner, v []string) { *at(s.make(r)) = v }
	return f
}

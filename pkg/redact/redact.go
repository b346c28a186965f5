package redact

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"slices"
	"strings"
)

// Mark replaces each occurrence of a secret.
const Mark = "[REDACTED]"

// minDerived is the length below which a form that is only a part of an
// encoding (a shifted or trimmed base64 run) is not looked for: so short
// a run would match ordinary text.
const minDerived = 8

// A Scrubber replaces the secrets it was made with, in each of their
// forms, by Mark. The zero Scrubber, and one made without a non-empty
// secret, changes nothing. It is safe for concurrent use.
type Scrubber struct {
	// forms are the strings looked for, each once, longest first, so
	// that where two begin at the same byte the longer one goes.
	forms    []string
	replacer *strings.Replacer
}

// New returns a Scrubber of secrets; empty ones are ignored. Each secret
// is looked for as it is and as these encodings of it render it:
//   - base64, standard and URL-safe alphabets, padded and raw, and the
//     run of characters that only the secret's bytes decide when it is
//     encoded inside longer data (at any of the three byte offsets, and
//     followed by more bytes, as `echo "$TOKEN" | base64` or an HTTP
//     Basic header "user:token" encode it), when at least 8 long;
//   - JSON string escaping, as encoding/json writes the string between
//     its quotes, with and without its HTML escapes (\u003c for <);
//   - percent-encoding, as url.QueryEscape and url.PathEscape write it.
func New(secrets ...string) *Scrubber {
	seen := map[string]bool{}
	var forms []string
	add := func(f string, derived bool) {
		if f == "" || seen[f] || (derived && len(f) < minDerived) {
			return
		}
		seen[f] = true
		forms = append(forms, f)
	}
	for _, s := range secrets {
		if s == "" {
			continue
		}
		add(s, false)
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
			add(enc.EncodeToString([]byte(s)), false)
		}
		for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
			for shift := range 3 {
				add(embedded(enc, s, shift), true)
			}
		}
		add(jsonEscape(s, true), false)
		add(jsonEscape(s, false), false)
		add(url.QueryEscape(s), false)
		add(url.PathEscape(s), false)
	}
	slices.SortStableFunc(forms, func(a, b string) int { return len(b) - len(a) })
	pairs := make([]string, 0, 2*len(forms))
	for _, f := range forms {
		pairs = append(pairs, f, Mark)
	}
	return &Scrubber{forms: forms, replacer: strings.NewReplacer(pairs...)}
}

// embedded returns the characters of the raw base64 encoding (enc) of
// data holding s at a byte offset of shift modulo 3 that depend on the
// bytes of s alone: those of the 3-byte groups it starts and ends inside
// of are left out where they take bits of the bytes around it.
func embedded(enc *base64.Encoding, s string, shift int) string {
	data := make([]byte, shift, shift+len(s))
	data = append(data, s...)
	e := enc.EncodeToString(data)
	// The first group's characters hold 6 bits each: with one byte
	// before s, its first two characters take bits of that byte; with
	// two, its first three.
	head := [3]int{0, 2, 3}[shift]
	tail := 0
	if len(data)%3 != 0 {
		tail = 1 // the last character's low bits are those of the next byte
	}
	if len(e)-tail <= head {
		return ""
	}
	return e[head : len(e)-tail]
}

// jsonEscape returns s as encoding/json writes it between the quotes of a
// string, with or without the escapes for HTML.
func jsonEscape(s string, html bool) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(html)
	_ = enc.Encode(s) // a string always encodes
	out := strings.TrimSuffix(b.String(), "\n")
	return out[1 : len(out)-1]
}

// Scrub returns text with every occurrence of each form of each secret
// replaced by Mark.
func (s *Scrubber) Scrub(text string) string {
	if s == nil || s.replacer == nil {
		return text
	}
	return s.replacer.Replace(text)
}

// ScrubCut is Scrub for text that was cut short after its last byte (a
// stream truncated at a limit): an end of text that is the beginning of
// a form of a secret, which Scrub cannot see whole, is replaced by Mark
// as well.
func (s *Scrubber) ScrubCut(text string) string {
	text = s.Scrub(text)
	if s == nil {
		return text
	}
	cut := len(text)
	for _, f := range s.forms {
		if n := overlap(text, f); n > 0 {
			cut = min(cut, len(text)-n)
		}
	}
	if cut < len(text) {
		text = text[:cut] + Mark
	}
	return text
}

// Contains reports whether text holds a form of a secret.
func (s *Scrubber) Contains(text string) bool {
	if s == nil {
		return false
	}
	for _, f := range s.forms {
		if strings.Contains(text, f) {
			return true
		}
	}
	return false
}

// Longest returns the length of the longest form looked for, 0 for none:
// text read from the middle of a log may begin with the last Longest()-1
// bytes of one, which its reader drops.
func (s *Scrubber) Longest() int {
	if s == nil || len(s.forms) == 0 {
		return 0
	}
	return len(s.forms[0])
}

// overlap returns the length of the longest end of s that is a proper
// beginning of form, in time linear in len(form): the KMP failure
// function of form, run over the end of s.
func overlap(s, form string) int {
	if len(form) < 2 {
		return 0
	}
	fail := make([]int, len(form))
	for i, k := 1, 0; i < len(form); i++ {
		for k > 0 && form[i] != form[k] {
			k = fail[k-1]
		}
		if form[i] == form[k] {
			k++
		}
		fail[i] = k
	}
	k := 0
	for i := max(0, len(s)-len(form)+1); i < len(s); i++ {
		for k > 0 && (k == len(form) || s[i] != form[k]) {
			k = fail[k-1]
		}
		if s[i] == form[k] {
			k++
		}
	}
	return min(k, len(form)-1)
}

package redact

import (
	"encoding/base64"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
)

// secret has characters that each encoding renders its own way, and a
// length that leaves base64 padding.
const secret = `tok+en/"s3cr3t"?&=<x> é!`

func jsonOf(s string) string {
	b, _ := json.Marshal(s)
	return string(b[1 : len(b)-1])
}

// TestScrubForms: each form of a secret, alone in a line, becomes Mark.
func TestScrubForms(t *testing.T) {
	tests := []struct{ name, form string }{
		{"as it is", secret},
		{"standard base64", base64.StdEncoding.EncodeToString([]byte(secret))},
		{"standard base64, raw", base64.RawStdEncoding.EncodeToString([]byte(secret))},
		{"URL-safe base64", base64.URLEncoding.EncodeToString([]byte(secret))},
		{"URL-safe base64, raw", base64.RawURLEncoding.EncodeToString([]byte(secret))},
		{"JSON-escaped", jsonOf(secret)},
		{"JSON-escaped without HTML escapes", strings.NewReplacer(`\u003c`, "<", `\u003e`, ">", `\u0026`, "&").Replace(jsonOf(secret))},
		{"query-escaped", url.QueryEscape(secret)},
		{"path-escaped", url.PathEscape(secret)},
	}
	s := New(secret, "")
	seen := map[string]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if seen[tt.form] {
				t.Fatalf("form %q is another case's: the secret does not tell the encodings apart", tt.form)
			}
			seen[tt.form] = true
			if got := s.Scrub("a " + tt.form + " b\n"); got != "a "+Mark+" b\n" {
				t.Errorf("Scrub = %q", got)
			}
			if !s.Contains("x" + tt.form + "y") {
				t.Errorf("Contains(%q) = false", tt.form)
			}
			if s.Longest() < len(tt.form) {
				t.Errorf("Longest = %d, shorter than %q", s.Longest(), tt.form)
			}
		})
	}
}

// TestScrubEmbeddedBase64: a secret base64-encoded inside longer data, at
// any byte offset and followed by more bytes, loses every character its
// bytes alone decide: what is left is the encoding of what surrounds it,
// and at most a character or two of each partial group at its edges.
func TestScrubEmbeddedBase64(t *testing.T) {
	s := New(secret)
	for _, prefix := range []string{"", "u:", "user:"} {
		for _, suffix := range []string{"", "\n", "\n\n"} {
			for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
				data := prefix + secret + suffix
				t.Run(strings.ReplaceAll(data, "\n", `\n`), func(t *testing.T) {
					encoded := enc.EncodeToString([]byte(data))
					got := s.Scrub(encoded)
					before, after, ok := strings.Cut(got, Mark)
					if !ok {
						t.Fatalf("Scrub(%q) = %q: nothing redacted", encoded, got)
					}
					if len(before) > 4*(len(prefix)/3)+3 || len(after) > 4*((len(suffix)+2)/3)+4 {
						t.Errorf("Scrub(%q) = %q: more left than the data around the secret", encoded, got)
					}
				})
			}
		}
	}
}

// TestScrubLongestFirst: where a form holds another one, the longer goes
// whole, so no encoded part of it is left beside the mark.
func TestScrubLongestFirst(t *testing.T) {
	s := New("ab", "xabx")
	if got := s.Scrub("1 xabx 2 ab"); got != "1 "+Mark+" 2 "+Mark {
		t.Errorf("Scrub = %q", got)
	}
}

func TestScrubNothing(t *testing.T) {
	for _, s := range []*Scrubber{nil, New(), New("")} {
		if got := s.Scrub("text"); got != "text" || s.ScrubCut("text") != "text" || s.Contains("text") || s.Longest() != 0 {
			t.Errorf("an empty scrubber changed or found something: %q", got)
		}
	}
	// Short secrets are looked for as they are and in their exact
	// encodings, not by the parts of an encoding that would match text
	// by chance.
	if got := New("pw").Scrub("cHc= pw bAB"); got != Mark+" "+Mark+" bAB" {
		t.Errorf("Scrub = %q", got)
	}
}

// TestScrubCut: text cut after the first bytes of a form of a secret has
// them replaced too; whole text that merely ends like a secret does not.
func TestScrubCut(t *testing.T) {
	const tok = "SECRET-0123456789abcdef"
	b64 := base64.StdEncoding.EncodeToString([]byte(tok))
	tests := []struct{ name, text, want string }{
		{"cut inside the secret", "log " + tok[:9], "log " + Mark},
		{"cut inside its base64", "log " + b64[:12], "log " + Mark},
		{"cut inside its percent-encoding", "GET /?t=" + url.QueryEscape("a b" + tok)[:5], "GET /?t=" + Mark},
		{"no secret at the end", "log SEC ret", "log SEC ret"},
		{"whole secret and a cut one", tok + " " + tok[:3], Mark + " " + Mark},
	}
	s := New(tok, "a b"+tok)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.ScrubCut(tt.text); got != tt.want {
				t.Errorf("ScrubCut(%q) = %q, want %q", tt.text, got, tt.want)
			}
		})
	}
	if got := s.Scrub("say " + tok[:9]); got != "say "+tok[:9] {
		t.Errorf("Scrub of uncut text = %q, want it kept", got)
	}
}

// TestOverlap checks overlap against the obvious quadratic search.
func TestOverlap(t *testing.T) {
	brute := func(s, secret string) int {
		for n := min(len(secret)-1, len(s)); n > 0; n-- {
			if strings.HasSuffix(s, secret[:n]) {
				return n
			}
		}
		return 0
	}
	alphabet := "ab"
	for i := range 20000 {
		r := uint64(i)*0x9e3779b97f4a7c15 + 1
		next := func(n int) int { r ^= r << 13; r ^= r >> 7; r ^= r << 17; return int(r % uint64(n)) }
		mk := func(n int) string {
			b := make([]byte, n)
			for k := range b {
				b[k] = alphabet[next(len(alphabet))]
			}
			return string(b)
		}
		s, secret := mk(next(12)), mk(next(8)+1)
		if got, want := overlap(s, secret), brute(s, secret); got != want {
			t.Fatalf("overlap(%q, %q) = %d, want %d", s, secret, got, want)
		}
	}
}

package runners

import (
	"slices"
	"strings"
	"testing"
)

// splitWindowsArgs splits a command line (without the program name) the way
// the Microsoft C runtime (2008 and later) does; it is written from the
// documented rules, independently of windowsArg.
func splitWindowsArgs(line string) []string {
	var (
		args    []string
		cur     strings.Builder
		inQuote bool
		inArg   bool
	)
	for i := 0; i < len(line); {
		c := line[i]
		switch {
		case c == '\\':
			n := 0
			for i < len(line) && line[i] == '\\' {
				n++
				i++
			}
			if i < len(line) && line[i] == '"' {
				cur.WriteString(strings.Repeat(`\`, n/2))
				if n%2 == 1 {
					cur.WriteByte('"')
					i++
				}
			} else {
				cur.WriteString(strings.Repeat(`\`, n))
			}
			inArg = true
		case c == '"':
			if inQuote && i+1 < len(line) && line[i+1] == '"' {
				cur.WriteByte('"')
				i += 2
			} else {
				inQuote = !inQuote
				i++
			}
			inArg = true
		case (c == ' ' || c == '\t') && !inQuote:
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
			i++
		default:
			cur.WriteByte(c)
			inArg = true
			i++
		}
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args
}

func TestWindowsArgsRoundTrip(t *testing.T) {
	extra := []string{`C:\Program Files\`, `a\\"b`, `\\server\share\`, `"`, `\"`, `--label=say "hi" $(id):host`}
	args := append(slices.Clone(awkward), extra...)
	if got := splitWindowsArgs(windowsArgs(args)); !slices.Equal(got, args) {
		t.Fatalf("round trip of %s:\n got %q\nwant %q", windowsArgs(args), got, args)
	}
}

// parsePSSingleQuoted reads a PowerShell single-quoted string the way
// PowerShell's tokenizer does, typographic quotes included, and reports the
// rest of the input after the closing quote.
func parsePSSingleQuoted(s string) (value, rest string, ok bool) {
	isQuote := func(r rune) bool { return strings.ContainsRune("'\u2018\u2019\u201a\u201b", r) }
	rs := []rune(s)
	if len(rs) == 0 || !isQuote(rs[0]) {
		return "", "", false
	}
	var b strings.Builder
	for i := 1; i < len(rs); i++ {
		if isQuote(rs[i]) {
			if i+1 < len(rs) && isQuote(rs[i+1]) {
				b.WriteRune(rs[i+1])
				i++
				continue
			}
			return b.String(), string(rs[i+1:]), true
		}
		b.WriteRune(rs[i])
	}
	return "", "", false
}

func TestPSQuote(t *testing.T) {
	values := append(slices.Clone(awkward), "it\u2019s", "\u2018x\u2019", "\u201a\u201b", "$env:PATH", "@(1)", "a`b")
	for _, v := range values {
		q := psQuote(v)
		got, rest, ok := parsePSSingleQuoted(q)
		if !ok || rest != "" || got != v {
			t.Errorf("psQuote(%q) = %s, reads back as %q (rest %q, ok %v)", v, q, got, rest, ok)
		}
	}
}

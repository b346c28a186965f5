package runners

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The bad-input corpus of pkg/messages: its TestBadCorpus generates the
// files and checks them at the decoder level; this test checks what the
// whole validation makes of every provision in it, runner sections
// included.
const (
	corpusDir = "../messages/testdata/bad"
	// corpusSecret is what pkg/messages plants in the corpus's secret
	// fields.
	corpusSecret = "CORPUS-SECRET-4f1d2c"
)

// corpusEntry is the part of a manifest line this test reads (pkg/messages
// CorpusEntry).
type corpusEntry struct {
	File    string             `json:"file"`
	Subject string             `json:"subject"`
	Code    messages.ErrorCode `json:"code"`
}

// validateCorpus is what the worker does with a provision payload before
// it touches the host (internal/worker provision): its error code ("" for
// a valid request) and the problem text of a failed validation.
func validateCorpus(data []byte) (messages.ErrorCode, string) {
	p, err := messages.DecodeProvision(data)
	if err != nil {
		// The decoder's text is the msgpack library's, not pinned here.
		return messages.CodeBadMessage, ""
	}
	switch err := Validate(&p); {
	case err == nil:
		return "", ""
	case errors.Is(err, messages.ErrUnsupportedVersion):
		return messages.CodeUnsupportedVersion, err.Error()
	default:
		return messages.CodeInvalidRequest, err.Error()
	}
}

// TestValidateBadCorpus checks every provision of the bad-input corpus
// against its manifest entry and pins the problems validation reports for
// it in testdata/corpus_problems.golden, which become the message of the
// failed event (run with -update after an intended change).
func TestValidateBadCorpus(t *testing.T) {
	js, err := os.ReadFile(filepath.Join(corpusDir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var man struct{ Entries []corpusEntry }
	if err := json.Unmarshal(js, &man); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	checked := 0
	for _, e := range man.Entries {
		if e.Subject != "provision" {
			continue // teardowns have no runner section; pkg/messages checks them
		}
		checked++
		data, err := os.ReadFile(filepath.Join(corpusDir, e.File))
		if err != nil {
			t.Fatal(err)
		}
		code, text := validateCorpus(data)
		want := e.Code
		if want == messages.CodeImageNotFound || want == messages.CodeImageInvalid {
			want = "" // valid: only the host can refuse it
		}
		if code != want {
			t.Errorf("%s: classified %q (%s), manifest says %q", e.File, code, text, e.Code)
		}
		if strings.Contains(text, corpusSecret) {
			t.Errorf("%s: the error repeats a secret: %s", e.File, text)
		}
		switch {
		case code == "":
			text = "valid"
		case text == "":
			text = string(code)
		}
		fmt.Fprintf(&b, "%s: %s\n", strings.TrimSuffix(e.File, ".msgpack"), text)
	}
	if checked < 100 {
		t.Fatalf("only %d provisions in the corpus", checked)
	}
	golden := filepath.Join("testdata", "corpus_problems.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got := b.String(); got != string(want) {
		t.Errorf("problems differ from %s (run with -update to accept):\n%s", golden, diffLines(string(want), got))
	}
}

// diffLines lists the lines of got that differ from want, by position.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := range max(len(w), len(g)) {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "-%s\n+%s\n", wl, gl)
		}
	}
	return b.String()
}

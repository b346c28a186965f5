package runners

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

var update = flag.Bool("update", false, "rewrite the golden plan files under testdata/")

const testJob = "job-42_x"

// testLifetime is the machine's lifetime the plans are made for, the
// default max_lifetime_s.
const testLifetime = 6 * time.Hour

// Awkward but valid values: spaces, both quotes, $, backticks, &,
// non-ASCII text. A Forgejo URL has no query (Validate).
func forgejoRunner() messages.Runner {
	return messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL:    "https://code.example.org/forgejo/a&b=$x'y/",
		UUID:   "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
		Token:  "fj-token-0123456789abcdef",
		Labels: []string{"ubuntu latest", "it's", "日本語", `say "hi" $(id) ` + "`x`", "docker:docker://node:22"},
		Handle: "h-77",
	}}
}

func githubRunner() messages.Runner {
	return messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{
		JITConfig: "eyJnaXRodWIiOiJqaXQtY29uZmlnIn0=",
	}}
}

func jenkinsRunner() messages.Runner {
	return messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{
		URL:       "https://jenkins.example.org/ci/?a=1&b=$x",
		AgentName: `agent one's "$HOME"`,
		Secret:    "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
	}}
}

var runnerCases = []struct {
	name   string
	runner func() messages.Runner
}{
	{"forgejo", forgejoRunner},
	{"github", githubRunner},
	{"jenkins", jenkinsRunner},
}

var allOS = []OS{Linux, FreeBSD, Darwin, Windows}

// TestForGolden pins every plan, 3 runners x 4 OS families, as text. Run
// `go test ./pkg/runners -update` after an intended change and review the
// diff.
func TestForGolden(t *testing.T) {
	for _, rc := range runnerCases {
		for _, goos := range allOS {
			name := rc.name + "_" + string(goos)
			t.Run(rc.name+"/"+string(goos), func(t *testing.T) {
				p, err := For(testJob, goos, rc.runner(), testLifetime)
				var got string
				if err != nil {
					got = "error: " + err.Error() + "\n"
				} else {
					got = render(p)
				}
				golden := filepath.Join("testdata", name+".golden")
				if *update {
					if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
						t.Fatal(err)
					}
				}
				want, err := os.ReadFile(golden)
				if err != nil {
					t.Fatalf("%v (run with -update to create it)", err)
				}
				if got != string(want) {
					t.Errorf("plan differs from %s (run with -update to accept):\n%s", golden, got)
				}
			})
		}
	}
}

// TestVersionPlanGolden pins every version plan, 3 runners x 4 OS
// families, like TestForGolden.
func TestVersionPlanGolden(t *testing.T) {
	kinds := []messages.RunnerKind{messages.RunnerForgejo, messages.RunnerGitHub, messages.RunnerJenkins}
	for _, kind := range kinds {
		for _, goos := range allOS {
			name := "version_" + string(kind) + "_" + string(goos)
			t.Run(string(kind)+"/"+string(goos), func(t *testing.T) {
				p, err := VersionPlan(testJob, goos, kind)
				var got string
				if err != nil {
					got = "error: " + err.Error() + "\n"
				} else {
					got = render(p)
				}
				golden := filepath.Join("testdata", name+".golden")
				if *update {
					if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
						t.Fatal(err)
					}
				}
				want, err := os.ReadFile(golden)
				if err != nil {
					t.Fatalf("%v (run with -update to create it)", err)
				}
				if got != string(want) {
					t.Errorf("plan differs from %s (run with -update to accept):\n%s", golden, got)
				}
			})
		}
	}
}

func TestVersionPlanRefuses(t *testing.T) {
	tests := []struct {
		name string
		job  string
		os   OS
		kind messages.RunnerKind
		want error
	}{
		{"github on FreeBSD", testJob, FreeBSD, messages.RunnerGitHub, ErrUnsupported},
		{"kind none", testJob, Linux, messages.RunnerNone, ErrInvalid},
		{"unknown kind", testJob, Linux, "gitlab", ErrInvalid},
		{"bad job id", "../x", Linux, messages.RunnerForgejo, ErrInvalid},
		{"unknown OS", testJob, "plan9", messages.RunnerForgejo, ErrUnknownOS},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := VersionPlan(tt.job, tt.os, tt.kind); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestForGitHubOnFreeBSDIsUnsupported(t *testing.T) {
	_, err := For(testJob, FreeBSD, githubRunner(), testLifetime)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "GitHub Actions Runner does not support FreeBSD") {
		t.Fatalf("err = %v, want ErrUnsupported saying GitHub Actions Runner does not support FreeBSD", err)
	}
}

func TestForNoneStartsNothing(t *testing.T) {
	for _, goos := range allOS {
		p, err := For(testJob, goos, messages.Runner{Kind: messages.RunnerNone}, testLifetime)
		if err != nil || !p.Empty() || len(p.Prepare) != 0 {
			t.Errorf("%s: For(none) = %+v, %v; want an empty plan", goos, p, err)
		}
	}
	if p, _ := For(testJob, Linux, forgejoRunner(), testLifetime); p.Empty() {
		t.Error("a forgejo plan reports Empty")
	}
}

func TestForRefusesInvalid(t *testing.T) {
	atName := jenkinsRunner()
	atName.Jenkins.AgentName = "@etc/passwd"
	atWorkDir := jenkinsRunner()
	atWorkDir.Jenkins.WorkDir = "@work"
	nul := forgejoRunner()
	nul.Forgejo.Labels = []string{"a\x00b"}
	tests := []struct {
		name   string
		job    string
		os     OS
		runner messages.Runner
		want   error
	}{
		{"bad job id", "../etc", Linux, forgejoRunner(), ErrInvalid},
		{"empty job id", "", Linux, forgejoRunner(), ErrInvalid},
		{"unknown OS", testJob, OS("plan9"), forgejoRunner(), ErrUnknownOS},
		{"unknown kind", testJob, Linux, messages.Runner{Kind: "gitlab"}, ErrInvalid},
		{"missing forgejo section", testJob, Linux, messages.Runner{Kind: messages.RunnerForgejo}, ErrInvalid},
		{"missing github section", testJob, Linux, messages.Runner{Kind: messages.RunnerGitHub}, ErrInvalid},
		{"missing jenkins section", testJob, Windows, messages.Runner{Kind: messages.RunnerJenkins}, ErrInvalid},
		{"jenkins name read as @file", testJob, Linux, atName, ErrInvalid},
		{"jenkins work dir read as @file", testJob, Darwin, atWorkDir, ErrInvalid},
		{"NUL byte", testJob, Linux, nul, ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := For(tt.job, tt.os, tt.runner, testLifetime); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

// TestForRefusesLifetime: a machine's lifetime is positive; the runner's
// job timeout is made of it.
func TestForRefusesLifetime(t *testing.T) {
	for _, rc := range runnerCases {
		for _, lifetime := range []time.Duration{0, -time.Second} {
			t.Run(fmt.Sprintf("%s/%s", rc.name, lifetime), func(t *testing.T) {
				if _, err := For(testJob, Linux, rc.runner(), lifetime); !errors.Is(err, ErrInvalid) {
					t.Fatalf("err = %v, want %v", err, ErrInvalid)
				}
			})
		}
	}
}

// TestForgejoConfig pins the configuration file forgejo-runner gets: its
// job timeout is the machine's lifetime in whole seconds, rounded up, as
// a duration string (the runner's YAML library refuses a bare number for
// a duration), and it holds nothing else.
func TestForgejoConfig(t *testing.T) {
	tests := []struct {
		lifetime time.Duration
		timeout  string
	}{
		{6 * time.Hour, "21600s"},
		{time.Second, "1s"},
		{1500 * time.Millisecond, "2s"},
		{7 * 24 * time.Hour, "604800s"},
	}
	for _, tt := range tests {
		t.Run(tt.lifetime.String(), func(t *testing.T) {
			for _, goos := range allOS {
				p, err := For(testJob, goos, forgejoRunner(), tt.lifetime)
				if err != nil {
					t.Fatal(err)
				}
				l := layoutFor(goos, testJob)
				file := l.join(l.jobDir, "forgejo-runner.yaml")
				want := "# Forgejo Runner configuration for one CI job. Written by the stretchy libvirt worker.\n" +
					"runner:\n" +
					"  timeout: " + tt.timeout + "\n"
				got, ok := plannedFile(p, file)
				if !ok || got != want {
					t.Errorf("%s: %s holds %q (written: %v), want %q", goos, file, got, ok, want)
				}
				if script := launchScript(p); !strings.Contains(script, "--config="+file) {
					t.Errorf("%s: the launch script does not pass --config=%s:\n%s", goos, file, script)
				}
			}
		})
	}
}

// plannedFile returns what the Prepare commands of p write to file, and
// whether they write it: the POSIX prepare command takes each file's
// content as the argument after its path, each Windows one writes its
// standard input to the file its command text names.
func plannedFile(p Plan, file string) (string, bool) {
	for _, c := range p.Prepare {
		if c.Path == "/bin/sh" {
			for i := prepBase; i+1 < len(c.Args); i++ {
				if c.Args[i] == file {
					return c.Args[i+1], true
				}
			}
			continue
		}
		if strings.Contains(c.Args[len(c.Args)-1], "$f = "+psQuote(file)+";") {
			return string(c.Stdin), true
		}
	}
	return "", false
}

// TestSecretsTravelOnlyAsSecretStdin plants a unique secret in every
// secret field and checks that it reaches the guest only as the standard
// input of commands marked SecretStdin.
func TestSecretsTravelOnlyAsSecretStdin(t *testing.T) {
	const secret = "PLANTED-SECRET-9f8e7d6c"
	runners := map[string]messages.Runner{
		"forgejo": {Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://f.example/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: secret, Labels: []string{"l"},
		}},
		"github":  {Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: secret}},
		"jenkins": {Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{URL: "https://j.example/", AgentName: "a", Secret: secret}},
	}
	for kind, r := range runners {
		for _, goos := range allOS {
			t.Run(kind+"/"+string(goos), func(t *testing.T) {
				p, err := For(testJob, goos, r, testLifetime)
				if errors.Is(err, ErrUnsupported) {
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if strings.Contains(p.Program, secret) || strings.Contains(p.Home, secret) {
					t.Error("secret in Program or Home")
				}
				carried := 0
				for i, c := range append(append([]Command(nil), p.Prepare...), p.Launch) {
					fields := append([]string{c.Path, c.Purpose}, c.Args...)
					fields = append(fields, c.Env...)
					for _, f := range fields {
						if strings.Contains(f, secret) {
							t.Errorf("command %d (%s): secret in path, purpose, args or env", i, c.Purpose)
						}
					}
					switch {
					case c.SecretStdin && string(c.Stdin) == secret:
						carried++
					case c.SecretStdin:
						t.Errorf("command %d (%s): SecretStdin set, but stdin is not the secret", i, c.Purpose)
					case bytes.Contains(c.Stdin, []byte(secret)):
						t.Errorf("command %d (%s): secret in a stdin not marked secret (launch script?)", i, c.Purpose)
					}
				}
				if carried != 1 {
					t.Errorf("secret is carried by %d commands, want exactly 1", carried)
				}
			})
		}
	}
}

// TestWindowsCommandsHoldNoDoubleQuote: a double quote in a guest-exec
// argument would have to survive Windows command-line quoting twice.
func TestWindowsCommandsHoldNoDoubleQuote(t *testing.T) {
	for _, rc := range runnerCases {
		p, err := For(testJob, Windows, rc.runner(), testLifetime)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range append(append([]Command(nil), p.Prepare...), p.Launch) {
			for _, a := range c.Args {
				if strings.Contains(a, `"`) {
					t.Errorf("%s: %q: argument holds a double quote: %s", rc.name, c.Purpose, a)
				}
			}
			if c.Env != nil {
				t.Errorf("%s: %q: Windows commands must keep the service's environment", rc.name, c.Purpose)
			}
		}
	}
}

// render is a stable, reviewable text form of a plan. Secret stdin is shown
// as its length only.
func render(p Plan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "program: %s\nhome: %s\n", p.Program, p.Home)
	for i, c := range p.Prepare {
		renderCommand(&b, fmt.Sprintf("prepare[%d]", i), c)
	}
	renderCommand(&b, "launch", p.Launch)
	return b.String()
}

func renderCommand(b *strings.Builder, title string, c Command) {
	fmt.Fprintf(b, "\n%s: %s\n", title, c.Purpose)
	renderValue(b, "path", c.Path)
	for i, a := range c.Args {
		renderValue(b, fmt.Sprintf("arg[%d]", i), a)
	}
	for _, e := range c.Env {
		renderValue(b, "env", e)
	}
	switch {
	case c.SecretStdin:
		fmt.Fprintf(b, "  stdin: <secret %d bytes>\n", len(c.Stdin))
	case len(c.Stdin) > 0:
		s := string(c.Stdin)
		var notes []string
		if t, ok := strings.CutPrefix(s, "\ufeff"); ok {
			s, notes = t, append(notes, "UTF-8 BOM")
		}
		if strings.Contains(s, "\r\n") {
			s, notes = strings.ReplaceAll(s, "\r\n", "\n"), append(notes, "CRLF")
		}
		label := "stdin"
		if len(notes) > 0 {
			label += " (" + strings.Join(notes, ", ") + ")"
		}
		renderValue(b, label, s)
	}
}

// renderValue prints one-line values as they are and multi-line values as
// an indented block.
func renderValue(b *strings.Builder, key, v string) {
	if !strings.Contains(v, "\n") {
		fmt.Fprintf(b, "  %s: %s\n", key, v)
		return
	}
	fmt.Fprintf(b, "  %s: |\n", key)
	for _, line := range strings.SplitAfter(strings.TrimSuffix(v, "\n"), "\n") {
		fmt.Fprintf(b, "    %s", line)
	}
	b.WriteString("\n")
}

package main

import (
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// TestSubmitRunnerFlags pins the runner flags of worker submit provision
// and their help texts.
func TestSubmitRunnerFlags(t *testing.T) {
	fs := flag.NewFlagSet("submit", flag.ContinueOnError)
	var f runnerFlags
	f.register(fs)
	got := map[string]string{}
	fs.VisitAll(func(fl *flag.Flag) { got[fl.Name] = fl.Usage + " [" + fl.DefValue + "]" })
	want := map[string]string{
		"runner":      `runner kind: none, forgejo, github or jenkins [none]`,
		"url":         `forgejo, jenkins: the instance's URL []`,
		"uuid":        `forgejo: the runner's UUID []`,
		"handle":      `forgejo: the job handle (optional) []`,
		"label":       `forgejo: a runner label (repeat the flag for more) []`,
		"agent-name":  `jenkins: the agent's name []`,
		"work-dir":    `jenkins: the agent's work directory (optional) []`,
		"secret-file": `file holding the runner's secret (forgejo token, GitHub JIT config, Jenkins secret); secrets are never taken as arguments []`,
	}
	for name := range maps.Collect(func(yield func(string, bool) bool) {
		for name := range got {
			yield(name, true)
		}
		for name := range want {
			yield(name, true)
		}
	}) {
		if got[name] != want[name] {
			t.Errorf("--%s:\n got %q\nwant %q", name, got[name], want[name])
		}
	}
	if !strings.Contains(submitUsage, "[--runner none|forgejo|github|jenkins [runner flags] --secret-file F]") {
		t.Errorf("the usage does not list the runner kinds:\n%s", submitUsage)
	}
}

// TestSubmitSharedFlags: fields of different kinds that share a flag
// agree in what the flag's help says of them (secrets aside).
func TestSubmitSharedFlags(t *testing.T) {
	seen := map[string]runners.Field{}
	for _, k := range runners.Kinds() {
		for _, f := range k.Fields {
			if f.Secret {
				continue // --secret-file lists each by name
			}
			other, ok := seen[f.Flag]
			if ok && (f.Usage != other.Usage || f.Required != other.Required || f.List() != other.List()) {
				t.Errorf("--%s sets %s and %s, which differ in usage, requirement or being a list", f.Flag, other.Wire, f.Wire)
			}
			seen[f.Flag] = f
		}
	}
}

// TestSubmitRunnerSection pins the runner section worker submit builds
// from its flags.
func TestSubmitRunnerSection(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	if err := os.WriteFile(secretFile, []byte("  the-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	secret := "--secret-file=" + secretFile
	tests := []struct {
		name    string
		args    []string
		want    messages.Runner
		wantErr string
	}{
		{name: "default", want: messages.Runner{Kind: messages.RunnerNone}},
		{name: "none ignores runner flags", args: []string{"--runner", "none", "--url", "https://x/", secret},
			want: messages.Runner{Kind: messages.RunnerNone}},
		{name: "forgejo", args: []string{"--runner", "forgejo", "--url", "https://code.example.org/", "--uuid", "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
			"--label", "debian-12", "--label", "x86 64", "--handle", "h-1", "--agent-name", "ignored", secret},
			want: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
				URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "the-secret", Labels: []string{"debian-12", "x86 64"}, Handle: "h-1"}}},
		{name: "forgejo without labels", args: []string{"--runner", "forgejo", secret},
			want: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{Token: "the-secret"}}},
		{name: "github", args: []string{"--runner", "github", "--url", "https://ignored/", secret},
			want: messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: "the-secret"}}},
		{name: "jenkins", args: []string{"--runner", "jenkins", "--url", "https://jenkins.example.org/", "--agent-name", "a-1",
			"--work-dir", "/w", "--label", "ignored", secret},
			want: messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{
				URL: "https://jenkins.example.org/", AgentName: "a-1", Secret: "the-secret", WorkDir: "/w"}}},
		{name: "no secret file", args: []string{"--runner", "forgejo"}, wantErr: "--runner forgejo needs --secret-file"},
		{name: "unreadable secret file", args: []string{"--runner", "github", "--secret-file", filepath.Join(dir, "none")},
			wantErr: "read the runner secret: "},
		{name: "unknown kind without secret file", args: []string{"--runner", "gitlab"}, wantErr: "--runner gitlab needs --secret-file"},
		{name: "unknown kind", args: []string{"--runner", "gitlab", secret}, wantErr: `--runner "gitlab": must be none, forgejo, github or jenkins`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := flag.NewFlagSet("submit", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			var f runnerFlags
			f.register(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			got, err := f.section()
			switch {
			case tt.wantErr != "":
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("section = %+v, %v; want an error starting %q", got, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "the-secret") {
					t.Errorf("the error repeats the secret: %v", err)
				}
			case err != nil:
				t.Fatal(err)
			case !reflect.DeepEqual(got, tt.want):
				t.Fatalf("section = %s\nwant %s", show(got), show(tt.want))
			}
		})
	}
}

// show prints a runner section with its settings, not their addresses.
func show(r messages.Runner) string {
	return fmt.Sprintf("kind %s, forgejo %+v, github %+v, jenkins %+v", r.Kind, deref(r.Forgejo), deref(r.GitHub), deref(r.Jenkins))
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

package runners

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

var requestedAt = time.Date(2026, 11, 27, 5, 0, 0, 0, time.UTC)

// provisionOf is a valid provision but for what r makes of it.
func provisionOf(r messages.Runner) messages.Provision {
	return messages.Provision{V: messages.SchemaVersion, JobID: "job-1", Image: "debian-12", Runner: r, RequestedAt: requestedAt}
}

// TestValidateProblems pins the exact problems, and their order, of
// requests with several problems at once: the failed event lists them so.
func TestValidateProblems(t *testing.T) {
	forgejo := func(mutate func(*messages.ForgejoRunner)) messages.Runner {
		r := forgejoRunner()
		mutate(r.Forgejo)
		return r
	}
	jenkins := func(mutate func(*messages.JenkinsAgent)) messages.Runner {
		r := jenkinsRunner()
		mutate(r.Jenkins)
		return r
	}
	tests := []struct {
		name   string
		runner messages.Runner
		want   []string // nil means valid
	}{
		{"forgejo valid", forgejoRunner(), nil},
		{"forgejo without handle", forgejo(func(f *messages.ForgejoRunner) { f.Handle = "" }), nil},
		{"forgejo all wrong", forgejo(func(f *messages.ForgejoRunner) {
			f.URL, f.UUID, f.Token, f.Handle = "https://u:p@x/", "", "t\n", "h\x1b"
			f.Labels = []string{" a\t", "\tb", "ok", ""}
		}), []string{
			"runner.forgejo.url: must not carry credentials",
			"runner.forgejo.uuid: missing",
			"runner.forgejo.token: contains control characters",
			"runner.forgejo.handle: contains control characters",
			"runner.forgejo.labels[0]: contains control characters",
			"runner.forgejo.labels[0]: has leading or trailing spaces, which Forgejo Runner refuses",
			"runner.forgejo.labels[1]: contains control characters",
			"runner.forgejo.labels[1]: has leading or trailing spaces, which Forgejo Runner refuses",
			"runner.forgejo.labels[3]: missing",
		}},
		{"forgejo no labels", forgejo(func(f *messages.ForgejoRunner) { f.Labels = nil }),
			[]string{"runner.forgejo.labels: must hold 1-64 labels, got 0"}},
		{"github valid", githubRunner(), nil},
		{"github empty", messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{}},
			[]string{"runner.github.jit_config: missing"}},
		{"jenkins valid", jenkinsRunner(), nil},
		{"jenkins with work dir", jenkins(func(j *messages.JenkinsAgent) { j.WorkDir = `C:\work dir` }), nil},
		{"jenkins all wrong", jenkins(func(j *messages.JenkinsAgent) {
			j.URL, j.AgentName, j.Secret, j.WorkDir = "ftp://x/", "@a\x01", "", "@w"
		}), []string{
			"runner.jenkins.url: scheme must be http or https",
			"runner.jenkins.agent_name: contains control characters",
			"runner.jenkins.secret: missing",
			"runner.jenkins.agent_name: must not start with @",
			"runner.jenkins.work_dir: must not start with @",
		}},
		{"jenkins secret too long", jenkins(func(j *messages.JenkinsAgent) { j.Secret = strings.Repeat("s", 16<<10+1) }),
			[]string{"runner.jenkins.secret: longer than 16384 bytes"}},
		{"none", messages.Runner{Kind: messages.RunnerNone}, nil},
		{"none with two sections", messages.Runner{Kind: messages.RunnerNone, Forgejo: forgejoRunner().Forgejo, GitHub: githubRunner().GitHub},
			[]string{`runner: kind "none" takes no settings section`, `runner: only the section of kind "none" may be set`}},
		{"unknown kind with two sections", messages.Runner{Kind: "gitlab", GitHub: githubRunner().GitHub, Jenkins: jenkinsRunner().Jenkins},
			[]string{`runner.kind: must be one of none, forgejo, github, jenkins (got "gitlab")`, `runner: only the section of kind "gitlab" may be set`}},
		{"missing section, two others", messages.Runner{Kind: messages.RunnerForgejo, GitHub: githubRunner().GitHub, Jenkins: jenkinsRunner().Jenkins},
			[]string{`runner.forgejo: missing for kind "forgejo"`}},
		{"own section and another", messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{}, Jenkins: jenkinsRunner().Jenkins},
			[]string{"runner.github.jit_config: missing", `runner: only the section of kind "github" may be set`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := provisionOf(tt.runner)
			err := p.Validate()
			var ve *messages.ValidationError
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("want valid, got %v", err)
			case tt.want == nil:
			case !errors.As(err, &ve):
				t.Fatalf("want a *messages.ValidationError, got %v", err)
			case strings.Join(ve.Problems, "\n") != strings.Join(tt.want, "\n"):
				t.Fatalf("problems:\n%s\nwant:\n%s", strings.Join(ve.Problems, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

// TestValidateEnvelopeFirst: the problems outside the runner section come
// first, and a version error stops validation.
func TestValidateEnvelopeFirst(t *testing.T) {
	p := provisionOf(messages.Runner{Kind: messages.RunnerGitHub})
	p.Image, p.BootTimeoutS = "stretchy-x", -1
	want := `invalid request: image: "stretchy-x" starts with "stretchy-", which is reserved for machines the worker creates; ` +
		"boot_timeout_s: must be between 0 (default 5m0s) and 3600, got -1; " +
		`runner.github: missing for kind "github"`
	if err := p.Validate(); err == nil || err.Error() != want {
		t.Errorf("Validate = %v\nwant %s", err, want)
	}
	p.V = 2
	if err := p.Validate(); !errors.Is(err, messages.ErrUnsupportedVersion) {
		t.Errorf("Validate of v=2 = %v, want ErrUnsupportedVersion", err)
	}
}

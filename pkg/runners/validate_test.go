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
		// Forgejo Runner parses the UUID (github.com/google/uuid) and
		// exits 1 on anything else; Forgejo gives the 8-4-4-4-12 form.
		{"forgejo uuid upper case", forgejo(func(f *messages.ForgejoRunner) { f.UUID = "0E6F5F3C-3B7A-4C2E-9D7A-1C2B3A4D5E6F" }), nil},
		{"forgejo uuid not a UUID", forgejo(func(f *messages.ForgejoRunner) { f.UUID = "0e6f5f3c-uuid" }),
			[]string{"runner.forgejo.uuid: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"}},
		{"forgejo uuid without hyphens", forgejo(func(f *messages.ForgejoRunner) { f.UUID = "0e6f5f3c3b7a4c2e9d7a1c2b3a4d5e6f" }),
			[]string{"runner.forgejo.uuid: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"}},
		{"forgejo uuid in braces", forgejo(func(f *messages.ForgejoRunner) { f.UUID = "{0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f}" }),
			[]string{"runner.forgejo.uuid: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"}},
		{"forgejo uuid not hexadecimal", forgejo(func(f *messages.ForgejoRunner) { f.UUID = "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6g" }),
			[]string{"runner.forgejo.uuid: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"}},
		// Forgejo Runner appends /api/actions to the URL, so a query or
		// a fragment breaks every call it makes, and it exits 1.
		{"forgejo url with query", forgejo(func(f *messages.ForgejoRunner) { f.URL = "https://code.example.org/?a=1" }),
			[]string{"runner.forgejo.url: must have no query or fragment: Forgejo Runner appends /api/actions to it"}},
		{"forgejo url with empty query", forgejo(func(f *messages.ForgejoRunner) { f.URL = "https://code.example.org/forgejo?" }),
			[]string{"runner.forgejo.url: must have no query or fragment: Forgejo Runner appends /api/actions to it"}},
		{"forgejo url with fragment", forgejo(func(f *messages.ForgejoRunner) { f.URL = "https://code.example.org/#top" }),
			[]string{"runner.forgejo.url: must have no query or fragment: Forgejo Runner appends /api/actions to it"}},
		{"forgejo url with escaped ? and #", forgejo(func(f *messages.ForgejoRunner) { f.URL = "https://code.example.org/a%3Fb%23c/" }), nil},
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
			err := Validate(&p)
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
	if err := Validate(&p); err == nil || err.Error() != want {
		t.Errorf("Validate = %v\nwant %s", err, want)
	}
	p.V = 2
	if err := Validate(&p); !errors.Is(err, messages.ErrUnsupportedVersion) {
		t.Errorf("Validate of v=2 = %v, want ErrUnsupportedVersion", err)
	}
}

// TestValidate checks whole provisions, runner sections and envelope.
func TestValidate(t *testing.T) {
	valid := func() messages.Provision {
		return provisionOf(messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
			Token: "s3cr3t-token", Labels: []string{"debian-12", "x86_64"}, Handle: "h-77",
		}})
	}
	tests := []struct {
		name   string
		mutate func(*messages.Provision)
		want   string // substring of the error; "" means valid
	}{
		{"valid", func(*messages.Provision) {}, ""},
		{"version 2", func(p *messages.Provision) { p.V = 2 }, "unsupported schema version"},
		{"job id with slash", func(p *messages.Provision) { p.JobID = "a/b" }, "job_id"},
		{"image managed", func(p *messages.Provision) { p.Image = "stretchy-x" }, "reserved"},
		{"unknown kind", func(p *messages.Provision) { p.Runner.Kind = "buildkite" }, "runner.kind"},
		{"missing section", func(p *messages.Provision) { p.Runner.Forgejo = nil }, "runner.forgejo: missing"},
		{"two sections", func(p *messages.Provision) { p.Runner.GitHub = &messages.GitHubRunner{JITConfig: "x"} }, "only the section"},
		{"url with credentials", func(p *messages.Provision) { p.Runner.Forgejo.URL = "https://u:pw@x.org/" }, "credentials"},
		{"url with newline", func(p *messages.Provision) { p.Runner.Forgejo.URL = "https://x.org/\nHost: y" }, "runner.forgejo.url"},
		{"url ftp", func(p *messages.Provision) { p.Runner.Forgejo.URL = "ftp://x.org/" }, "scheme"},
		{"no labels", func(p *messages.Provision) { p.Runner.Forgejo.Labels = nil }, "labels"},
		{"label with control", func(p *messages.Provision) { p.Runner.Forgejo.Labels = []string{"a\tb"} }, "labels[0]"},
		{"no token", func(p *messages.Provision) { p.Runner.Forgejo.Token = "" }, "token: missing"},
		{"label padded", func(p *messages.Provision) { p.Runner.Forgejo.Labels = []string{" debian"} }, "leading or trailing"},
		{"label with unicode and spaces", func(p *messages.Provision) { p.Runner.Forgejo.Labels = []string{"ubuntu latest", "日本語"} }, ""},
		{"none", func(p *messages.Provision) { p.Runner = messages.Runner{Kind: messages.RunnerNone} }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := valid()
			tt.mutate(&p)
			err := Validate(&p)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("want error containing %q, got %v", tt.want, err)
			}
		})
	}
}

func TestValidationNeverEchoesSecrets(t *testing.T) {
	const secret = "PLANTED-SECRET-\x01-value"
	for _, k := range Kinds() {
		if !k.Starts() {
			continue
		}
		t.Run(string(k.Kind), func(t *testing.T) {
			// Every field holds the secret, which breaks each rule but
			// the URL's, there inside credentials.
			r := messages.Runner{Kind: k.Kind}
			for _, f := range k.Fields {
				if f.List() {
					f.SetValues(&r, []string{secret})
				} else if f.Rule == RuleURL {
					f.Set(&r, "https://user:"+secret+"@x/")
				} else {
					f.Set(&r, secret)
				}
			}
			p := provisionOf(r)
			err := Validate(&p)
			if err == nil {
				t.Fatal("want an error")
			}
			if strings.Contains(err.Error(), "PLANTED-SECRET") {
				t.Fatalf("error repeats a secret: %v", err)
			}
		})
	}
}

// TestSealedRunner: a runner whose secret is sealed (runner.sealed) leaves
// the secret field empty; its envelope is checked, and Unseal puts the
// opened secret where a plain request carries it.
func TestSealedRunner(t *testing.T) {
	box := make([]byte, messages.SealOverhead+40)
	sealed := &messages.SealedSecret{KeyID: "7c70d623df12581c", Box: box}
	withSeal := func(r messages.Runner, s *messages.SealedSecret, clear bool) messages.Runner {
		r.Sealed = s
		if clear {
			_ = Unseal(&r, "") // clears the secret field
			r.Sealed = s
		}
		return r
	}
	tests := []struct {
		name   string
		runner messages.Runner
		want   []string
	}{
		{"forgejo sealed", withSeal(forgejoRunner(), sealed, true), nil},
		{"github sealed", withSeal(messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{}}, sealed, false), nil},
		{"sealed and plain", withSeal(forgejoRunner(), sealed, false),
			[]string{"runner.forgejo.token: must be empty when the secret is sealed (runner.sealed)"}},
		{"kind none sealed", messages.Runner{Kind: messages.RunnerNone, Sealed: sealed},
			[]string{`runner.sealed: kind "none" has no secret to seal`}},
		{"bad key id", withSeal(forgejoRunner(), &messages.SealedSecret{KeyID: "K1", Box: box}, true),
			[]string{`runner.sealed.key_id: must be 16 lowercase hex digits (got "K1")`}},
		{"box too short", withSeal(forgejoRunner(), &messages.SealedSecret{KeyID: sealed.KeyID, Box: box[:48]}, true),
			[]string{"runner.sealed.box: must be more than 48 and at most 16688 bytes (got 48)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := provisionOf(tt.runner)
			err := Validate(&p)
			var ve *messages.ValidationError
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("Validate = %v, want valid", err)
			case tt.want != nil && (!errors.As(err, &ve) || strings.Join(ve.Problems, "\n") != strings.Join(tt.want, "\n")):
				t.Fatalf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
	r := withSeal(forgejoRunner(), sealed, true)
	if err := Unseal(&r, "opened-token"); err != nil {
		t.Fatal(err)
	}
	if r.Sealed != nil || r.Forgejo.Token != "opened-token" || !slicesEqual(Secrets(r), []string{"opened-token"}) {
		t.Fatalf("after Unseal: %+v", r)
	}
	if err := Unseal(&messages.Runner{Kind: messages.RunnerNone}, "x"); err == nil {
		t.Fatal("Unseal of kind none")
	}
}

func slicesEqual(a, b []string) bool { return strings.Join(a, "\x00") == strings.Join(b, "\x00") }

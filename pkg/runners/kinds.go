package runners

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Kind is what the worker knows of one runner kind: the fields of its
// section in a provision request, how they are checked and which are
// secrets, the program it starts on each OS family, how it starts it and
// how it asks it for its version. The table kinds holds one per
// messages.RunnerKind, messages.RunnerNone included. Validation
// (Validate), launch plans (For, VersionPlan), output scrubbing (Secrets),
// worker submit and worker doctor all read it, so that a kind is
// described in one place.
type Kind struct {
	// Kind is the value of runner.kind that selects it.
	Kind messages.RunnerKind
	// Name is the runner's name for people, as plans and errors give it;
	// "" for messages.RunnerNone.
	Name string
	// Section is the name of the kind's section in problems, such as
	// "runner.forgejo"; "" for a kind that takes none.
	Section string
	// Fields are the fields of the section, in the order Validate checks
	// them.
	Fields []Field

	// has reports whether r holds the kind's section; nil for a kind
	// that takes none.
	has func(r messages.Runner) bool
	// check, if set, returns the kind's own problems with its section,
	// after those of the fields' rules.
	check func(r messages.Runner) []string
	// program is the path of the program the image must provide
	// (Plan.Program) on l's OS family.
	program func(l layout) (string, error)
	// start is what starting the runner of r takes on l's OS family, in
	// a machine that lives at most lifetime.
	start func(l layout, r messages.Runner, lifetime time.Duration) (start, error)
	// version is what asking the program for its version takes.
	version func(l layout) (start, error)
	// conflicts, if set, lists the files in the guest that make the
	// runner fail every job (Kind.Conflicts).
	conflicts func(l layout) []Conflict
}

// Conflict is a file an image must not hold for a runner kind: the
// runner reads it, and then fails every job at once. worker doctor --boot
// looks for these (docs/protocol.md 7.4).
type Conflict struct {
	// Path is the file's absolute path in the guest.
	Path string
	// Why says, for people, what the file is and what the runner makes
	// of it.
	Why string
}

// The sections of messages.Runner, for the table.
var (
	forgejoSection section[messages.ForgejoRunner] = func(r *messages.Runner) **messages.ForgejoRunner { return &r.Forgejo }
	githubSection  section[messages.GitHubRunner]  = func(r *messages.Runner) **messages.GitHubRunner { return &r.GitHub }
	jenkinsSection section[messages.JenkinsAgent]  = func(r *messages.Runner) **messages.JenkinsAgent { return &r.Jenkins }
)

// kinds lists every runner kind in the order in which problems and worker
// doctor name them. The fields of each follow docs/protocol.md 3.3.
var kinds = []Kind{
	{Kind: messages.RunnerNone},
	{
		Kind:    messages.RunnerForgejo,
		Name:    "Forgejo Runner",
		Section: "runner.forgejo",
		Fields: []Field{
			forgejoSection.text(Field{Wire: "runner.forgejo.url", Rule: RuleURL, Required: true, Flag: "url", Usage: "the instance's URL"},
				func(s *messages.ForgejoRunner) *string { return &s.URL }),
			forgejoSection.text(Field{Wire: "runner.forgejo.uuid", Rule: RuleUUID, Required: true, Flag: "uuid", Usage: "the runner's UUID"},
				func(s *messages.ForgejoRunner) *string { return &s.UUID }),
			forgejoSection.text(Field{Wire: "runner.forgejo.token", Rule: RuleSecret, Required: true, Secret: true, Flag: "secret-file", Usage: "forgejo token"},
				func(s *messages.ForgejoRunner) *string { return &s.Token }),
			forgejoSection.text(Field{Wire: "runner.forgejo.handle", Rule: RuleText, Flag: "handle", Usage: "the job handle"},
				func(s *messages.ForgejoRunner) *string { return &s.Handle }),
			forgejoSection.list(Field{Wire: "runner.forgejo.labels", Rule: RuleLabels, Required: true, Flag: "label", Usage: "a runner label", each: forgejoLabelSpaces},
				func(s *messages.ForgejoRunner) *[]string { return &s.Labels }),
		},
		has:     forgejoSection.present,
		check:   forgejoCheck,
		program: everywhere(forgejoProgram),
		start: func(l layout, r messages.Runner, lifetime time.Duration) (start, error) {
			return forgejo(l, r.Forgejo, lifetime)
		},
		version:   forgejoVersion,
		conflicts: forgejoConflicts,
	},
	{
		Kind:    messages.RunnerGitHub,
		Name:    "GitHub Actions Runner",
		Section: "runner.github",
		Fields: []Field{
			githubSection.text(Field{Wire: "runner.github.jit_config", Rule: RuleSecret, Required: true, Secret: true, Flag: "secret-file", Usage: "GitHub JIT config"},
				func(s *messages.GitHubRunner) *string { return &s.JITConfig }),
		},
		has:     githubSection.present,
		program: githubProgram,
		start:   func(l layout, r messages.Runner, _ time.Duration) (start, error) { return github(l, r.GitHub) },
		version: githubVersion,
	},
	{
		Kind:    messages.RunnerJenkins,
		Name:    "Jenkins agent",
		Section: "runner.jenkins",
		Fields: []Field{
			jenkinsSection.text(Field{Wire: "runner.jenkins.url", Rule: RuleURL, Required: true, Flag: "url", Usage: "the instance's URL"},
				func(s *messages.JenkinsAgent) *string { return &s.URL }),
			jenkinsSection.text(Field{Wire: "runner.jenkins.agent_name", Rule: RuleText, Required: true, Flag: "agent-name", Usage: "the agent's name"},
				func(s *messages.JenkinsAgent) *string { return &s.AgentName }),
			jenkinsSection.text(Field{Wire: "runner.jenkins.secret", Rule: RuleSecret, Required: true, Secret: true, Flag: "secret-file", Usage: "Jenkins secret"},
				func(s *messages.JenkinsAgent) *string { return &s.Secret }),
			jenkinsSection.text(Field{Wire: "runner.jenkins.work_dir", Rule: RuleText, Flag: "work-dir", Usage: "the agent's work directory"},
				func(s *messages.JenkinsAgent) *string { return &s.WorkDir }),
		},
		has:     jenkinsSection.present,
		check:   jenkinsCheck,
		program: everywhere(jenkinsProgram),
		start:   func(l layout, r messages.Runner, _ time.Duration) (start, error) { return jenkins(l, r.Jenkins) },
		version: jenkinsVersion,
	},
}

// Kinds returns every runner kind, messages.RunnerNone first. The kinds
// are copies: changing them changes nothing here.
func Kinds() []Kind {
	ks := make([]Kind, len(kinds))
	for i, k := range kinds {
		ks[i] = k.clone()
	}
	return ks
}

// Lookup returns the runner kind named kind, and whether there is one.
func Lookup(kind messages.RunnerKind) (Kind, bool) {
	k, ok := lookup(kind)
	return k.clone(), ok
}

func lookup(kind messages.RunnerKind) (Kind, bool) {
	for _, k := range kinds {
		if k.Kind == kind {
			return k, true
		}
	}
	return Kind{}, false
}

func (k Kind) clone() Kind {
	k.Fields = slices.Clone(k.Fields)
	return k
}

// Conflicts returns the files that make the runner of k fail every job
// on an OS of family os, nil for a kind, or an OS family, that has none.
func (k Kind) Conflicts(os OS) []Conflict {
	if k.conflicts == nil || !os.valid() {
		return nil
	}
	return k.conflicts(layoutFor(os, ""))
}

// Starts reports whether k starts a runner program; only
// messages.RunnerNone does not.
func (k Kind) Starts() bool { return k.start != nil }

// Program returns the runner program k starts on an OS of family os, the
// Plan.Program of its plans, which the image must provide. It returns an
// error wrapping ErrUnsupported when the runner does not run on os, one
// wrapping ErrUnknownOS for an unknown family, and one wrapping ErrInvalid
// for a kind that starts nothing.
func (k Kind) Program(os OS) (string, error) {
	if !k.Starts() {
		return "", fmt.Errorf("runner kind %q has no program: %w", k.Kind, ErrInvalid)
	}
	if !os.valid() {
		return "", fmt.Errorf("OS family %q: %w", os, ErrUnknownOS)
	}
	return k.program(layoutFor(os, ""))
}

// forgejo starts `forgejo-runner one-job` (Forgejo Runner 12.8 or later),
// which connects with the runner the orchestrator registered, takes one job
// (--wait: waiting for it), runs it and exits. The token is read from a file
// through --token-url. Flags are passed as --flag=value so that a value
// starting with "-" cannot be taken for a flag.
//
// The runner cancels a job after its runner.timeout, 3h unless its
// configuration file says otherwise; one-job has no flag for it. So the
// runner is given a configuration file (--config, a flag of every
// command) that holds nothing but runner.timeout, the machine's
// lifetime: the worker's deadline comes first, and a job is no longer cut
// short at 3 h in a machine meant to live 6 h. The file holds no secret.
// forgejo-runner takes its defaults for every setting the file leaves
// out, as without a file.
func forgejo(l layout, f *messages.ForgejoRunner, lifetime time.Duration) (start, error) {
	if f == nil {
		return start{}, fmt.Errorf("forgejo runner: missing settings: %w", ErrInvalid)
	}
	s := start{
		program:    forgejoProgram(l),
		secret:     f.Token,
		secretFile: l.join(l.jobDir, "token"),
		config:     forgejoConfig(lifetime),
		configFile: l.join(l.jobDir, "forgejo-runner.yaml"),
	}
	s.exe = s.program
	s.args = []string{
		"one-job",
		"--config=" + s.configFile,
		"--url=" + f.URL,
		"--uuid=" + f.UUID,
		"--token-url=" + l.fileURL(s.secretFile),
	}
	for _, lb := range f.Labels {
		s.args = append(s.args, "--label="+forgejoLabel(lb))
	}
	if f.Handle != "" {
		s.args = append(s.args, "--handle="+f.Handle)
	}
	s.args = append(s.args, "--wait")
	return s, nil
}

// forgejoCheck refuses an instance URL with a query or a fragment (a "?"
// or "#" in a URL can be nothing else): forgejo-runner appends
// /api/actions to the URL it is given, so every call it makes would miss,
// and one-job would exit 1 as it declares itself.
func forgejoCheck(r messages.Runner) []string {
	if strings.ContainsAny(r.Forgejo.URL, "?#") {
		return []string{"runner.forgejo.url: must have no query or fragment: Forgejo Runner appends /api/actions to it"}
	}
	return nil
}

// forgejoConflicts: forgejo-runner reads a registration from
// runner.file, ".runner" in its working directory (the launch script
// changes to the home directory), if there is one, as a server
// connection, and one-job refuses a connection from its command line
// beside it. register and create-runner-file write the file, so an image
// whose runner was once registered by hand holds one.
func forgejoConflicts(l layout) []Conflict {
	return []Conflict{{
		Path: l.join(l.home, ".runner"),
		Why: "forgejo-runner reads it as a registration (a runner registered by hand, with register or create-runner-file, " +
			"leaves it) and then refuses the connection the worker passes on its command line: " +
			"\"server connection conflict between program arguments and config\", exit 1, for every job",
	}}
}

// forgejoConfig is the configuration file forgejo-runner is given: its
// job timeout, in whole seconds, rounded up. It is a YAML string, which
// the runner's YAML library (go.yaml.in/yaml/v3) reads into a
// time.Duration with time.ParseDuration; it refuses a bare number.
func forgejoConfig(lifetime time.Duration) string {
	seconds := int64((lifetime + time.Second - 1) / time.Second)
	return "# Forgejo Runner configuration for one CI job. Written by the stretchy libvirt worker.\n" +
		"runner:\n" +
		fmt.Sprintf("  timeout: %ds\n", seconds)
}

func forgejoProgram(l layout) string {
	if l.os == Windows {
		return l.join(l.home, "forgejo-runner.exe")
	}
	return "/usr/local/bin/forgejo-runner"
}

// forgejoLabel gives a label the "host" scheme, so that jobs run directly
// on the machine rather than in a container. forgejo-runner reads a label as
// name[:scheme[:argument]][?options]; a label that already has a scheme or
// options (it contains ":" or "?") is passed as given, since the
// orchestrator then chose them.
func forgejoLabel(label string) string {
	if strings.ContainsAny(label, ":?") {
		return label
	}
	return label + ":host"
}

// forgejoLabelSpaces refuses a label with leading or trailing white
// space, which Forgejo Runner refuses; inner spaces are fine.
func forgejoLabelSpaces(field, label string) string {
	if strings.TrimSpace(label) != label {
		return field + ": has leading or trailing spaces, which Forgejo Runner refuses"
	}
	return ""
}

// github starts the GitHub Actions Runner's run script with no arguments.
// Runner.Listener reads every --<name> argument also from the environment
// variable ACTIONS_RUNNER_INPUT_<NAME> (and removes it from its own
// environment), so the launch script loads the JIT configuration from its
// file into ACTIONS_RUNNER_INPUT_JITCONFIG and deletes the file: the
// configuration is never on a command line.
//
// Given a JIT configuration, Runner.Listener writes .runner, .credentials
// and .credentials_rsaparams (its private key) into its root directory,
// the one holding run.sh, with File.WriteAllBytes, that is with the
// process's umask; only config.sh would chmod them. The launch script keeps
// umask 022, which builds expect, so the root directory is made private to
// stretchy instead (privateDir). The default work folder _work is inside
// it: builds whose files another user must read need an absolute
// work_folder outside it in the JIT configuration.
func github(l layout, g *messages.GitHubRunner) (start, error) {
	if g == nil {
		return start{}, fmt.Errorf("github runner: missing settings: %w", ErrInvalid)
	}
	dir, err := githubDir(l)
	if err != nil {
		return start{}, err
	}
	program, err := githubProgram(l)
	if err != nil {
		return start{}, err
	}
	s := start{
		secret:     g.JITConfig,
		secretFile: l.join(l.jobDir, "jitconfig"),
		secretEnv:  "ACTIONS_RUNNER_INPUT_JITCONFIG",
		privateDir: dir,
		program:    program,
	}
	s.exe = s.program
	return s, nil
}

// githubProgram is the run script in the runner's root directory.
func githubProgram(l layout) (string, error) {
	dir, err := githubDir(l)
	if err != nil {
		return "", err
	}
	if l.os == Windows {
		return l.join(dir, "run.cmd"), nil
	}
	return l.join(dir, "run.sh"), nil
}

// githubDir is the GitHub Actions Runner's root directory on l's OS.
func githubDir(l layout) (string, error) {
	switch l.os {
	case FreeBSD:
		return "", fmt.Errorf("GitHub Actions Runner does not support FreeBSD: %w", ErrUnsupported)
	case Windows:
		return `C:\actions-runner`, nil
	}
	return l.join(l.home, "actions-runner"), nil
}

// jenkins starts an inbound agent over WebSocket (remoting 3176 or later,
// whose agent.jar takes -url and -name itself). agent.jar parses its
// arguments with args4j, which replaces every argument starting with "@" by
// the lines of the file it names; -secret @<file> uses that, and a name or
// work directory starting with "@" is refused because it would be read as a
// file too.
//
// -noReconnect makes the agent exit once its connection ends. Without it
// remoting's Engine waits and reconnects forever when the controller closes
// the connection, as it does when it deletes or terminates a single-use
// agent after its build, so the runner would never exit and the machine
// would live until its deadline.
func jenkins(l layout, j *messages.JenkinsAgent) (start, error) {
	if j == nil {
		return start{}, fmt.Errorf("jenkins agent: missing settings: %w", ErrInvalid)
	}
	workDir := j.WorkDir
	if workDir == "" {
		workDir = l.join(l.home, "jenkins")
	}
	if strings.HasPrefix(j.AgentName, "@") || strings.HasPrefix(workDir, "@") {
		return start{}, fmt.Errorf("jenkins agent: agent name and work dir must not start with \"@\": %w", ErrInvalid)
	}
	s := start{
		program:    jenkinsProgram(l),
		exe:        java(l),
		secret:     j.Secret,
		secretFile: l.join(l.jobDir, "jenkins-secret"),
	}
	s.args = []string{
		"-jar", s.program,
		"-url", j.URL,
		"-name", j.AgentName,
		"-secret", "@" + s.secretFile,
		"-webSocket",
		"-noReconnect",
		"-workDir", workDir,
	}
	return s, nil
}

// jenkinsCheck refuses an agent name or work directory that agent.jar
// would read as a file of arguments (see jenkins).
func jenkinsCheck(r messages.Runner) []string {
	var ps []string
	if strings.HasPrefix(r.Jenkins.AgentName, "@") {
		ps = append(ps, "runner.jenkins.agent_name: must not start with @")
	}
	if strings.HasPrefix(r.Jenkins.WorkDir, "@") {
		ps = append(ps, "runner.jenkins.work_dir: must not start with @")
	}
	return ps
}

// jenkinsProgram is agent.jar, which java runs.
func jenkinsProgram(l layout) string { return l.join(l.home, "agent.jar") }

// java is the Java launcher, looked up in PATH.
func java(l layout) string {
	if l.os == Windows {
		return "java.exe"
	}
	return "java"
}

// forgejoVersion, githubVersion and jenkinsVersion are how each program
// tells its version, which it prints on standard output, exiting 0
// without contacting a server: forgejo-runner --version (cobra's root
// flag), Runner.Listener --version and java -jar agent.jar -version
// (remoting's Launcher, 3.36 and later).
func forgejoVersion(l layout) (start, error) {
	program := forgejoProgram(l)
	return start{program: program, exe: program, args: []string{"--version"}}, nil
}

// githubVersion asks Runner.Listener directly: run.sh would pass --version
// to its "run" command through run-helper.sh, which it first copies into
// the runner's directory, and map the exit code to 0.
func githubVersion(l layout) (start, error) {
	dir, err := githubDir(l)
	if err != nil {
		return start{}, err
	}
	program := l.join(dir, "bin", "Runner.Listener")
	if l.os == Windows {
		program += ".exe"
	}
	return start{program: program, exe: program, args: []string{"--version"}}, nil
}

func jenkinsVersion(l layout) (start, error) {
	program := jenkinsProgram(l)
	return start{program: program, exe: java(l), args: []string{"-jar", program, "-version"}}, nil
}

// everywhere is the program function of a runner that runs on every OS
// family.
func everywhere(program func(layout) string) func(layout) (string, error) {
	return func(l layout) (string, error) { return program(l), nil }
}

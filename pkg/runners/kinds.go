package runners

import (
	"fmt"
	"strings"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// forgejo starts `forgejo-runner one-job` (Forgejo Runner 12.8 or later),
// which connects with the runner the orchestrator registered, takes one job
// (--wait: waiting for it), runs it and exits. The token is read from a file
// through --token-url. Flags are passed as --flag=value so that a value
// starting with "-" cannot be taken for a flag.
func forgejo(l layout, f *messages.ForgejoRunner) (start, error) {
	if f == nil {
		return start{}, fmt.Errorf("forgejo runner: missing settings: %w", ErrInvalid)
	}
	s := start{
		name:       "Forgejo Runner",
		program:    forgejoProgram(l),
		secret:     f.Token,
		secretFile: l.join(l.jobDir, "token"),
	}
	s.exe = s.program
	s.args = []string{
		"one-job",
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
	s := start{
		name:       "GitHub Actions Runner",
		secret:     g.JITConfig,
		secretFile: l.join(l.jobDir, "jitconfig"),
		secretEnv:  "ACTIONS_RUNNER_INPUT_JITCONFIG",
		privateDir: dir,
		program:    l.join(dir, "run.sh"),
	}
	if l.os == Windows {
		s.program = l.join(dir, "run.cmd")
	}
	s.exe = s.program
	return s, nil
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
		name:       "Jenkins agent",
		program:    l.join(l.home, "agent.jar"),
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

// java is the Java launcher, looked up in PATH.
func java(l layout) string {
	if l.os == Windows {
		return "java.exe"
	}
	return "java"
}

// versionOf is how the program of kind tells its version, each of which
// prints it on standard output and exits 0 without contacting a server:
// forgejo-runner --version (cobra's root flag), Runner.Listener --version
// and java -jar agent.jar -version (remoting's Launcher, 3.36 and later).
// Runner.Listener is asked directly: run.sh would pass --version to its
// "run" command through run-helper.sh, which it first copies into the
// runner's directory, and map the exit code to 0.
func versionOf(l layout, kind messages.RunnerKind) (start, error) {
	s := start{version: true}
	switch kind {
	case messages.RunnerForgejo:
		s.name, s.program = "Forgejo Runner", forgejoProgram(l)
		s.exe, s.args = s.program, []string{"--version"}
	case messages.RunnerGitHub:
		dir, err := githubDir(l)
		if err != nil {
			return start{}, err
		}
		s.name, s.program = "GitHub Actions Runner", l.join(dir, "bin", "Runner.Listener")
		if l.os == Windows {
			s.program += ".exe"
		}
		s.exe, s.args = s.program, []string{"--version"}
	case messages.RunnerJenkins:
		s.name, s.program = "Jenkins agent", l.join(l.home, "agent.jar")
		s.exe, s.args = java(l), []string{"-jar", s.program, "-version"}
	default:
		return start{}, fmt.Errorf("runner kind %q has no program: %w", kind, ErrInvalid)
	}
	return s, nil
}

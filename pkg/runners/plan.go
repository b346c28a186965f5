package runners

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// User is the local account every runner runs as. Images must provide it
// with the home directory Home returns.
const User = "stretchy"

// Home returns the home directory of User on an OS of family os, which is
// the runners' working directory (Plan.Home), or "" for an unknown family.
func Home(os OS) string {
	if !os.valid() {
		return ""
	}
	return layoutFor(os, "").home
}

// Sentinel errors for the branches callers take. For wraps them with the
// runner and OS they concern; the text never contains a secret.
var (
	// ErrUnsupported means the runner does not run on the OS family, for
	// example GitHub Actions Runner on FreeBSD.
	ErrUnsupported = errors.New("unsupported runner and OS combination")
	// ErrInvalid means the request cannot be turned into a safe plan: a bad
	// job id, a missing runner section, a NUL byte, a value the runner
	// would misread (a Jenkins agent name starting with "@"), or a
	// lifetime that is not positive. Validate refuses all of these; For
	// checks them again, as it may be given a runner section that never
	// passed Validate.
	ErrInvalid = errors.New("invalid runner request")
)

// Command is one program the worker runs in the guest with guest-exec.
type Command struct {
	// Path is the absolute path of the program in the guest.
	Path string
	// Args is the argument vector after the program. It never holds a
	// secret: any process in the guest can read another's argv.
	Args []string
	// Env is the complete environment as NAME=value entries, or nil to keep
	// the guest agent's own. qemu-ga replaces the whole environment when it
	// is given one. It never holds a secret.
	Env []string
	// Stdin is sent as guest-exec input-data; it is the only place a secret
	// travels.
	Stdin []byte
	// SecretStdin says Stdin holds a secret that must never be logged or put
	// into an event or error.
	SecretStdin bool
	// Purpose says in a few words what the command is for, for errors and
	// logs, such as "write launch script".
	Purpose string
}

// Plan is how to start one job's runner: the worker runs Prepare in order,
// each of which must exit 0, then starts Launch and watches its guest-exec
// pid. Launch exits when the runner does, and its exit ends the machine.
//
// Launch runs a launch script that Prepare writes, next to the runner's
// secret, into the job directory <home>/.stretchy/<job id>, which only
// stretchy can read. The script sets HOME, USER, LOGNAME, PATH and SHELL,
// changes to the home directory and execs the runner with shell-quoted
// arguments. How Launch becomes stretchy depends on the OS family:
//
//   - Linux: a fixed /bin/sh wrapper picks, at run time, systemd-run
//     --wait --pipe --collect --uid=stretchy when systemd (236 or later) is
//     running, because it propagates the exit status and output and moves the
//     runner out of qemu-ga's cgroup, so restarting qemu-ga does not kill it;
//     else sudo -n -H -u stretchy; else su -s /bin/sh stretchy -c, which is
//     all a busybox guest has.
//   - FreeBSD: su -m stretchy -c, which is in the base system, needs no
//     configuration when root calls it, and waits for the runner. daemon(8)
//     would detach and lose the exit status; doas and sudo are ports that
//     need a rule.
//   - macOS: launchctl asuser <uid of stretchy> sudo -n -H -u stretchy, so
//     that the runner lives in stretchy's bootstrap namespace and can reach
//     its Aqua session (given automatic login).
//   - Windows: the QEMU-GA service already runs as stretchy, so Launch runs
//     a PowerShell script in the job directory, which starts the runner with
//     a pre-quoted command line and exits with its exit code.
//
// The wrappers' text holds no job data: the script path comes as "$1" and is
// checked to hold only [A-Za-z0-9_./-], so every shell su may pick runs it
// the same way. su and sudo are given the path, never a command string built
// from job data.
type Plan struct {
	// Prepare makes private the directory a runner writes its own
	// credentials into (GitHub), then writes the secret, the runner's
	// configuration (Forgejo) and the launch script.
	Prepare []Command
	// Launch starts the runner and exits when it does.
	Launch Command
	// Program is the runner program the image must provide, for
	// diagnostics when Launch fails at once.
	Program string
	// Home is stretchy's home directory and the runner's working directory.
	Home string
}

// Empty reports whether p starts nothing, which is what For returns for
// messages.RunnerNone.
func (p Plan) Empty() bool { return p.Launch.Path == "" }

// For returns the plan that starts runner r for job jobID on an OS of family
// os, in a machine that lives at most lifetime, the request's
// messages.Provision.MaxLifetime: a runner that ends a job after a timeout
// of its own is given lifetime as that timeout, so that the machine's
// deadline, not the runner's default, bounds the job. For
// messages.RunnerNone there is nothing to start: For returns the zero Plan
// (Empty reports true) and no error, and the machine lives until it is
// torn down or reaches its deadline. For returns an error wrapping
// ErrUnsupported when the runner does not run on os, and one wrapping
// ErrInvalid when r or lifetime cannot be turned into a safe plan.
func For(jobID string, os OS, r messages.Runner, lifetime time.Duration) (Plan, error) {
	k, known := lookup(r.Kind)
	if known && !k.Starts() {
		return Plan{}, nil
	}
	if !messages.ValidJobID(jobID) {
		return Plan{}, fmt.Errorf("job id %q: %w", jobID, ErrInvalid)
	}
	if !os.valid() {
		return Plan{}, fmt.Errorf("OS family %q: %w", os, ErrUnknownOS)
	}
	if !known {
		return Plan{}, fmt.Errorf("runner kind %q: %w", r.Kind, ErrInvalid)
	}
	if lifetime <= 0 {
		return Plan{}, fmt.Errorf("lifetime %s: %w", lifetime, ErrInvalid)
	}
	l := layoutFor(os, jobID)
	s, err := k.start(l, r, lifetime)
	if err != nil {
		return Plan{}, err
	}
	s.name = k.Name
	for _, v := range append([]string{s.exe, s.secret}, s.args...) {
		if strings.IndexByte(v, 0) >= 0 {
			return Plan{}, fmt.Errorf("%s: a value holds a NUL byte: %w", s.name, ErrInvalid)
		}
	}
	if os == Windows {
		return windowsPlan(l, s), nil
	}
	return posixPlan(l, s), nil
}

// VersionPlan returns the plan that asks the program of runner kind on an
// OS of family os for its version, for diagnostics such as worker doctor:
// Prepare writes a script, version.sh (Windows: version.ps1), into the job
// directory of jobID, and Launch runs it as stretchy, exactly as For starts
// a runner, so that it finds the program in the same environment. Launch
// exits with the program's status once it has printed its version on
// standard output; it needs no secret and no server. Plan.Program is the
// program asked. VersionPlan returns an error wrapping ErrUnsupported when
// the runner does not run on os, and one wrapping ErrInvalid for an invalid
// job id or a kind without a program, such as messages.RunnerNone.
func VersionPlan(jobID string, os OS, kind messages.RunnerKind) (Plan, error) {
	if !messages.ValidJobID(jobID) {
		return Plan{}, fmt.Errorf("job id %q: %w", jobID, ErrInvalid)
	}
	if !os.valid() {
		return Plan{}, fmt.Errorf("OS family %q: %w", os, ErrUnknownOS)
	}
	k, ok := lookup(kind)
	if !ok || !k.Starts() {
		return Plan{}, fmt.Errorf("runner kind %q has no program: %w", kind, ErrInvalid)
	}
	l := layoutFor(os, jobID)
	s, err := k.version(l)
	if err != nil {
		return Plan{}, err
	}
	s.name, s.version = k.Name, true
	if os == Windows {
		return windowsPlan(l, s), nil
	}
	return posixPlan(l, s), nil
}

// start is what a runner needs, independent of how the OS starts it.
type start struct {
	name    string   // runner name for Purpose texts
	program string   // Plan.Program
	exe     string   // what the script runs: program itself, or java
	args    []string // arguments after exe
	// secret is written to secretFile (mode 0600) before the launch.
	secret     string
	secretFile string
	// secretEnv, if set, is the environment variable the launch script
	// loads the secret into before it deletes secretFile and starts exe.
	secretEnv string
	// privateDir, if set, is a directory the runner writes its own
	// credentials into, which is made private to stretchy before the
	// launch.
	privateDir string
	// config, if set, is the runner's configuration, written to
	// configFile (mode 0600) before the launch. It holds no secret.
	config     string
	configFile string
	// version says that exe only tells its version (VersionPlan): the
	// script is version.sh or version.ps1 and says so, and there is no
	// secret.
	version bool
}

// script is the base name of the script that starts s, and what its
// first line and Launch's Purpose say it does.
func (s start) script() (base, comment, purpose string) {
	if s.version {
		return "version", "Asks " + s.name + " for its version.", "ask " + s.name + " for its version as " + User
	}
	return "launch", "Starts " + s.name + " for one CI job.", "start " + s.name + " as " + User
}

// layout holds the paths of one OS family for one job.
type layout struct {
	os        OS
	home      string
	base      string // <home>/.stretchy
	jobDir    string // <home>/.stretchy/<job id>
	sep       string
	userPath  string // PATH the runner gets
	adminPath string // PATH the root-run commands get (POSIX only)
}

func layoutFor(os OS, jobID string) layout {
	l := layout{os: os, sep: "/"}
	switch os {
	case Linux:
		l.home = "/home/" + User
		l.userPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
		l.adminPath = l.userPath
	case FreeBSD:
		l.home = "/home/" + User
		l.userPath = "/sbin:/bin:/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin"
		l.adminPath = l.userPath
	case Darwin:
		l.home = "/Users/" + User
		l.userPath = "/opt/homebrew/bin:/opt/homebrew/sbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
		l.adminPath = "/usr/bin:/bin:/usr/sbin:/sbin"
	case Windows:
		l.home = `C:\Users\` + User
		l.sep = `\`
	}
	l.base = l.home + l.sep + ".stretchy"
	l.jobDir = l.base + l.sep + jobID
	return l
}

// join joins path elements with the family's separator.
func (l layout) join(elem ...string) string { return strings.Join(elem, l.sep) }

// fileURL is the file: URL of path as forgejo-runner's --token-url reads
// it: "file:/abs/path" on POSIX, RFC 8089 "file:///C:/..." on Windows.
func (l layout) fileURL(path string) string {
	if l.os == Windows {
		return "file:///" + strings.ReplaceAll(path, `\`, "/")
	}
	return "file:" + path
}

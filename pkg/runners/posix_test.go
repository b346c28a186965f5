package runners

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// awkward are values a shell would act on if they were quoted wrongly.
var awkward = []string{
	"", "plain", "two words", "it's", `say "hi"`, "$HOME", "${x:-y}", "`id`", "$(id)",
	"a\\b", "back\\", "semi;colon", "amp&er", "pipe|", "<in >out", "glob*?[a]", "~tilde", "#hash",
	"new\nline", "tab\there", "日本語", "'", "''", `\'`, "-n", "--", "x=y",
}

func requireSh(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
}

// shells are the POSIX shells the scripts are run with: /bin/sh, and
// busybox sh, which is all the test guest has, when it is installed.
func shells(t *testing.T) map[string][]string {
	t.Helper()
	requireSh(t)
	sh := map[string][]string{"sh": {"/bin/sh"}}
	if bb, err := exec.LookPath("busybox"); err == nil {
		sh["busybox"] = []string{bb, "sh"}
	}
	return sh
}

// posixShOnly is /bin/sh alone, for tests that fake id, chown or su:
// busybox sh runs its own applets of those names whatever PATH says.
func posixShOnly(t *testing.T) map[string][]string {
	t.Helper()
	requireSh(t)
	return map[string][]string{"sh": {"/bin/sh"}}
}

// shellCommand runs sh (a shells entry) with args.
func shellCommand(sh []string, args ...string) *exec.Cmd {
	return exec.Command(sh[0], append(slices.Clone(sh[1:]), args...)...)
}

// TestShellQuoteRoundTrip has /bin/sh print the words shellQuote made.
func TestShellQuoteRoundTrip(t *testing.T) {
	requireSh(t)
	words := make([]string, len(awkward))
	for i, a := range awkward {
		words[i] = shellQuote(a)
	}
	out, err := exec.Command("/bin/sh", "-c", `printf '%s\0' `+strings.Join(words, " ")).Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00"); !slices.Equal(got, awkward) {
		t.Fatalf("round trip:\n got %q\nwant %q", got, awkward)
	}
}

// writeFake writes an executable shell script.
func writeFake(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// readNUL reads a file of NUL-terminated strings.
func readNUL(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

// fakeRunner records its argv and the environment the runner sees, then
// exits 7, which the launch script must pass on.
const fakeRunner = `printf '%s\0' "$0" "$@" >"$OUT/argv"
printf '%s\0' "HOME=$HOME" "USER=$USER" "LOGNAME=$LOGNAME" "SHELL=$SHELL" "PWD=$(pwd)" "JIT=${ACTIONS_RUNNER_INPUT_JITCONFIG-unset}" >"$OUT/env"
exit 7
`

// TestPOSIXLaunchScripts runs each POSIX launch script with /bin/sh after
// moving home to a temporary directory and putting fake runner programs in
// place, and checks the argv and environment the runner gets.
func TestPOSIXLaunchScripts(t *testing.T) {
	for shName, sh := range shells(t) {
		for _, rc := range runnerCases {
			for _, goos := range []OS{Linux, FreeBSD, Darwin} {
				t.Run(shName+"/"+rc.name+"/"+string(goos), func(t *testing.T) { testLaunchScript(t, sh, rc.name, rc.runner, goos) })
			}
		}
	}
}

func testLaunchScript(t *testing.T, sh []string, name string, runner func() messages.Runner, goos OS) {
	p, err := For(testJob, goos, runner(), testLifetime)
	if errors.Is(err, ErrUnsupported) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	script := launchScript(p)
	if out, err := shellCommand(sh, "-n", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("sh -n: %v\n%s", err, out)
	}

	tmp := t.TempDir()
	home, bin, out := filepath.Join(tmp, "home"), filepath.Join(tmp, "bin"), filepath.Join(tmp, "out")
	for _, d := range []string{home, bin, out} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	l := layoutFor(goos, testJob)
	test := strings.ReplaceAll(script, "PATH="+shellQuote(l.userPath), "PATH="+bin+":/usr/bin:/bin")
	test = strings.ReplaceAll(test, "/usr/local/bin/forgejo-runner", bin+"/forgejo-runner")
	test = strings.ReplaceAll(test, l.home, home)

	var program string
	var wantArgs []string
	wantJIT := "unset"
	switch name {
	case "forgejo":
		program = bin + "/forgejo-runner"
		wantArgs = []string{
			"one-job",
			"--config=" + home + "/.stretchy/job-42_x/forgejo-runner.yaml",
			"--url=https://code.example.org/forgejo/a&b=$x'y/",
			"--uuid=0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
			"--token-url=file:" + home + "/.stretchy/job-42_x/token",
			"--label=ubuntu latest:host",
			"--label=it's:host",
			"--label=日本語:host",
			"--label=say \"hi\" $(id) `x`:host",
			"--label=docker:docker://node:22",
			"--handle=h-77",
			"--wait",
		}
	case "github":
		program = home + "/actions-runner/run.sh"
		wantArgs = []string{}
		wantJIT = githubRunner().GitHub.JITConfig
		jit := filepath.Join(home, ".stretchy", testJob, "jitconfig")
		if err := os.MkdirAll(filepath.Dir(jit), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(jit, []byte(wantJIT), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if _, err := os.Stat(jit); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("launch script left the JIT config file behind (stat: %v)", err)
			}
		})
	case "jenkins":
		program = bin + "/java"
		wantArgs = []string{
			"-jar", home + "/agent.jar",
			"-url", "https://jenkins.example.org/ci/?a=1&b=$x",
			"-name", `agent one's "$HOME"`,
			"-secret", "@" + home + "/.stretchy/job-42_x/jenkins-secret",
			"-webSocket",
			"-noReconnect",
			"-workDir", home + "/jenkins",
		}
	}
	writeFake(t, program, fakeRunner)

	cmd := shellCommand(sh, "-c", test)
	cmd.Env = []string{"OUT=" + out, "PATH=/usr/bin:/bin"}
	cmd.Dir = tmp
	output, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 7 {
		t.Fatalf("launch script: %v, want exit status 7 from the runner\n%s", err, output)
	}
	argv := readNUL(t, filepath.Join(out, "argv"))
	if want := append([]string{program}, wantArgs...); !slices.Equal(argv, want) {
		t.Errorf("runner argv:\n got %q\nwant %q", argv, want)
	}
	wantEnv := []string{"HOME=" + home, "USER=stretchy", "LOGNAME=stretchy", "SHELL=/bin/sh", "PWD=" + home, "JIT=" + wantJIT}
	if env := readNUL(t, filepath.Join(out, "env")); !slices.Equal(env, wantEnv) {
		t.Errorf("runner environment:\n got %q\nwant %q", env, wantEnv)
	}
}

// TestPOSIXVersionScripts runs each POSIX version script like
// TestPOSIXLaunchScripts, with fake programs that print a version, and
// checks what is asked of them: run.sh would hand --version to
// Runner.Listener's run command through its helper, so Runner.Listener is
// asked itself.
func TestPOSIXVersionScripts(t *testing.T) {
	tests := []struct {
		kind    messages.RunnerKind
		program string // below the fake home or bin
		args    []string
	}{
		{messages.RunnerForgejo, "bin/forgejo-runner", []string{"--version"}},
		{messages.RunnerGitHub, "home/actions-runner/bin/Runner.Listener", []string{"--version"}},
		{messages.RunnerJenkins, "bin/java", []string{"-jar", "HOME/agent.jar", "-version"}},
	}
	for shName, sh := range shells(t) {
		for _, tt := range tests {
			for _, goos := range []OS{Linux, FreeBSD, Darwin} {
				t.Run(shName+"/"+string(tt.kind)+"/"+string(goos), func(t *testing.T) {
					p, err := VersionPlan(testJob, goos, tt.kind)
					if errors.Is(err, ErrUnsupported) {
						t.Skip(err)
					}
					if err != nil {
						t.Fatal(err)
					}
					if len(p.Prepare) != 1 || p.Prepare[0].SecretStdin {
						t.Fatalf("%d prepare commands, want 1 without a secret", len(p.Prepare))
					}
					if got := p.Prepare[0].Args[prepScriptFile]; !strings.HasSuffix(got, "/version.sh") {
						t.Errorf("writes %s, want version.sh in the job directory", got)
					}
					tmp := t.TempDir()
					home, bin := filepath.Join(tmp, "home"), filepath.Join(tmp, "bin")
					l := layoutFor(goos, testJob)
					script := launchScript(p)
					script = strings.ReplaceAll(script, "PATH="+shellQuote(l.userPath), "PATH="+bin+":/usr/bin:/bin")
					script = strings.ReplaceAll(script, "/usr/local/bin/forgejo-runner", bin+"/forgejo-runner")
					script = strings.ReplaceAll(script, l.home, home)
					program := filepath.Join(tmp, tt.program)
					writeFake(t, program, `printf '%s\0' "$0" "$@" >"$OUT/argv"; echo 1.2.3`)
					mkdir(t, filepath.Join(tmp, "out"), 0o700)
					if err := os.MkdirAll(home, 0o755); err != nil {
						t.Fatal(err)
					}
					cmd := shellCommand(sh, "-c", script)
					cmd.Env = []string{"OUT=" + filepath.Join(tmp, "out"), "PATH=/usr/bin:/bin"}
					out, err := cmd.Output()
					if err != nil || string(out) != "1.2.3\n" {
						t.Fatalf("version script: %q, %v; want the program's output", out, err)
					}
					want := []string{program}
					for _, a := range tt.args {
						want = append(want, strings.ReplaceAll(a, "HOME", home))
					}
					if got := readNUL(t, filepath.Join(tmp, "out", "argv")); !slices.Equal(got, want) {
						t.Errorf("argv %q, want %q", got, want)
					}
				})
			}
		}
	}
}

// TestPOSIXWriteFile runs the Prepare commands with fake id and chown and
// checks what they leave on disk.
func TestPOSIXWriteFile(t *testing.T) {
	for shName, sh := range posixShOnly(t) {
		for _, goos := range []OS{Linux, FreeBSD, Darwin} {
			t.Run(shName+"/"+string(goos), func(t *testing.T) { testWriteFile(t, sh, goos) })
		}
	}
}

func testWriteFile(t *testing.T, sh []string, goos OS) {
	p, err := For(testJob, goos, forgejoRunner(), testLifetime)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Prepare) != 1 {
		t.Fatalf("%d prepare commands, want 1", len(p.Prepare))
	}
	tmp := t.TempDir()
	home, bin := filepath.Join(tmp, "home"), filepath.Join(tmp, "bin")
	if err := os.MkdirAll(home, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFake(t, bin+"/id", `echo 1000`)
	writeFake(t, bin+"/chown", `printf '%s\n' "$*" >>"$OUT/chown"`)
	l := layoutFor(goos, testJob)
	c := p.Prepare[0]
	if c.Path != "/bin/sh" {
		t.Fatalf("%s: runs %s, want /bin/sh", c.Purpose, c.Path)
	}
	args := homeArgs(c.Args, l.home, home)
	// Stale files are replaced, not written through: a hard link to
	// another file keeps that file's content.
	target := filepath.Join(tmp, "target")
	if err := os.WriteFile(target, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = os.MkdirAll(filepath.Dir(args[prepSecretFile]), 0o700)
	for _, f := range []string{args[prepSecretFile], args[prepScriptFile], args[prepConfigFile]} {
		if err := os.Link(target, f); err != nil {
			t.Fatal(err)
		}
	}
	cmd := shellCommand(sh, args...)
	cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "OUT=" + tmp}
	cmd.Stdin = bytes.NewReader(c.Stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", c.Purpose, err, out)
	}
	files := []struct {
		path, want string
		mode       os.FileMode
	}{
		{args[prepSecretFile], string(c.Stdin), 0o600},
		{args[prepScriptFile], args[prepScript], 0o700},
		{args[prepConfigFile], args[prepConfig], 0o600},
	}
	for _, f := range files {
		got, err := os.ReadFile(f.path)
		if err != nil || string(got) != f.want {
			t.Errorf("%s holds %q, %v; want %q", f.path, got, err, f.want)
		}
		if fi, err := os.Lstat(f.path); err != nil || fi.Mode() != f.mode {
			t.Errorf("%s: mode %v, %v; want %v", f.path, fi.Mode(), err, f.mode)
		}
	}
	if keep, _ := os.ReadFile(target); string(keep) != "keep" {
		t.Errorf("%s: wrote through a hard link", c.Purpose)
	}
	for _, d := range args[prepBase : prepJobDir+1] {
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("directory %s: %v, %v; want mode 0700", d, fi.Mode(), err)
		}
	}
	chowns, err := os.ReadFile(filepath.Join(tmp, "chown"))
	if err != nil {
		t.Fatal(err)
	}
	base, dir := filepath.Join(home, ".stretchy"), filepath.Join(home, ".stretchy", testJob)
	want := strings.Join([]string{
		"-h stretchy:1000 " + base + " " + dir,
		"-h stretchy:1000 " + dir + "/token",
		"-h stretchy:1000 " + dir + "/forgejo-runner.yaml",
		"-h stretchy:1000 " + dir + "/launch.sh",
	}, "\n") + "\n"
	if string(chowns) != want {
		t.Errorf("chown calls:\n%s\nwant:\n%s", chowns, want)
	}
}

// The arguments of the POSIX prepare command (prepareScript).
const (
	prepBase = 3 + iota
	prepJobDir
	prepPrivateDir
	prepSecretFile
	prepScriptFile
	prepScript
	prepConfigFile
	prepConfig
)

// homeArgs returns the prepare command's arguments with the guest's home
// replaced by home in every path.
func homeArgs(args []string, guestHome, home string) []string {
	args = slices.Clone(args)
	for _, i := range []int{prepBase, prepJobDir, prepPrivateDir, prepSecretFile, prepScriptFile, prepConfigFile} {
		args[i] = strings.ReplaceAll(args[i], guestHome, home)
	}
	return args
}

// launchScript returns the launch script a plan writes: the argument
// prepScript of the POSIX prepare command, the standard input of the last
// Windows one.
func launchScript(p Plan) string {
	if c := p.Prepare[0]; c.Path == "/bin/sh" {
		return c.Args[prepScript]
	}
	return string(p.Prepare[len(p.Prepare)-1].Stdin)
}

// TestPOSIXWriteFileRefusesSymlinks plants a symbolic link, as stretchy
// could in its home, at each path the secret's write goes through, and
// checks that the write is refused before anything is created, owned or
// written through the link.
func TestPOSIXWriteFileRefusesSymlinks(t *testing.T) {
	p, err := For(testJob, Linux, forgejoRunner(), testLifetime)
	if err != nil {
		t.Fatal(err)
	}
	write := p.Prepare[0]
	tests := []struct {
		name string
		// link is the path, relative to home, that becomes a link to the
		// trap; the directories above it are created first.
		link string
	}{
		{"base directory", ".stretchy"},
		{"job directory", ".stretchy/" + testJob},
		{"secret file", ".stretchy/" + testJob + "/token"},
		{"launch script", ".stretchy/" + testJob + "/launch.sh"},
		{"configuration", ".stretchy/" + testJob + "/forgejo-runner.yaml"},
	}
	for shName, sh := range posixShOnly(t) {
		for _, tt := range tests {
			t.Run(shName+"/"+tt.name, func(t *testing.T) {
				tmp := t.TempDir()
				home, bin, trap := filepath.Join(tmp, "home"), filepath.Join(tmp, "bin"), filepath.Join(tmp, "trap")
				writeFake(t, bin+"/id", `echo 1000`)
				writeFake(t, bin+"/chown", `printf '%s\n' "$*" >>"$OUT/chown"`)
				if err := os.MkdirAll(trap, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(trap, "token"), []byte("keep"), 0o644); err != nil {
					t.Fatal(err)
				}
				link := filepath.Join(home, tt.link)
				if err := os.MkdirAll(filepath.Dir(link), 0o700); err != nil {
					t.Fatal(err)
				}
				target := trap
				if filepath.Ext(tt.link) != "" || strings.HasSuffix(tt.link, "/token") {
					target = filepath.Join(trap, "token")
				}
				if err := os.Symlink(target, link); err != nil {
					t.Fatal(err)
				}
				args := homeArgs(write.Args, "/home/stretchy", home)
				cmd := shellCommand(sh, args...)
				cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "OUT=" + tmp}
				cmd.Stdin = bytes.NewReader(write.Stdin)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				err := cmd.Run()
				var exitErr *exec.ExitError
				if !errors.As(err, &exitErr) {
					t.Fatalf("write through a link at %s: %v, want a non-zero exit", tt.link, err)
				}
				// The secret is checked first, for links above both files.
				file := args[prepSecretFile]
				switch tt.name {
				case "launch script":
					file = args[prepScriptFile]
				case "configuration":
					file = args[prepConfigFile]
				}
				if want := "stretchy: refusing to write " + file + ": " + link + " is a symbolic link\n"; stderr.String() != want {
					t.Errorf("stderr %q, want %q", stderr.String(), want)
				}
				entries, _ := os.ReadDir(trap)
				if len(entries) != 1 || entries[0].Name() != "token" {
					t.Errorf("the trap directory holds %v, want only its own file", entries)
				}
				if fi, err := os.Stat(trap); err != nil || fi.Mode().Perm() != 0o755 {
					t.Errorf("the trap directory: %v, %v; want mode 0755 kept", fi.Mode(), err)
				}
				if b, err := os.ReadFile(filepath.Join(trap, "token")); err != nil || string(b) != "keep" {
					t.Errorf("the trap file holds %q, %v; want it unchanged", b, err)
				}
				if fi, err := os.Stat(filepath.Join(trap, "token")); err != nil || fi.Mode().Perm() != 0o644 {
					t.Errorf("the trap file: %v, %v; want mode 0644 kept", fi.Mode(), err)
				}
				if chowns, err := os.ReadFile(filepath.Join(tmp, "chown")); err == nil {
					t.Errorf("chown was called: %s", chowns)
				}
			})
		}
	}
}

// TestPOSIXGitHubRunnerDirBecomesPrivate runs the command that makes the
// GitHub runner's directory private, with fake id and chown, against a
// directory, a symbolic link, a file and nothing, and checks what it
// leaves: the runner writes its credentials there with the job's umask.
func TestPOSIXGitHubRunnerDirBecomesPrivate(t *testing.T) {
	tests := []struct {
		name string
		// make creates what is at the runner directory's path.
		make       func(t *testing.T, dir, trap string)
		wantStderr string // "" means exit 0
		wantMode   os.FileMode
		wantChown  bool
	}{
		{name: "directory", make: func(t *testing.T, dir, _ string) { mkdir(t, dir, 0o755) },
			wantMode: os.ModeDir | 0o700, wantChown: true},
		{name: "symbolic link", make: func(t *testing.T, dir, trap string) {
			if err := os.Symlink(trap, dir); err != nil {
				t.Fatal(err)
			}
		}, wantStderr: "it is a symbolic link", wantMode: os.ModeSymlink | 0o777},
		{name: "file", make: func(t *testing.T, dir, _ string) {
			if err := os.WriteFile(dir, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}, wantStderr: "it is not a directory", wantMode: 0o644},
		{name: "missing", make: func(*testing.T, string, string) {}},
	}
	for _, goos := range []OS{Linux, Darwin} {
		p, err := For(testJob, goos, githubRunner(), testLifetime)
		if err != nil {
			t.Fatal(err)
		}
		c := p.Prepare[0]
		l := layoutFor(goos, testJob)
		if c.Path != "/bin/sh" || c.Args[prepPrivateDir] != l.home+"/actions-runner" || !c.SecretStdin {
			t.Fatalf("%s: prepare command is %q (%s %q), want /bin/sh making %s/actions-runner private", goos, c.Purpose, c.Path, c.Args, l.home)
		}
		for shName, sh := range posixShOnly(t) {
			for _, tt := range tests {
				t.Run(shName+"/"+string(goos)+"/"+tt.name, func(t *testing.T) {
					tmp := t.TempDir()
					bin, dir, trap := filepath.Join(tmp, "bin"), filepath.Join(tmp, "home", "actions-runner"), filepath.Join(tmp, "trap")
					writeFake(t, bin+"/id", `echo 1000`)
					writeFake(t, bin+"/chown", `printf '%s\n' "$*" >>"$OUT/chown"`)
					mkdir(t, filepath.Dir(dir), 0o755)
					mkdir(t, trap, 0o755)
					tt.make(t, dir, trap)
					args := homeArgs(c.Args, l.home, filepath.Join(tmp, "home"))
					if args[prepPrivateDir] != dir {
						t.Fatalf("private directory %s, want %s", args[prepPrivateDir], dir)
					}
					cmd := shellCommand(sh, args...)
					cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "OUT=" + tmp}
					cmd.Stdin = bytes.NewReader(c.Stdin)
					var stderr bytes.Buffer
					cmd.Stderr = &stderr
					err := cmd.Run()
					switch {
					case tt.wantStderr == "" && err != nil:
						t.Fatalf("%v, want exit 0\n%s", err, stderr.String())
					case tt.wantStderr != "" && err == nil:
						t.Fatalf("exit 0, want a refusal saying %q", tt.wantStderr)
					case tt.wantStderr != "":
						if want := "stretchy: refusing to make " + dir + " private: " + tt.wantStderr + "\n"; stderr.String() != want {
							t.Errorf("stderr %q, want %q", stderr.String(), want)
						}
					}
					if fi, err := os.Lstat(dir); tt.wantMode == 0 {
						if err == nil {
							t.Errorf("created %s", dir)
						}
					} else if err != nil || fi.Mode() != tt.wantMode {
						t.Errorf("%s: %v, %v; want %v", dir, fi.Mode(), err, tt.wantMode)
					}
					if fi, err := os.Stat(trap); err != nil || fi.Mode().Perm() != 0o755 {
						t.Errorf("the link's target: %v, %v; want it unchanged", fi.Mode(), err)
					}
					// The directory is made private first; a refusal stops
					// everything after it.
					chowns, _ := os.ReadFile(filepath.Join(tmp, "chown"))
					first, _, _ := strings.Cut(string(chowns), "\n")
					switch {
					case tt.wantStderr != "" && len(chowns) > 0:
						t.Errorf("chown calls %q after a refusal, want none", chowns)
					case tt.wantChown && first != "-h stretchy:1000 "+dir:
						t.Errorf("first chown call %q, want of %s", first, dir)
					case !tt.wantChown && strings.Contains(string(chowns), " "+dir+"\n"):
						t.Errorf("chown calls %q include %s", chowns, dir)
					}
				})
			}
		}
	}
}

func mkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(dir, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
}

// recorder records its name and argv, then exits 3.
const recorder = `printf '%s\0' "${0##*/}" "$@" >"$OUT/called"
exit 3
`

// TestPOSIXLaunchWrappers runs the Launch wrappers against fake su, sudo,
// systemd-run, id and launchctl and checks which one they call, and how.
func TestPOSIXLaunchWrappers(t *testing.T) {
	requireSh(t)
	_, err := os.Stat("/run/systemd/system")
	systemdBooted := err == nil
	script := "/home/stretchy/.stretchy/" + testJob + "/launch.sh"
	sudo := []string{"sudo", "-n", "-H", "-u", "stretchy", "--", script}
	tests := []wrapperCase{
		{name: "linux busybox su", os: Linux, fakes: map[string]string{"su": ""},
			want: []string{"su", "-s", "/bin/sh", "stretchy", "-c", script}},
		{name: "linux sudo", os: Linux, fakes: map[string]string{"su": "", "sudo": ""}, want: sudo},
		{name: "linux old systemd", os: Linux,
			fakes: map[string]string{"su": "", "sudo": "", "systemd-run": `[ "$1" = --version ] && { echo 'systemd 219'; exit 0; }` + "\n" + recorder},
			want:  sudo},
		{name: "linux systemd", os: Linux,
			fakes: map[string]string{"su": "", "sudo": "", "systemd-run": `[ "$1" = --version ] && { printf 'systemd 252 (252.39-1)\n+PAM +AUDIT\n'; exit 0; }` + "\n" + recorder},
			want: map[bool][]string{
				true:  {"systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--uid=stretchy", "-p", "WorkingDirectory=~", script},
				false: sudo,
			}[systemdBooted]},
		{name: "freebsd su", os: FreeBSD, fakes: map[string]string{"su": ""},
			want: []string{"su", "-m", "stretchy", "-c", script}},
		{name: "darwin launchctl", os: Darwin, fakes: map[string]string{"id": `echo 501`, "launchctl": ""},
			want: []string{"launchctl", "asuser", "501", "sudo", "-n", "-H", "-u", "stretchy", "--", script}},
		{name: "linux refuses odd path", os: Linux, fakes: map[string]string{"su": ""}, script: "/tmp/x; reboot"},
		{name: "freebsd refuses odd path", os: FreeBSD, fakes: map[string]string{"su": ""}, script: "/tmp/$(reboot)"},
		{name: "darwin refuses relative path", os: Darwin, fakes: map[string]string{"id": `echo 501`, "launchctl": ""}, script: "-"},
		{name: "linux refuses relative path", os: Linux, fakes: map[string]string{"su": ""}, script: "launch.sh"},
	}
	for shName, sh := range posixShOnly(t) {
		for _, tt := range tests {
			t.Run(shName+"/"+tt.name, func(t *testing.T) {
				testWrapper(t, sh, script, tt)
			})
		}
	}
}

type wrapperCase struct {
	name   string
	os     OS
	fakes  map[string]string // program name -> body; "" is recorder
	script string            // launch script path to pass instead of the plan's
	want   []string          // argv of the program called; nil: refused with 126
}

func testWrapper(t *testing.T, sh []string, script string, tt wrapperCase) {
	p, err := For(testJob, tt.os, forgejoRunner(), testLifetime)
	if err != nil {
		t.Fatal(err)
	}
	args := slices.Clone(p.Launch.Args)
	if got := args[len(args)-1]; strings.Replace(got, "/Users/", "/home/", 1) != script {
		t.Fatalf("launch script argument %q", got)
	}
	args[len(args)-1] = script
	if tt.script != "" {
		args[len(args)-1] = tt.script
	}
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "bin")
	for name, body := range tt.fakes {
		if body == "" {
			body = recorder
		}
		writeFake(t, filepath.Join(bin, name), body)
	}
	if p.Launch.Path != "/bin/sh" {
		t.Fatalf("launch runs %s, want /bin/sh", p.Launch.Path)
	}
	cmd := shellCommand(sh, args...)
	cmd.Env = []string{"PATH=" + bin, "OUT=" + tmp}
	out, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) {
		t.Fatalf("wrapper: %v, want a non-zero exit\n%s", err, out)
	}
	if tt.want == nil {
		if exitErr.ExitCode() != 126 {
			t.Fatalf("exit %d, want 126 for a refused path\n%s", exitErr.ExitCode(), out)
		}
		if _, err := os.Stat(filepath.Join(tmp, "called")); err == nil {
			t.Fatal("a refused path was still handed on")
		}
		return
	}
	if exitErr.ExitCode() != 3 {
		t.Fatalf("exit %d, want 3 passed on from the called program\n%s", exitErr.ExitCode(), out)
	}
	if got := readNUL(t, filepath.Join(tmp, "called")); !slices.Equal(got, tt.want) {
		t.Errorf("called:\n got %q\nwant %q", got, tt.want)
	}
}

// TestLabels pins how Forgejo labels get their scheme.
func TestLabels(t *testing.T) {
	for in, want := range map[string]string{
		"ubuntu latest":           "ubuntu latest:host",
		"日本語":                     "日本語:host",
		"native:host":             "native:host",
		"debian:docker://debian":  "debian:docker://debian",
		"x?platform=linux/amd64":  "x?platform=linux/amd64",
		"lxc:lxc://debian:trixie": "lxc:lxc://debian:trixie",
	} {
		if got := forgejoLabel(in); got != want {
			t.Errorf("forgejoLabel(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestJenkinsAgentDoesNotReconnect: remoting retries a lost connection
// forever unless it is given -noReconnect, and then the agent, hence the
// machine, would never end after its build.
func TestJenkinsAgentDoesNotReconnect(t *testing.T) {
	for _, goos := range allOS {
		t.Run(string(goos), func(t *testing.T) {
			p, err := For(testJob, goos, jenkinsRunner(), testLifetime)
			if err != nil {
				t.Fatal(err)
			}
			script := launchScript(p)
			want := map[bool]string{true: " -noReconnect ", false: " \\\n  -noReconnect \\\n"}[goos == Windows]
			if !strings.Contains(script, want) {
				t.Errorf("the launch script does not pass -noReconnect as an argument of its own:\n%s", script)
			}
		})
	}
}

// TestJenkinsWorkDir: an explicit work dir is used as given.
func TestJenkinsWorkDir(t *testing.T) {
	r := jenkinsRunner()
	r.Jenkins.WorkDir = "/srv/jenkins work"
	p, err := For(testJob, Linux, r, testLifetime)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(launchScript(p), "-workDir \\\n  '/srv/jenkins work'\n") {
		t.Errorf("launch script does not use the given work dir:\n%s", launchScript(p))
	}
}

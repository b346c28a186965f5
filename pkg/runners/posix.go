package runners

import (
	"regexp"
	"strings"
)

// prepareScript runs as root (qemu-ga's user) and prepares a launch in one
// guest-exec, so that the runner starts after two round trips to the
// guest, this one and the launch: it makes the directory "$3" private
// (skipped when "$3" is empty), writes its standard input, the secret, to
// "$4" with mode 0600 (skipped when "$4" is empty), "$6", the launch
// script, to "$5" with mode 0700 and "$8", the runner's configuration, to
// "$7" with mode 0600 (skipped when "$7" is empty), all in the directory
// "$2" below "$1" (<home>/.stretchy), all owned by stretchy. The umask
// makes every file and directory private from the moment it exists.
// qemu-ga's own guest-file-open would create the files 0666 and
// root-owned. The launch script and the configuration hold no secret, so
// they may travel as arguments.
//
// "$3" (the GitHub runner's root directory, into which the runner writes
// its own credentials) becomes stretchy's with mode 0700; a symbolic link
// there, which stretchy could have put to have root chmod its target, and
// anything but a directory are refused, and a missing directory is left
// alone (the launch then fails as for any missing runner program). chown -h
// and the link check narrow, but cannot close, the window in which a
// stretchy process could swap the directory for a link before chmod, which
// follows links.
//
// stretchy owns its home, so it can put a symbolic link at any of the
// paths written below it, and root would then create, chown, chmod or
// write whatever the link points to. So the script refuses a link at
// "$1", "$2" or a file, before and after mkdir (which follows links in
// existing components), changes owners with chown -h, removes a file left
// at a file's path and creates it with noclobber, so that a link planted
// there in between makes the redirection fail instead of being followed (a
// dangling link or one to a regular file; sh opens one to a device or FIFO
// without O_EXCL). Paths above <home> belong to root and may be links
// (FreeBSD's /home is one), so they are not checked. A stretchy process
// running during the write could still swap a checked directory for a link
// before chmod, which follows links; nothing of stretchy runs yet in a
// fresh clone unless the image starts it at boot.
const prepareScript = `set -e
umask 077
u=stretchy
g=$(id -g "$u")
if [ -n "$3" ]; then
  if [ -L "$3" ]; then
    echo "stretchy: refusing to make $3 private: it is a symbolic link" >&2
    exit 1
  fi
  if [ -e "$3" ]; then
    if [ ! -d "$3" ]; then
      echo "stretchy: refusing to make $3 private: it is not a directory" >&2
      exit 1
    fi
    chown -h "$u:$g" "$3"
    chmod 0700 "$3"
  fi
fi
nolinks() {
  for p in "$1" "$2" "$3"; do
    if [ -L "$p" ]; then
      echo "stretchy: refusing to write $3: $p is a symbolic link" >&2
      exit 1
    fi
  done
}
links() {
  [ -z "$4" ] || nolinks "$1" "$2" "$4"
  nolinks "$1" "$2" "$5"
  [ -z "$7" ] || nolinks "$1" "$2" "$7"
}
links "$@"
mkdir -p "$2"
links "$@"
chown -h "$u:$g" "$1" "$2"
chmod 0700 "$1" "$2"
set -C
if [ -n "$4" ]; then
  rm -f "$4"
  cat >"$4"
  nolinks "$1" "$2" "$4"
  chown -h "$u:$g" "$4"
  chmod 0600 "$4"
fi
if [ -n "$7" ]; then
  rm -f "$7"
  printf '%s' "$8" >"$7"
  nolinks "$1" "$2" "$7"
  chown -h "$u:$g" "$7"
  chmod 0600 "$7"
fi
rm -f "$5"
printf '%s' "$6" >"$5"
nolinks "$1" "$2" "$5"
chown -h "$u:$g" "$5"
chmod 0700 "$5"
`

// checkScriptPath refuses a launch script path that is not absolute or
// holds a character a shell could act on; the wrappers below rely on it.
const checkScriptPath = `case $1 in
'' | [!/]* | *[!A-Za-z0-9_./-]*) echo "stretchy: refusing launch script path" >&2; exit 126 ;;
esac
`

// linuxLaunchScript starts the launch script "$1" as stretchy with the best
// tool the guest has; see Plan. systemd-run needs --pipe (235) and
// --collect (236), and systemd must be PID 1. --wait makes it exit with the
// runner's status.
const linuxLaunchScript = checkScriptPath + `if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  v=$(systemd-run --version 2>/dev/null) || v=
  v=${v#systemd }
  v=${v%%[!0-9]*}
  if [ "${v:-0}" -ge 236 ]; then
    exec systemd-run --quiet --wait --pipe --collect --uid=stretchy -p 'WorkingDirectory=~' "$1"
  fi
fi
if command -v sudo >/dev/null 2>&1; then
  exec sudo -n -H -u stretchy -- "$1"
fi
exec su -s /bin/sh stretchy -c "$1"
`

// freebsdLaunchScript starts the launch script "$1" as stretchy with the
// base system's su; see Plan. With -m, su keeps the small environment Launch
// sets instead of requiring a usable login shell for stretchy; the path is
// handed over as a bare word that sh and csh alike run as a program.
const freebsdLaunchScript = checkScriptPath + `exec su -m stretchy -c "$1"
`

// darwinLaunchScript starts the launch script "$1" as stretchy in
// stretchy's bootstrap namespace; see Plan.
const darwinLaunchScript = checkScriptPath + `uid=$(id -u stretchy) || exit 126
exec launchctl asuser "$uid" sudo -n -H -u stretchy -- "$1"
`

// posixPlan renders s for Linux, FreeBSD and macOS.
func posixPlan(l layout, s start) Plan {
	env := []string{"PATH=" + l.adminPath}
	base, _, purpose := s.script()
	script := l.join(l.jobDir, base+".sh")
	wrapper := map[OS]string{Linux: linuxLaunchScript, FreeBSD: freebsdLaunchScript, Darwin: darwinLaunchScript}[l.os]
	var did []string
	if s.privateDir != "" {
		did = append(did, "make "+s.name+" directory private")
	}
	var files []string
	if s.secretFile != "" {
		files = append(files, "secret")
	}
	if s.configFile != "" {
		files = append(files, "configuration")
	}
	wrote := "write " + base + " script"
	if len(files) > 0 {
		wrote = "write " + s.name + " " + strings.Join(files, ", ") + " and " + base + " script"
	}
	prep := Command{
		Path: "/bin/sh",
		Args: []string{"-c", prepareScript, "sh", l.base, l.jobDir, s.privateDir, s.secretFile, script, posixLaunchScript(l, s),
			s.configFile, s.config},
		Env:     env,
		Purpose: strings.Join(append(did, wrote), ", "),
	}
	if s.secretFile != "" {
		prep.Stdin, prep.SecretStdin = []byte(s.secret), true
	}
	prepare := []Command{prep}
	return Plan{
		Prepare: prepare,
		Launch: Command{
			Path:    "/bin/sh",
			Args:    []string{"-c", wrapper, "sh", script},
			Env:     env,
			Purpose: purpose,
		},
		Program: s.program,
		Home:    l.home,
	}
}

// posixLaunchScript is the script stretchy runs. It holds no secret: a
// secret it needs is read from its file at run time.
func posixLaunchScript(l layout, s start) string {
	_, comment, _ := s.script()
	var b strings.Builder
	b.WriteString("#!/bin/sh\n")
	b.WriteString("# " + comment + " Written by the stretchy libvirt worker.\n")
	b.WriteString("umask 022\n")
	b.WriteString("HOME=" + shellQuote(l.home) + "\n")
	b.WriteString("USER=" + User + "\n")
	b.WriteString("LOGNAME=" + User + "\n")
	b.WriteString("PATH=" + shellQuote(l.userPath) + "\n")
	b.WriteString("SHELL=${SHELL:-/bin/sh}\n")
	b.WriteString("export HOME USER LOGNAME PATH SHELL\n")
	b.WriteString("cd \"$HOME\" || exit 1\n")
	if s.secretEnv != "" {
		f := shellQuote(s.secretFile)
		b.WriteString(s.secretEnv + "=$(cat " + f + ") || exit 1\n")
		b.WriteString("export " + s.secretEnv + "\n")
		b.WriteString("rm -f " + f + "\n")
	}
	b.WriteString("exec " + shellQuote(s.exe))
	for _, a := range s.args {
		b.WriteString(" \\\n  " + shellQuote(a))
	}
	b.WriteString("\n")
	return b.String()
}

// plainWord matches words no POSIX shell treats specially in argument
// position. "=" is left out so that no word can look like an assignment.
var plainWord = regexp.MustCompile(`^[A-Za-z0-9_@%+:,./-]+$`)

// shellQuote quotes s as one word for a POSIX shell: inside single quotes
// every byte but ' stands for itself, and ' is written as '\”. It cannot
// represent NUL, which For refuses.
func shellQuote(s string) string {
	if plainWord.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

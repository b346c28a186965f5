package runners

import (
	"regexp"
	"strings"
)

// writeFileScript runs as root (qemu-ga's user) and writes its standard
// input to "$3" with mode "$4", in the directory "$2" below "$1"
// (<home>/.stretchy), all owned by stretchy. The umask makes every file and
// directory private from the moment it exists. qemu-ga's own
// guest-file-open would create the file 0666 and root-owned.
//
// stretchy owns its home, so it can put a symbolic link at any of the three
// paths, and root would then create, chown, chmod or write whatever the link
// points to. So the script refuses a link at any of them, before and after
// mkdir (which follows links in existing components), changes owners with
// chown -h, removes a file left at "$3" and creates it with noclobber, so
// that a link planted there in between makes the redirection fail instead
// of being followed (a dangling link or one to a regular file; sh opens
// one to a device or FIFO without O_EXCL). Paths above <home> belong to
// root and may be links (FreeBSD's /home is one), so they are not checked.
// A stretchy process running during the write could still swap a checked
// directory for a link before chmod, which follows links; nothing of
// stretchy runs yet in a fresh clone unless the image starts it at boot.
const writeFileScript = `set -e
umask 077
u=stretchy
g=$(id -g "$u")
nolinks() {
  for p in "$1" "$2" "$3"; do
    if [ -L "$p" ]; then
      echo "stretchy: refusing to write $3: $p is a symbolic link" >&2
      exit 1
    fi
  done
}
nolinks "$@"
mkdir -p "$2"
nolinks "$@"
chown -h "$u:$g" "$1" "$2"
chmod 0700 "$1" "$2"
rm -f "$3"
set -C
cat >"$3"
nolinks "$@"
chown -h "$u:$g" "$3"
chmod "$4" "$3"
`

// privateDirScript runs as root and makes the directory "$1" owned by
// stretchy and mode 0700, so that no other user can read what the runner
// writes into it. It refuses a symbolic link, which stretchy could have put
// there to have root chmod its target, and anything but a directory;
// nothing at the path is left alone, and the launch then fails as for any
// missing runner program. chown -h and the link check narrow, but cannot
// close, the window in which a stretchy process could swap the directory
// for a link before chmod, which follows links.
const privateDirScript = `set -e
if [ -L "$1" ]; then
  echo "stretchy: refusing to make $1 private: it is a symbolic link" >&2
  exit 1
fi
[ -e "$1" ] || exit 0
if [ ! -d "$1" ]; then
  echo "stretchy: refusing to make $1 private: it is not a directory" >&2
  exit 1
fi
chown -h "stretchy:$(id -g stretchy)" "$1"
chmod 0700 "$1"
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
	write := func(file, mode string, content []byte, secret bool, purpose string) Command {
		return Command{
			Path:        "/bin/sh",
			Args:        []string{"-c", writeFileScript, "sh", l.base, l.jobDir, file, mode},
			Env:         env,
			Stdin:       content,
			SecretStdin: secret,
			Purpose:     purpose,
		}
	}
	wrapper := map[OS]string{Linux: linuxLaunchScript, FreeBSD: freebsdLaunchScript, Darwin: darwinLaunchScript}[l.os]
	var prepare []Command
	if s.privateDir != "" {
		prepare = append(prepare, Command{
			Path:    "/bin/sh",
			Args:    []string{"-c", privateDirScript, "sh", s.privateDir},
			Env:     env,
			Purpose: "make " + s.name + " directory private",
		})
	}
	if s.secretFile != "" {
		prepare = append(prepare, write(s.secretFile, "0600", []byte(s.secret), true, "write "+s.name+" secret"))
	}
	prepare = append(prepare, write(script, "0700", []byte(posixLaunchScript(l, s)), false, "write "+base+" script"))
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

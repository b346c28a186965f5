package runners

import (
	"strings"
)

// powershell is Windows PowerShell 5.1, which every supported Windows has.
const powershell = `C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe`

// windowsPlan renders s for Windows. The QEMU-GA service runs as stretchy
// there, so nothing changes users. Commands keep the service's environment
// (Env nil): replacing it would drop SystemRoot and friends, without which
// PowerShell and .NET do not work.
func windowsPlan(l layout, s start) Plan {
	base, _, purpose := s.script()
	script := l.join(l.jobDir, base+".ps1")
	// A UTF-8 byte order mark makes PowerShell 5.1 read the script as
	// UTF-8 rather than in the ANSI code page.
	ps1 := append([]byte("\ufeff"), windowsLaunchScript(l, s)...)
	var prepare []Command
	if s.privateDir != "" {
		prepare = append(prepare, windowsPrivateDir(s.privateDir, "make "+s.name+" directory private"))
	}
	if s.secretFile != "" {
		prepare = append(prepare, windowsWrite(l, s.secretFile, []byte(s.secret), true, "write "+s.name+" secret"))
	}
	if s.configFile != "" {
		prepare = append(prepare, windowsWrite(l, s.configFile, []byte(s.config), false, "write "+s.name+" configuration"))
	}
	prepare = append(prepare, windowsWrite(l, script, ps1, false, "write "+base+" script"))
	return Plan{
		Prepare: prepare,
		Launch: Command{
			Path:    powershell,
			Args:    []string{"-NoLogo", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File", script},
			Purpose: purpose,
		},
		Program: s.program,
		Home:    l.home,
	}
}

// windowsWrite writes its standard input to file in the job directory. The
// directory's ACL is replaced by one that grants stretchy alone access, so
// the file inherits it; the profile directory above is private to stretchy
// already. Standard input is copied as bytes: a TextReader such as
// [Console]::In would decode it in the console's OEM code page. The command
// text holds no double quote, which Windows command-line quoting would have
// to escape.
func windowsWrite(l layout, file string, content []byte, secret bool, purpose string) Command {
	cmd := strings.Join([]string{
		"$ErrorActionPreference = 'Stop'",
		"$d = " + psQuote(l.jobDir),
		"$f = " + psQuote(file),
		"[void](New-Item -ItemType Directory -Force -Path $d)",
		"$a = New-Object System.Security.AccessControl.DirectorySecurity",
		"$a.SetAccessRuleProtection($true, $false)",
		"$u = [System.Security.Principal.WindowsIdentity]::GetCurrent().User",
		"$a.AddAccessRule((New-Object System.Security.AccessControl.FileSystemAccessRule($u, 'FullControl', 'ContainerInherit, ObjectInherit', 'None', 'Allow')))",
		"Set-Acl -LiteralPath $d -AclObject $a",
		"$m = New-Object System.IO.MemoryStream",
		"[Console]::OpenStandardInput().CopyTo($m)",
		"[System.IO.File]::WriteAllBytes($f, $m.ToArray())",
	}, "; ")
	return Command{
		Path:        powershell,
		Args:        []string{"-NoLogo", "-NoProfile", "-NonInteractive", "-Command", cmd},
		Stdin:       content,
		SecretStdin: secret,
		Purpose:     purpose,
	}
}

// windowsPrivateDir gives dir a protected ACL (nothing inherited from
// above, such as read access for BUILTIN\Users on C:\) that grants full
// control to stretchy, the QEMU-GA service's user, to SYSTEM and to
// BUILTIN\Administrators alone, inherited by everything in it; Windows
// applies the inherited entries to what is already there. It refuses a
// reparse point (symbolic link or junction) and anything but a directory,
// and leaves a missing path alone. stretchy must own dir or have full
// control of it to change its ACL. SIDs are used rather than names, which
// Windows translates. The command text holds no double quote.
func windowsPrivateDir(dir, purpose string) Command {
	cmd := strings.Join([]string{
		"$ErrorActionPreference = 'Stop'",
		"$d = " + psQuote(dir),
		"$i = Get-Item -LiteralPath $d -Force -ErrorAction SilentlyContinue",
		"if ($null -eq $i) { exit 0 }",
		"if ($i.Attributes -band [System.IO.FileAttributes]::ReparsePoint) { throw ('stretchy: refusing to make ' + $d + ' private: it is a symbolic link or junction') }",
		"if (-not $i.PSIsContainer) { throw ('stretchy: refusing to make ' + $d + ' private: it is not a directory') }",
		"$a = New-Object System.Security.AccessControl.DirectorySecurity",
		"$a.SetAccessRuleProtection($true, $false)",
		"$u = [System.Security.Principal.WindowsIdentity]::GetCurrent().User",
		"$system = New-Object System.Security.Principal.SecurityIdentifier('S-1-5-18')",
		"$admins = New-Object System.Security.Principal.SecurityIdentifier('S-1-5-32-544')",
		"foreach ($s in @($u, $system, $admins)) { $a.AddAccessRule((New-Object System.Security.AccessControl.FileSystemAccessRule($s, 'FullControl', 'ContainerInherit, ObjectInherit', 'None', 'Allow'))) }",
		"Set-Acl -LiteralPath $d -AclObject $a",
	}, "; ")
	return Command{
		Path:    powershell,
		Args:    []string{"-NoLogo", "-NoProfile", "-NonInteractive", "-Command", cmd},
		Purpose: purpose,
	}
}

// windowsLaunchScript is the PowerShell script the runner is started by. It
// builds the runner's command line itself with windowsArgs, because Windows
// PowerShell 5.1 passes arguments holding double quotes to native programs
// without escaping them.
func windowsLaunchScript(l layout, s start) string {
	_, comment, _ := s.script()
	lines := []string{
		"# " + comment + " Written by the stretchy libvirt worker.",
		"$ErrorActionPreference = 'Stop'",
		"Set-Location -LiteralPath " + psQuote(l.home),
	}
	if s.secretEnv != "" {
		lines = append(lines,
			"$f = "+psQuote(s.secretFile),
			"$env:"+s.secretEnv+" = [System.IO.File]::ReadAllText($f).Trim()",
			"Remove-Item -LiteralPath $f -Force",
		)
	}
	lines = append(lines,
		"$i = New-Object System.Diagnostics.ProcessStartInfo",
		"$i.FileName = "+psQuote(s.exe),
		"$i.Arguments = "+psQuote(windowsArgs(s.args)),
		"$i.WorkingDirectory = "+psQuote(l.home),
		"$i.UseShellExecute = $false",
		"$p = [System.Diagnostics.Process]::Start($i)",
		"$p.WaitForExit()",
		"exit $p.ExitCode",
	)
	return strings.Join(lines, "\r\n") + "\r\n"
}

// psQuote quotes s as a PowerShell single-quoted string, in which nothing is
// expanded. PowerShell also ends such a string at the typographic single
// quotes U+2018, U+2019, U+201A and U+201B, so each of them is doubled too.
func psQuote(s string) string {
	var b strings.Builder
	b.WriteByte('\'')
	for _, r := range s {
		switch r {
		case '\'', '\u2018', '\u2019', '\u201a', '\u201b':
			b.WriteRune(r)
		}
		b.WriteRune(r)
	}
	b.WriteByte('\'')
	return b.String()
}

// windowsArgs joins args into a command line that CommandLineToArgvW and
// the Microsoft C runtime, which Go programs and java.exe follow, split back
// into args.
func windowsArgs(args []string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = windowsArg(a)
	}
	return strings.Join(quoted, " ")
}

// windowsArg quotes one argument: backslashes are literal unless they
// precede a double quote, so those and the ones before the closing quote
// are doubled, and a double quote is escaped with a backslash.
func windowsArg(a string) string {
	if a != "" && !strings.ContainsAny(a, " \t\n\v\"") {
		return a
	}
	var b strings.Builder
	b.WriteByte('"')
	slashes := 0
	for i := 0; i < len(a); i++ {
		switch c := a[i]; c {
		case '\\':
			slashes++
			continue
		case '"':
			b.WriteString(strings.Repeat(`\`, 2*slashes+1))
		default:
			b.WriteString(strings.Repeat(`\`, slashes))
		}
		slashes = 0
		b.WriteByte(a[i])
	}
	b.WriteString(strings.Repeat(`\`, 2*slashes))
	b.WriteByte('"')
	return b.String()
}

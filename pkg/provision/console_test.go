package provision

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

const testConsole = "/var/log/stretchy/console/stretchy-j.log"

func ptySerial(port uint) libvirtxml.DomainSerial {
	return libvirtxml.DomainSerial{
		Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
		Target: &libvirtxml.DomainSerialTarget{Port: &port},
	}
}

func console(typ string) libvirtxml.DomainConsole {
	c := libvirtxml.DomainConsole{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}}
	if typ != "-" {
		c.Target = &libvirtxml.DomainConsoleTarget{Type: typ}
	}
	return c
}

// chardevLogs lists the log of each serial port and console of d,
// "serialN=FILE"/"consoleN=FILE", or "…=none".
func chardevLogs(d *libvirtxml.Domain) []string {
	var out []string
	add := func(kind string, i int, l *libvirtxml.DomainChardevLog) {
		s := kind + string(rune('0'+i)) + "="
		switch {
		case l == nil:
			s += "none"
		case l.Append != "off":
			s += l.File + " append=" + l.Append
		default:
			s += l.File
		}
		out = append(out, s)
	}
	for i, s := range d.Devices.Serials {
		add("serial", i, s.Log)
	}
	for i, c := range d.Devices.Consoles {
		add("console", i, c.Log)
	}
	return out
}

// TestCloneXMLConsoleLogs checks which log file each serial port and
// console of a clone writes, and that Clone records the same files.
func TestCloneXMLConsoleLogs(t *testing.T) {
	withDevices := func(serials []libvirtxml.DomainSerial, consoles ...libvirtxml.DomainConsole) *libvirtxml.Domain {
		img := image(nil)
		img.Devices.Serials, img.Devices.Consoles = serials, consoles
		return img
	}
	const dir = "/var/log/stretchy/console/"
	tests := []struct {
		name      string
		image     *libvirtxml.Domain
		main      string
		wantLogs  []string
		wantFiles []string
	}{
		{
			name:      "the tiny guest: a pty serial port and its console",
			image:     withDevices([]libvirtxml.DomainSerial{ptySerial(0)}, console("serial")),
			main:      testConsole,
			wantLogs:  []string{"serial0=" + testConsole, "console0=" + testConsole},
			wantFiles: []string{testConsole},
		},
		{
			name: "two serial ports, the image's log replaced, a virtio console",
			image: func() *libvirtxml.Domain {
				img := withDevices([]libvirtxml.DomainSerial{ptySerial(0), ptySerial(1)}, console("-"), console("virtio"))
				img.Devices.Serials[0].Log = &libvirtxml.DomainChardevLog{File: "/var/log/libvirt/qemu/tiny-serial0.log", Append: "on"}
				return img
			}(),
			main: testConsole,
			wantLogs: []string{"serial0=" + testConsole, "serial1=" + dir + "stretchy-j.serial1.log",
				"console0=" + testConsole, "console1=" + dir + "stretchy-j.console1.log"},
			wantFiles: []string{testConsole, dir + "stretchy-j.serial1.log", dir + "stretchy-j.console1.log"},
		},
		{
			name:      "a virtio console only",
			image:     withDevices(nil, console("virtio")),
			main:      testConsole,
			wantLogs:  []string{"console0=" + testConsole},
			wantFiles: []string{testConsole},
		},
		{
			name:     "no console at all",
			image:    withDevices(nil),
			main:     testConsole,
			wantLogs: nil,
		},
		{
			name: "no console directory keeps the image's logs, renamed",
			image: func() *libvirtxml.Domain {
				img := withDevices([]libvirtxml.DomainSerial{ptySerial(0)}, console("serial"))
				img.Devices.Serials[0].Log = &libvirtxml.DomainChardevLog{File: "/var/log/libvirt/qemu/tiny-serial0.log", Append: "on"}
				return img
			}(),
			wantLogs: []string{"serial0=/var/log/libvirt/qemu/stretchy-j-serial0.log append=on", "console0=none"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.image.OS.Type.Type = "hvm"
			got, err := transform(tt.image, CloneLinked, nil, rand.Reader, func(p *clonePlan) { p.ConsoleLog = tt.main })
			if err != nil {
				t.Fatal(err)
			}
			if logs := chardevLogs(got); !reflect.DeepEqual(logs, tt.wantLogs) {
				t.Errorf("logs\n got %q\nwant %q", logs, tt.wantLogs)
			}
			// What Clone records, from the image, before the XML is built.
			if files := consoleLogs(tt.image, tt.main, false); !reflect.DeepEqual(files, tt.wantFiles) {
				t.Errorf("recorded files %q, want %q", files, tt.wantFiles)
			}
			for _, f := range tt.wantFiles {
				if !ownedConsolePath("j", f) || ownedConsolePath("j-2", f) {
					t.Errorf("%s is not owned by job j alone", f)
				}
			}
		})
	}
}

func TestConsoleLogPath(t *testing.T) {
	got, err := ConsoleLogPath("/var/log/stretchy-worker/console", "job-1")
	if err != nil || got != "/var/log/stretchy-worker/console/stretchy-job-1.log" {
		t.Errorf("ConsoleLogPath = %q, %v", got, err)
	}
	for _, bad := range []string{"", "../../etc/shadow", "a/b", "a.b"} {
		if got, err := ConsoleLogPath("/d", bad); !errors.Is(err, ErrInvalidJobID) {
			t.Errorf("ConsoleLogPath(%q) = %q, %v; want ErrInvalidJobID", bad, got, err)
		}
	}
}

func TestOwnedConsolePath(t *testing.T) {
	tests := []struct {
		path string
		job  string
		want bool
	}{
		{"/d/stretchy-j.log", "j", true},
		{"/d/stretchy-j.log.0", "j", true},
		{"/d/stretchy-j.serial1.log.2", "j", true},
		{"/d/stretchy-j.console3.log", "j", true},
		{"/d/stretchy-j-serial1.log", "j", false}, // job j-serial1's
		{"/d/stretchy-j-serial1.log", "j-serial1", true},
		{"/d/stretchy-j.log", "j-serial1", false},
		{"/d/stretchy-j.txt", "j", false},
		{"/d/stretchy-j.log.tmp", "j", false},
		{"/d/stretchy-j.other1.log", "j", false},
		{"/d/stretchy-jj.log", "j", false},
	}
	for _, tt := range tests {
		if got := ownedConsolePath(tt.job, tt.path); got != tt.want {
			t.Errorf("ownedConsolePath(%q, %q) = %v, want %v", tt.job, tt.path, got, tt.want)
		}
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestConsoleTail(t *testing.T) {
	const secret = "s3cr3t-T0KEN"
	lines := func(from, to int) string {
		var b strings.Builder
		for i := from; i <= to; i++ {
			b.WriteString("line " + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + "\r\n")
		}
		return b.String()
	}
	tests := []struct {
		name     string
		log      string
		backup   string // path.0, if set
		maxLines int
		maxBytes int
		secrets  []string
		want     string
	}{
		{name: "short log, line ends", log: "boot\r\nok\r\n", maxLines: 40, maxBytes: 4096, want: "boot\nok\n"},
		{name: "last lines", log: "a\nb\nc\nd\n", maxLines: 2, maxBytes: 4096, want: "c\nd\n"},
		{name: "unfinished last line counts", log: "a\nb\nc", maxLines: 2, maxBytes: 4096, want: "b\nc"},
		{name: "bytes cut at a line break", log: "first line\nsecond line\nthird\n", maxLines: 40, maxBytes: 16, want: "third\n"},
		{name: "one long line is cut", log: strings.Repeat("y", 100), maxLines: 40, maxBytes: 10, want: strings.Repeat("y", 10)},
		{name: "cut in a rune", log: "ä" + strings.Repeat("é", 3), maxLines: 40, maxBytes: 5, want: "éé"},
		{name: "escape sequences and control characters", log: "\x1b[0;32mOK\x1b[0m \x1b]0;title\x07done\x1b(B\a\x00\tend\r\n",
			maxLines: 40, maxBytes: 4096, want: "OK done\tend\n"},
		{name: "invalid UTF-8", log: "bad \xff byte\n", maxLines: 40, maxBytes: 4096, want: "bad ? byte\n"},
		{name: "secrets", log: "token=" + secret + "\r\nagain " + secret + secret + "\n", maxLines: 40, maxBytes: 4096,
			secrets: []string{secret, ""}, want: "token=[REDACTED]\nagain [REDACTED][REDACTED]\n"},
		{name: "a secret cut by maxBytes is replaced before", log: "x " + secret + "\n", maxLines: 40, maxBytes: 8,
			secrets: []string{secret}, want: "DACTED]\n"},
		{name: "rolled over: the end of the backup first", backup: lines(0, 30), log: lines(31, 35), maxLines: 8, maxBytes: 4096,
			want: strings.ReplaceAll(lines(28, 35), "\r", "")},
		{name: "a secret across the roll-over", backup: "before\nleaks " + secret[:5], log: secret[5:] + " here\n", maxLines: 40, maxBytes: 4096,
			secrets: []string{secret}, want: "before\nleaks [REDACTED] here\n"},
		{name: "empty", log: "", maxLines: 40, maxBytes: 4096, want: ""},
		{name: "no lines wanted", log: "a\n", maxLines: 0, maxBytes: 4096, want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "stretchy-j.log")
			writeFile(t, path, tt.log)
			if tt.backup != "" {
				writeFile(t, path+".0", tt.backup)
			}
			got, err := ConsoleTail(path, tt.maxLines, tt.maxBytes, tt.secrets...)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("ConsoleTail = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestConsoleTailLongLog reads the end of a log far longer than what it
// reads, with a secret on the boundary of what it reads.
func TestConsoleTailLongLog(t *testing.T) {
	const secret = "0123456789abcdef0123456789abcdef"
	var b strings.Builder
	for b.Len() < 1<<20 {
		b.WriteString("kernel: something happened " + secret + " at boot\r\n")
	}
	for i := range 50 {
		b.WriteString("tail line " + string(rune('A'+i%26)) + "\r\n")
	}
	path := filepath.Join(t.TempDir(), "stretchy-j.log")
	writeFile(t, path, b.String())
	got, err := ConsoleTail(path, 40, 4096, secret)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(got, "\n"); n != 40 || !strings.HasPrefix(got, "tail line K\n") || strings.Contains(got, "\r") {
		t.Errorf("got %d lines, want the last 40 tail lines:\n%s", n, got)
	}
	got, err = ConsoleTail(path, 1000, 4096, secret)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > 4096 || strings.Contains(got, secret[:8]) || strings.Contains(got, secret[len(secret)-8:]) || !strings.Contains(got, "[REDACTED]") {
		t.Errorf("%d bytes, or a part of the secret left:\n%s", len(got), got)
	}
}

func TestConsoleTailErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := ConsoleTail(filepath.Join(dir, "none.log"), 40, 4096); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing log: %v, want fs.ErrNotExist", err)
	}
	if _, err := ConsoleTail(dir, 40, 4096); err == nil {
		t.Error("a directory read as a log")
	}
}

func TestRemoveConsoleLogs(t *testing.T) {
	dir := t.TempDir()
	mine := []string{"stretchy-j.log", "stretchy-j.log.0", "stretchy-j.log.2", "stretchy-j.serial1.log", "stretchy-j.serial1.log.0"}
	others := []string{"stretchy-j-2.log", "stretchy-j-serial1.log", "stretchy-jj.log", "notes.txt", "stretchy-j.log.bak"}
	for _, f := range append(slices.Clone(mine), others...) {
		writeFile(t, filepath.Join(dir, f), "x")
	}
	left := func() []string {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}
	want := slices.Sorted(slices.Values(others))

	// As Remove does it, from the files the metadata records.
	recorded := []string{filepath.Join(dir, "stretchy-j.log"), filepath.Join(dir, "stretchy-j.serial1.log"), filepath.Join(dir, "stretchy-j-2.log")}
	err := removeConsoleLogs("j", recorded)
	if err == nil || !strings.Contains(err.Error(), "stretchy-j-2.log") {
		t.Errorf("removeConsoleLogs = %v; want it to refuse another job's file", err)
	}
	if got := left(); !reflect.DeepEqual(got, want) {
		t.Errorf("left %q, want %q", got, want)
	}

	// By the naming rule.
	for _, f := range mine {
		writeFile(t, filepath.Join(dir, f), "x")
	}
	if err := RemoveConsoleLogs(dir, "j"); err != nil {
		t.Fatal(err)
	}
	if got := left(); !reflect.DeepEqual(got, want) {
		t.Errorf("left %q, want %q", got, want)
	}
	if err := RemoveConsoleLogs(filepath.Join(dir, "missing"), "j"); err != nil {
		t.Errorf("RemoveConsoleLogs in a missing directory: %v", err)
	}
	if err := RemoveConsoleLogs(dir, "../x"); !errors.Is(err, ErrInvalidJobID) {
		t.Errorf("RemoveConsoleLogs(../x) = %v", err)
	}
}

// TestConsoleTailEncodedSecrets: a guest that prints a secret encoded
// (base64, JSON, a URL) does not get it past the scrubbing either.
func TestConsoleTailEncodedSecrets(t *testing.T) {
	const secret = `tok+en/"s3cr3t"?&=<x>!`
	jsonEscape := func(s string) string { b, _ := json.Marshal(s); return string(b[1 : len(b)-1]) }
	tests := []struct{ name, form string }{
		{"base64", base64.StdEncoding.EncodeToString([]byte(secret))},
		{"URL-safe base64", base64.URLEncoding.EncodeToString([]byte(secret))},
		{"raw URL-safe base64", base64.RawURLEncoding.EncodeToString([]byte(secret))},
		{"JSON", jsonEscape(secret)},
		{"query escaped", url.QueryEscape(secret)},
		{"path escaped", url.PathEscape(secret)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "stretchy-j.log")
			writeFile(t, path, "config: "+tt.form+"\r\n")
			got, err := ConsoleTail(path, 40, 4096, secret)
			if err != nil {
				t.Fatal(err)
			}
			if got != "config: [REDACTED]\n" {
				t.Errorf("ConsoleTail = %q, want the %s form redacted", got, tt.name)
			}
		})
	}
}

// TestConsoleTailRefusesLinks: a symbolic link in the console directory,
// at a log or at its backup, is not followed to what it points at.
func TestConsoleTailRefusesLinks(t *testing.T) {
	tests := []struct {
		name string
		link string // which of the log and its backup is a link
	}{
		{"the log", "stretchy-j.log"},
		{"its backup", "stretchy-j.log.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			target := filepath.Join(t.TempDir(), "shadow")
			writeFile(t, target, "root:$6$hash:19000:0:99999:7:::\n")
			path := filepath.Join(dir, "stretchy-j.log")
			if tt.link != "stretchy-j.log" {
				writeFile(t, path, "short\n")
			}
			if err := os.Symlink(target, filepath.Join(dir, tt.link)); err != nil {
				t.Fatal(err)
			}
			got, err := ConsoleTail(path, 40, 4096)
			if err == nil || strings.Contains(got, "root:") {
				t.Fatalf("ConsoleTail = %q, %v; want the link refused", got, err)
			}
		})
	}
}

func TestConsoleLogKeys(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"stretchy-a.log", "stretchy-a.log.1", "stretchy-b.serial1.log", "stretchy-c.console2.log.0",
		"stretchy-.log", "stretchy-d.log.x", "stretchy-e.txt", "image.log", "stretchy-f_g.log"} {
		writeFile(t, filepath.Join(dir, n), "")
	}
	got, err := ConsoleLogKeys(dir)
	if want := []string{"a", "b", "c", "f_g"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("ConsoleLogKeys = %q, %v; want %q", got, err, want)
	}
	if got, err := ConsoleLogKeys(filepath.Join(dir, "missing")); err != nil || got != nil {
		t.Errorf("ConsoleLogKeys of a missing directory = %q, %v", got, err)
	}
}

// TestCheckConsoleDir: the console directory must be the worker's alone,
// since what is in it is read and deleted by name.
func TestCheckConsoleDir(t *testing.T) {
	uid := os.Geteuid()
	tests := []struct {
		name  string
		setup func(t *testing.T, path string)
		uid   int // the worker's
		want  string
	}{
		{"the worker's, mode 0700", mkdir(0o700), uid, ""},
		{"group may read", mkdir(0o750), uid, ""},
		{"group may write", mkdir(0o770), uid, "group or others may write to it"},
		{"anyone may write", mkdir(0o777), uid, "group or others may write to it"},
		{"anyone may write, sticky", mkdir(os.ModeSticky | 0o777), uid, "group or others may write to it"},
		{"another user's", mkdir(0o700), uid + 1, "not the worker's"},
		{"a symbolic link", func(t *testing.T, path string) {
			real := filepath.Join(t.TempDir(), "real")
			mkdir(0o700)(t, real)
			if err := os.Symlink(real, path); err != nil {
				t.Fatal(err)
			}
		}, uid, "is a symbolic link"},
		{"a file", func(t *testing.T, path string) { writeFile(t, path, "") }, uid, "not a directory"},
		{"missing", func(*testing.T, string) {}, uid, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "console")
			tt.setup(t, path)
			err := checkConsoleDir(path, tt.uid)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("checkConsoleDir = %v, want it accepted", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("checkConsoleDir = %v, want %q", err, tt.want)
			}
		})
	}
	if err := CheckConsoleDir(t.TempDir()); err != nil {
		t.Errorf("CheckConsoleDir of a new directory of the test's own = %v", err)
	}
}

// mkdir makes a directory with exactly mode, whatever the umask.
func mkdir(mode os.FileMode) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		t.Helper()
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode&os.ModePerm|mode&os.ModeSticky); err != nil {
			t.Fatal(err)
		}
	}
}

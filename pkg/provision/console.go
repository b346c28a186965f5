package provision

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"unicode/utf8"

	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/redact"
)

// Console logs. A clone's serial ports and consoles write everything the
// guest prints to files of the machine in a directory the worker chooses
// (Spec.ConsoleDir), through libvirt's <log file=... append='off'/>. With
// libvirt's default stdio_handler "logd", virtlogd writes these files: it
// creates them mode 0600, owned by its user (root), and rolls a file over
// at its max_size (2 MiB by default) into FILE.0, FILE.1 … keeping
// max_backups of them (3 by default), so one device's log never takes more
// than (max_backups + 1) × max_size, 8 MiB with the defaults
// (/etc/libvirt/virtlogd.conf). With stdio_handler "file" QEMU writes them
// itself, without a bound.

// ConsoleLogPath returns the log file of the main console of a machine in
// dir: dir/stretchy-<key>.log, key being the machine's key (Machine.Key:
// the job id of a cold machine). Clone writes the log of a machine built
// with Spec.ConsoleDir dir there, and ConsoleTail reads it. It refuses an
// invalid key, which could name a file outside dir.
func ConsoleLogPath(dir, key string) (string, error) {
	if !messages.ValidMachineKey(key) {
		return "", fmt.Errorf("console log of machine %q: %w", key, ErrInvalidJobID)
	}
	return filepath.Join(dir, DomainName(key)+".log"), nil
}

// consoleLogFile returns the log file of another character device than
// the main console of a machine, given the main console's file main:
// main with ".serial<i>" or ".console<i>" before ".log". Machine keys hold
// no dot, so no other machine's file has such a name.
func consoleLogFile(main, kind string, index int) string {
	return strings.TrimSuffix(main, ".log") + fmt.Sprintf(".%s%d.log", kind, index)
}

// consoleLogPattern matches the file names ConsoleLogPath and
// consoleLogFile give a machine's logs, and virtlogd their backups: the
// domain name, an optional .serial<i> or .console<i>, ".log", an
// optional .<n>.
var consoleLogPattern = regexp.MustCompile(`^([^.]+)(\.(?:serial|console)[0-9]+)?\.log(\.[0-9]+)?$`)

// ownedConsolePath reports whether path has the name of a console log, or
// of a backup of one, of the machine with key. Remove deletes no other
// file.
func ownedConsolePath(key, path string) bool {
	m := consoleLogPattern.FindStringSubmatch(filepath.Base(path))
	return m != nil && m[1] == DomainName(key)
}

// isSerialAlias reports whether console c of a definition with serials
// stands for the first serial port instead of being a device of its own:
// libvirt treats the first <console> of target type serial (or none) of an
// HVM guest so, and discards its own settings.
func isSerialAlias(d *libvirtxml.Domain, index int, c *libvirtxml.DomainConsole) bool {
	if index != 0 || d.OS == nil || d.OS.Type == nil || d.OS.Type.Type != "hvm" {
		return false
	}
	return c.Target == nil || c.Target.Type == "" || c.Target.Type == "serial"
}

// consoleLogs assigns a log file to every serial port and console of d
// whose output is its own, given the main console's file main: the first
// serial port (else the first console) writes to main; the others to
// files named after it (consoleLogFile). With set, it puts them into d as
// <log append='off'/>, replacing the image's logs; a console that stands
// for the first serial port gets that port's. It returns the files in
// the order of d's devices, main first.
func consoleLogs(d *libvirtxml.Domain, main string, set bool) []string {
	if d.Devices == nil || main == "" {
		return nil
	}
	var files []string
	log := func(file string) *libvirtxml.DomainChardevLog {
		return &libvirtxml.DomainChardevLog{File: file, Append: "off"}
	}
	for i := range d.Devices.Serials {
		file := consoleLogFile(main, "serial", i)
		if i == 0 {
			file = main
		}
		files = append(files, file)
		if set {
			d.Devices.Serials[i].Log = log(file)
		}
	}
	for i := range d.Devices.Consoles {
		c := &d.Devices.Consoles[i]
		var file string
		switch {
		case len(d.Devices.Serials) > 0 && isSerialAlias(d, i, c):
			if set {
				c.Log = log(main)
			}
			continue
		case len(d.Devices.Serials) == 0 && i == 0:
			file = main
		default:
			file = consoleLogFile(main, "console", i)
		}
		files = append(files, file)
		if set {
			c.Log = log(file)
		}
	}
	return files
}

// ConsoleTail returns the end of the console log at path, as a failed
// event's console field wants it (docs/protocol.md 3.5): its last maxLines
// lines, of at most maxBytes bytes in all (less what precedes the first
// line break of those bytes, unless that would leave nothing), with line
// ends as "\n" (carriage returns and terminal escape sequences removed),
// invalid UTF-8 replaced by "?", and every occurrence of each of secrets,
// in any form redact.New lists, replaced by "[REDACTED]" before anything
// is cut, so that no part of a secret is left. It reads the backup virtlogd rolled the log over into,
// path.0, too when the end of the log is not enough.
//
// It returns an error wrapping fs.ErrNotExist when there is no log (the
// machine has no serial console, or was never started), and
// fs.ErrPermission when the caller may not read it (virtlogd's files are
// root's, mode 0600).
func ConsoleTail(path string, maxLines, maxBytes int, secrets ...string) (string, error) {
	if maxLines <= 0 || maxBytes <= 0 {
		return "", nil
	}
	sc := redact.New(secrets...)
	longest := sc.Longest()
	// Enough raw bytes that the normalized, scrubbed text normally holds
	// maxBytes after the first longest bytes, which may be the cut end of
	// a secret and are dropped: carriage returns and escape sequences
	// shrink what is read.
	want := int64(4*maxBytes + 2*longest + 4096)
	data, complete, err := readTail(path, want)
	if err != nil {
		return "", fmt.Errorf("console log: %w", err)
	}
	if complete && int64(len(data)) < want {
		// The log may have rolled over lately: its end is in path.0.
		older, olderComplete, err := readTail(path+".0", want-int64(len(data)))
		switch {
		case err == nil:
			data = append(older, data...)
			_, statErr := os.Stat(path + ".1")
			complete = olderComplete && errors.Is(statErr, fs.ErrNotExist)
		case !errors.Is(err, fs.ErrNotExist):
			return "", fmt.Errorf("console log: %w", err)
		}
	}
	text := []byte(sc.Scrub(string(normalizeConsole(data))))
	if !complete {
		// The read began inside the log: its first bytes may be the end
		// of a secret, which the replacement above did not see whole.
		drop := min(longest, len(text))
		text = text[drop:]
		if i := bytes.IndexByte(text, '\n'); i >= 0 {
			text = text[i+1:]
		} else {
			text = nil
		}
	}
	return string(lastLines(text, maxLines, maxBytes)), nil
}

// readTail returns the last n bytes of the file at path, and whether that
// is the whole file. It does not follow a symbolic link at path (the
// directory is the worker's, CheckConsoleDir, but the name is the
// machine's) and does not wait for a writer to open a FIFO there; only a
// regular file is read.
func readTail(path string, n int64) ([]byte, bool, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, false, err
	}
	if !fi.Mode().IsRegular() {
		return nil, false, fmt.Errorf("%s is not a regular file", path)
	}
	start := max(fi.Size()-n, 0)
	data, err := io.ReadAll(io.NewSectionReader(f, start, fi.Size()-start))
	if err != nil {
		return nil, false, err
	}
	return data, start == 0, nil
}

// normalizeConsole turns what a serial console carries into lines of text:
// carriage returns and other control characters but tab and line feed go,
// as do terminal escape sequences (ESC [ … final byte, ESC ] … BEL or
// ESC \, and ESC, intermediate bytes, final byte).
func normalizeConsole(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		switch {
		case c == 0x1b && i+1 < len(b) && b[i+1] == '[':
			i += 2
			for i < len(b) && (b[i] < 0x40 || b[i] > 0x7e) {
				i++
			}
		case c == 0x1b && i+1 < len(b) && b[i+1] == ']':
			i += 2
			for i < len(b) && b[i] != 0x07 && !(b[i] == 0x1b && i+1 < len(b) && b[i+1] == '\\') {
				i++
			}
			if i < len(b) && b[i] == 0x1b {
				i++
			}
		case c == 0x1b:
			// ESC, intermediate bytes, a final byte (ESC ( B, ESC 7).
			i++
			for i < len(b) && b[i] >= 0x20 && b[i] <= 0x2f {
				i++
			}
		case c == '\n' || c == '\t' || c >= 0x20 && c != 0x7f:
			out = append(out, c)
		}
	}
	return out
}

// lastLines returns the last maxLines lines of text, then of them at most
// the last maxBytes bytes, starting after a line break where there is one,
// and valid UTF-8.
func lastLines(text []byte, maxLines, maxBytes int) []byte {
	end := len(text)
	if end > 0 && text[end-1] == '\n' {
		end-- // a final line break ends the last line, it begins none
	}
	start := 0
	for lines := 0; ; {
		i := bytes.LastIndexByte(text[:end], '\n')
		if i < 0 {
			break
		}
		lines++
		if lines == maxLines {
			start = i + 1
			break
		}
		end = i
	}
	text = text[start:]
	if len(text) > maxBytes {
		text = text[len(text)-maxBytes:]
		if i := bytes.IndexByte(text, '\n'); i >= 0 && i < len(text)-1 {
			text = text[i+1:]
		}
		for len(text) > 0 && !utf8.RuneStart(text[0]) {
			text = text[1:]
		}
	}
	return bytes.ToValidUTF8(text, []byte("?"))
}

// RemoveConsoleLogs deletes the console logs of the machine with key in dir,
// with virtlogd's backups of them: what Clone wrote there for Spec
// ConsoleDir dir. Remove deletes them by itself unless it is told to keep
// them; this is for logs kept beyond their machine, and for those of a
// machine whose definition is gone. Files that are not there are fine.
func RemoveConsoleLogs(dir, key string) error {
	if !messages.ValidMachineKey(key) {
		return fmt.Errorf("remove console logs of machine %q: %w", key, ErrInvalidJobID)
	}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove console logs of machine %s: %w", key, err)
	}
	var paths []string
	for _, e := range entries {
		if ownedConsolePath(key, e.Name()) {
			paths = append(paths, filepath.Join(dir, e.Name()))
		}
	}
	if err := removeFiles(paths); err != nil {
		return fmt.Errorf("remove console logs of machine %s: %w", key, err)
	}
	return nil
}

// removeConsoleLogs deletes the console logs recorded for the machine with
// key and their backups, but no file whose name is not one of the
// machine's.
func removeConsoleLogs(key string, logs []string) error {
	var paths, refused []string
	for _, log := range logs {
		if !filepath.IsAbs(log) || !ownedConsolePath(key, log) {
			refused = append(refused, log)
			continue
		}
		paths = append(paths, log)
		backups, err := filepath.Glob(globEscape(log) + ".[0-9]*")
		if err != nil {
			return err
		}
		for _, b := range backups {
			if ownedConsolePath(key, b) {
				paths = append(paths, b)
			}
		}
	}
	err := removeFiles(paths)
	if len(refused) > 0 {
		err = errors.Join(err, fmt.Errorf("kept console logs %s: not named for this job", strings.Join(refused, ", ")))
	}
	return err
}

func removeFiles(paths []string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// globEscape quotes the pattern characters of a path for filepath.Glob.
func globEscape(path string) string {
	var b strings.Builder
	for _, r := range path {
		if strings.ContainsRune(`*?[\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// ConsoleLogKeys returns the keys of the machines that have console logs,
// or virtlogd's backups of them, in dir: the files named as Clone names a
// machine's logs, whoever's machine it was. It reads dir only; a missing
// dir has none. RemoveConsoleLogs deletes a key's files.
func ConsoleLogKeys(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list console logs: %w", err)
	}
	var keys []string
	for _, e := range entries {
		m := consoleLogPattern.FindStringSubmatch(e.Name())
		if m == nil || !strings.HasPrefix(m[1], Prefix) {
			continue
		}
		if key := strings.TrimPrefix(m[1], Prefix); messages.ValidMachineKey(key) {
			keys = append(keys, key)
		}
	}
	slices.Sort(keys)
	return slices.Compact(keys), nil
}

// CheckConsoleDir returns an error unless dir, the console directory, is
// a directory (not a symbolic link to one) that the calling process's
// user owns and that neither its group nor others may write to. The
// worker reads the files in it and deletes them by name: a user who
// could put a file or a link there could make it read or delete another
// file (ConsoleTail does not follow a link at a log's name, and a
// directory only the worker can change needs no more).
func CheckConsoleDir(dir string) error {
	return checkConsoleDir(dir, os.Geteuid())
}

func checkConsoleDir(dir string, uid int) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("console directory: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("console directory %s is a symbolic link; name the directory itself", dir)
	case !fi.IsDir():
		return fmt.Errorf("console directory %s is not a directory", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("console directory %s: no owner known", dir)
	}
	if int(st.Uid) != uid {
		return fmt.Errorf("console directory %s is owned by uid %d, not the worker's (uid %d): chown it", dir, st.Uid, uid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("console directory %s has mode %04o: group or others may write to it; chmod go-w it (0700)", dir, fi.Mode().Perm())
	}
	return nil
}

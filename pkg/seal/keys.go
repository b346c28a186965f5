package seal

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// keySuffix ends the name of every key file: <id>.key.
const keySuffix = ".key"

// maxKeyFile bounds what is read of a key file.
const maxKeyFile = 4 << 10

// header begins every key file, so that one is recognised as such.
const header = "# stretchy worker sealing key, X25519; keep this file secret\n"

// ErrUnsafe marks a key file or directory that others could read or
// replace.
var ErrUnsafe = errors.New("not safe for a private key")

// WriteKey writes k into dir as <id>.key, mode 0600, refusing to replace
// a file; dir is made (0700) if missing, and checked as LoadDir checks it.
func WriteKey(dir string, k Key) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("keys directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return "", err
	}
	path := filepath.Join(dir, k.ID+keySuffix)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return "", fmt.Errorf("write key %s: %w", k.ID, err)
	}
	body := header + "private: " + base64.StdEncoding.EncodeToString(k.Private[:]) + "\n"
	_, werr := io.WriteString(f, body)
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		_ = os.Remove(path)
		return "", fmt.Errorf("write key %s: %w", k.ID, err)
	}
	return path, nil
}

// LoadDir reads every <id>.key file in dir, newest first. A missing dir
// holds no keys. The directory and each file must belong to root or to
// this process's user, the directory must not be writable, nor a file
// readable, by group or others, and neither may be a symbolic link; a
// file whose key does not have the id its name says is refused too. The
// first problem is returned, with the path.
func LoadDir(dir string) (*Keyring, error) {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return NewKeyring(), nil
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("keys directory %s: %w", dir, err)
	}
	type loaded struct {
		k   Key
		mod int64
	}
	var keys []loaded
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), keySuffix) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		k, mod, err := readKey(path)
		if err != nil {
			return nil, err
		}
		keys = append(keys, loaded{k, mod})
	}
	slices.SortStableFunc(keys, func(a, b loaded) int {
		switch {
		case a.mod > b.mod:
			return -1
		case a.mod < b.mod:
			return 1
		}
		return strings.Compare(a.k.ID, b.k.ID)
	})
	out := make([]Key, len(keys))
	for i, l := range keys {
		out[i] = l.k
	}
	return NewKeyring(out...), nil
}

// readKey reads one key file, returning its key and modification time.
func readKey(path string) (Key, int64, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return Key{}, 0, fmt.Errorf("key file %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Key{}, 0, fmt.Errorf("key file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return Key{}, 0, fmt.Errorf("key file %s: not a regular file: %w", path, ErrUnsafe)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return Key{}, 0, fmt.Errorf("key file %s: mode %04o lets group or others read it (chmod 600): %w", path, fi.Mode().Perm(), ErrUnsafe)
	}
	if err := checkOwner(path, fi); err != nil {
		return Key{}, 0, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFile))
	if err != nil {
		return Key{}, 0, fmt.Errorf("key file %s: %w", path, err)
	}
	priv, err := parseKey(data)
	if err != nil {
		return Key{}, 0, fmt.Errorf("key file %s: %w", path, err)
	}
	k, err := fromPrivate(priv)
	if err != nil {
		return Key{}, 0, fmt.Errorf("key file %s: %w", path, err)
	}
	if want := strings.TrimSuffix(filepath.Base(path), keySuffix); k.ID != want {
		return Key{}, 0, fmt.Errorf("key file %s: holds key %s, not %s", path, k.ID, want)
	}
	k.Path = path
	return k, fi.ModTime().UnixNano(), nil
}

// parseKey reads the private key line of a key file.
func parseKey(data []byte) ([32]byte, error) {
	var priv [32]byte
	for _, line := range bytes.Split(data, []byte("\n")) {
		v, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("private:"))
		if !ok {
			continue
		}
		raw, err := base64.StdEncoding.DecodeString(string(bytes.TrimSpace(v)))
		if err != nil || len(raw) != 32 {
			return priv, errors.New("the private: line is not 32 bytes in base64")
		}
		copy(priv[:], raw)
		return priv, nil
	}
	return priv, errors.New("no private: line")
}

// checkDir refuses a keys directory that others could write to.
func checkDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("keys directory %s: %w", dir, err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("keys directory %s: a symbolic link: %w", dir, ErrUnsafe)
	case !fi.IsDir():
		return fmt.Errorf("keys directory %s: not a directory", dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("keys directory %s: mode %04o lets group or others write to it (chmod 700): %w", dir, fi.Mode().Perm(), ErrUnsafe)
	}
	return checkOwner(dir, fi)
}

// checkOwner refuses a file or directory that neither root nor this
// process's user owns.
func checkOwner(path string, fi fs.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s: owned by uid %d, neither root nor this worker's user: %w", path, st.Uid, ErrUnsafe)
	}
	return nil
}

package embedded

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nats-io/nkeys"
)

// seedOf returns the seed in the credentials file of dir.
func seedOf(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(CredentialsPath(dir))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "SU") {
			return line
		}
	}
	t.Fatalf("no seed in %s", CredentialsPath(dir))
	return ""
}

// TestEnsureCredentials: the first start makes a user nkey in a file only
// its owner may read, later starts use it, and a deleted file is replaced
// by new credentials.
func TestEnsureCredentials(t *testing.T) {
	dir := t.TempDir()
	c, err := EnsureCredentials(dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Path() != filepath.Join(dir, "user.nk") || CredentialsPath(dir) != c.Path() {
		t.Fatalf("credentials at %s, want %s", c.Path(), filepath.Join(dir, "user.nk"))
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(c.Path(), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o7777 != 0o600 || int(st.Uid) != os.Geteuid() || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		t.Fatalf("mode %o, owner %d: want a regular file of mode 0600 owned by uid %d", st.Mode, st.Uid, os.Geteuid())
	}
	kp, err := nkeys.FromSeed([]byte(seedOf(t, dir)))
	if err != nil {
		t.Fatal(err)
	}
	if pub, _ := kp.PublicKey(); pub != c.PublicKey() || !nkeys.IsValidPublicUserKey(pub) {
		t.Fatalf("the file's key %s, the credentials' %s", pub, c.PublicKey())
	}
	sig, err := c.Sign([]byte("nonce"))
	if err != nil {
		t.Fatal(err)
	}
	if err := kp.Verify([]byte("nonce"), sig); err != nil {
		t.Fatalf("signature: %v", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("the directory holds %v (%v), want the credentials alone", entries, err)
	}

	again, err := EnsureCredentials(dir)
	if err != nil || again.PublicKey() != c.PublicKey() {
		t.Fatalf("second start: %s, %v; want the same key %s", again.PublicKey(), err, c.PublicKey())
	}
	loaded, err := LoadCredentials(dir)
	if err != nil || loaded.PublicKey() != c.PublicKey() {
		t.Fatalf("a client's load: %s, %v; want %s", loaded.PublicKey(), err, c.PublicKey())
	}

	if err := os.Remove(c.Path()); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCredentials(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a client's load without the file: %v, want fs.ErrNotExist", err)
	}
	renewed, err := EnsureCredentials(dir)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.PublicKey() == c.PublicKey() {
		t.Fatal("the file was deleted, but the next start has the same key")
	}
	if _, err := c.Sign([]byte("nonce")); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Fatalf("signing with credentials whose file was replaced: %v", err)
	}
}

// TestCredentialsChecks: a file that others than root and the worker's
// user may read, or that someone else could have put there, is not used,
// and the error says why without showing the file's content.
func TestCredentialsChecks(t *testing.T) {
	const other = 4242 // a uid and gid that is neither root nor this process's
	root := os.Geteuid() == 0
	tests := []struct {
		name string
		// setup changes the store directory, which holds good credentials.
		setup     func(t *testing.T, dir string)
		needsRoot bool
		want      error // nil: the credentials are used
		says      string
	}{
		{"made by the worker", func(*testing.T, string) {}, false, nil, ""},
		{"mode 0400", chmod(0o400), false, nil, ""},
		{"mode 0640, the directory's group", chmod(0o640), false, nil, ""},
		{"mode 0644", chmod(0o644), false, ErrUnsafeCredentials, "mode 0644"},
		{"mode 0660", chmod(0o660), false, ErrUnsafeCredentials, "mode 0660"},
		{"mode 0700", chmod(0o700), false, ErrUnsafeCredentials, "mode 0700"},
		{"setuid", chmod(0o4600), false, ErrUnsafeCredentials, "mode 4600"},
		{"mode 0640, another group", func(t *testing.T, dir string) {
			chmod(0o640)(t, dir)
			lchown(t, CredentialsPath(dir), -1, other)
		}, true, ErrUnsafeCredentials, "readable by group 4242"},
		{"owned by another user", func(t *testing.T, dir string) {
			lchown(t, CredentialsPath(dir), other, -1)
		}, true, ErrUnsafeCredentials, "owned by uid 4242"},
		{"owned by the directory's owner (the worker's, read by root)", func(t *testing.T, dir string) {
			lchown(t, CredentialsPath(dir), other, other)
			lchown(t, dir, other, other)
			chmod(0o640)(t, dir)
		}, true, nil, ""},
		{"a symbolic link", func(t *testing.T, dir string) {
			elsewhere := t.TempDir()
			if _, err := EnsureCredentials(elsewhere); err != nil {
				t.Fatal(err)
			}
			replace(t, dir, func(path string) error { return os.Symlink(CredentialsPath(elsewhere), path) })
		}, false, ErrUnsafeCredentials, "symbolic link"},
		{"a FIFO", func(t *testing.T, dir string) {
			replace(t, dir, func(path string) error { return syscall.Mkfifo(path, 0o600) })
		}, false, ErrUnsafeCredentials, "not a regular file"},
		{"a directory others may write to", func(t *testing.T, dir string) {
			if err := os.Chmod(dir, 0o777); err != nil {
				t.Fatal(err)
			}
		}, false, ErrUnsafeCredentials, "mode 0777"},
		{"a directory its group may write to", func(t *testing.T, dir string) {
			if err := os.Chmod(dir, 0o770); err != nil {
				t.Fatal(err)
			}
		}, false, ErrUnsafeCredentials, "chmod go-w"},
		{"no seed", func(t *testing.T, dir string) {
			replace(t, dir, func(path string) error { return os.WriteFile(path, []byte("Secret-not-a-seed\n"), 0o600) })
		}, false, nil, "no user nkey seed"},
		{"an account seed", func(t *testing.T, dir string) {
			kp, _ := nkeys.CreateAccount()
			seed, _ := kp.Seed()
			replace(t, dir, func(path string) error { return os.WriteFile(path, seed, 0o600) })
		}, false, nil, "no user nkey seed"},
		{"too large", func(t *testing.T, dir string) {
			seed := seedOf(t, dir)
			replace(t, dir, func(path string) error {
				return os.WriteFile(path, []byte(strings.Repeat("#\n", 4096)+seed+"\n"), 0o600)
			})
		}, false, nil, "larger than 4096 bytes"},
		{"missing", func(t *testing.T, dir string) {
			if err := os.Remove(CredentialsPath(dir)); err != nil {
				t.Fatal(err)
			}
		}, false, fs.ErrNotExist, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needsRoot && !root {
				t.Skip("chown needs root")
			}
			dir := filepath.Join(t.TempDir(), "nats")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if _, err := EnsureCredentials(dir); err != nil {
				t.Fatal(err)
			}
			seed := seedOf(t, dir)
			tt.setup(t, dir)
			c, err := LoadCredentials(dir)
			wantOK := tt.want == nil && tt.says == ""
			switch {
			case wantOK && err != nil:
				t.Fatalf("refused: %v", err)
			case wantOK:
				if _, err := c.Sign([]byte("nonce")); err != nil {
					t.Fatalf("sign: %v", err)
				}
				return
			case err == nil:
				t.Fatalf("used; want an error saying %q", tt.says)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("error %q is not %v", err, tt.want)
			}
			if tt.want == nil && errors.Is(err, ErrUnsafeCredentials) {
				t.Errorf("error %q says unsafe", err)
			}
			if !strings.Contains(err.Error(), tt.says) || !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q does not say %q about %s", err, tt.says, dir)
			}
			if strings.Contains(err.Error(), seed) || strings.Contains(err.Error(), "Secret") {
				t.Errorf("error %q shows the file's content", err)
			}
			// Nor does the worker's start replace what is there.
			if !errors.Is(err, fs.ErrNotExist) {
				before, _ := os.Lstat(CredentialsPath(dir))
				if _, err := EnsureCredentials(dir); err == nil {
					t.Error("worker run's start used or replaced the file")
				}
				after, _ := os.Lstat(CredentialsPath(dir))
				if before == nil || after == nil || !os.SameFile(before, after) {
					t.Error("worker run's start replaced the file")
				}
			}
		})
	}
}

// chmod sets the credentials file's mode, as chmod(1) takes it.
func chmod(mode uint32) func(*testing.T, string) {
	return func(t *testing.T, dir string) {
		t.Helper()
		if err := syscall.Chmod(CredentialsPath(dir), mode); err != nil {
			t.Fatal(err)
		}
	}
}

func lchown(t *testing.T, path string, uid, gid int) {
	t.Helper()
	if err := os.Lchown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
}

// replace puts something else where the credentials are.
func replace(t *testing.T, dir string, make func(path string) error) {
	t.Helper()
	if err := os.Remove(CredentialsPath(dir)); err != nil {
		t.Fatal(err)
	}
	if err := make(CredentialsPath(dir)); err != nil {
		t.Fatal(err)
	}
}

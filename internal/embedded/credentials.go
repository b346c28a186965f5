package embedded

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nats-io/nkeys"
	"golang.org/x/sys/unix"
)

// The embedded server has one user, an nkey: the server keeps only its
// public key, a client proves it holds the seed by signing the server's
// nonce, so the secret never crosses a connection (docs/security.md 1.1).
// The seed lives in a file in the server's store directory, readable by
// root and the worker's user only.

// credentialsName is the file of the seed in the store directory.
const credentialsName = "user.nk"

// maxCredentialsSize bounds what is read: a seed and a comment line.
const maxCredentialsSize = 4096

// credentialsHeader opens the file, for whoever finds it. nkeys and
// nats.go read the seed from the line that begins with it.
const credentialsHeader = "# NATS user nkey seed of the embedded server of worker run (docs/security.md 1.1).\n" +
	"# Delete this file and restart the worker to replace it.\n"

// ErrUnsafeCredentials is why a credentials file is not used: others than
// root and the worker's user could read it, or could have replaced it.
var ErrUnsafeCredentials = errors.New("not safe to use")

// CredentialsPath returns where the embedded server that stores its data
// in storeDir (worker run's --nats-data-dir) keeps its credentials.
func CredentialsPath(storeDir string) string {
	return filepath.Join(storeDir, credentialsName)
}

// Credentials are the embedded server's user. They hold its public key
// and where its seed is; Sign reads the seed when it is needed.
type Credentials struct {
	dir string
	pub string
}

// Path returns the file that holds the seed.
func (c Credentials) Path() string { return CredentialsPath(c.dir) }

// PublicKey returns the user's public nkey (U...), which Options.NKey
// takes and a client presents.
func (c Credentials) PublicKey() string { return c.pub }

// Sign signs the server's nonce, as nats.Nkey wants it. It reads and
// checks the file again each time, as nats.go does with seed files, so
// that the seed is held only while it signs.
func (c Credentials) Sign(nonce []byte) ([]byte, error) {
	kp, err := readCredentials(c.dir)
	if err != nil {
		return nil, err
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("embedded nats credentials %s: %w", c.Path(), err)
	}
	if pub != c.pub {
		return nil, fmt.Errorf("embedded nats credentials %s: replaced since they were read", c.Path())
	}
	return kp.Sign(nonce)
}

// LoadCredentials reads the credentials of the embedded server that
// stores its data in storeDir, for a client. An error wraps
// fs.ErrNotExist when there are none (no worker ran there),
// fs.ErrPermission when this user may not read them, and
// ErrUnsafeCredentials when the file or its directory are not safe.
func LoadCredentials(storeDir string) (Credentials, error) {
	kp, err := readCredentials(storeDir)
	if err != nil {
		return Credentials{}, err
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return Credentials{}, fmt.Errorf("embedded nats credentials %s: %w", CredentialsPath(storeDir), err)
	}
	return Credentials{dir: storeDir, pub: pub}, nil
}

// EnsureCredentials returns the embedded server's credentials in
// storeDir, which must exist, making new ones at the first start (and
// after the file was deleted): a new user nkey, in a file of mode 0600.
// A file that is there but not safe (LoadCredentials) is an error, not
// replaced.
func EnsureCredentials(storeDir string) (Credentials, error) {
	c, err := LoadCredentials(storeDir)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return c, err
	}
	if err := createCredentials(storeDir); err != nil {
		return Credentials{}, err
	}
	return LoadCredentials(storeDir)
}

// openStoreDir opens the directory and checks that nobody but its owner
// may create, delete or rename files in it, so that the file found there
// is the one its owner put there.
func openStoreDir(storeDir string) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	dfd, err := unix.Open(storeDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, st, fmt.Errorf("embedded nats credentials: open %s: %w", storeDir, err)
	}
	if err := unix.Fstat(dfd, &st); err != nil {
		unix.Close(dfd)
		return -1, st, fmt.Errorf("embedded nats credentials: stat %s: %w", storeDir, err)
	}
	if st.Mode&0o022 != 0 {
		unix.Close(dfd)
		return -1, st, fmt.Errorf("embedded nats credentials: directory %s has mode %04o: others than its owner may replace files in it (chmod go-w): %w",
			storeDir, st.Mode&0o7777, ErrUnsafeCredentials)
	}
	return dfd, st, nil
}

// readCredentials reads the user's key from the file in storeDir, after
// checking it: a regular file, not a symbolic link (never followed),
// owned by root, by this process's user or by the directory's owner (the
// worker's user, who made it), of mode 0600 or stricter, or 0640 when its
// group is the directory's (the worker's group).
func readCredentials(storeDir string) (nkeys.KeyPair, error) {
	path := CredentialsPath(storeDir)
	dfd, dst, err := openStoreDir(storeDir)
	if err != nil {
		return nil, err
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat(dfd, credentialsName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("embedded nats credentials %s: a symbolic link, which is not followed: %w", path, ErrUnsafeCredentials)
	}
	if err != nil {
		return nil, fmt.Errorf("embedded nats credentials: open %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("embedded nats credentials: stat %s: %w", path, err)
	}
	if err := checkCredentialsFile(st, dst); err != nil {
		return nil, fmt.Errorf("embedded nats credentials %s: %w", path, err)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxCredentialsSize+1))
	defer clear(b)
	if err != nil {
		return nil, fmt.Errorf("embedded nats credentials: read %s: %w", path, err)
	}
	if len(b) > maxCredentialsSize {
		return nil, fmt.Errorf("embedded nats credentials %s: larger than %d bytes, not a seed file", path, maxCredentialsSize)
	}
	kp, err := nkeys.ParseDecoratedUserNKey(b)
	if err != nil {
		// nkeys' errors name no part of the file.
		return nil, fmt.Errorf("embedded nats credentials %s: no user nkey seed (SU...) found (%v); delete the file and restart worker run to make new ones", path, err)
	}
	return kp, nil
}

// checkCredentialsFile checks the file's type, owner and mode against its
// directory's.
func checkCredentialsFile(st, dir unix.Stat_t) error {
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("not a regular file: %w", ErrUnsafeCredentials)
	}
	if uid := st.Uid; uid != 0 && int(uid) != os.Geteuid() && uid != dir.Uid {
		return fmt.Errorf("owned by uid %d, not by root, this user (uid %d) or the directory's owner (uid %d): %w",
			uid, os.Geteuid(), dir.Uid, ErrUnsafeCredentials)
	}
	perm := st.Mode & 0o7777
	if perm&^0o640 != 0 {
		return fmt.Errorf("mode %04o: more than 0600, or 0640 for the worker's group (chmod 0600): %w", perm, ErrUnsafeCredentials)
	}
	if perm&0o040 != 0 && st.Gid != dir.Gid {
		return fmt.Errorf("readable by group %d, not the directory's group %d (the worker's): %w", st.Gid, dir.Gid, ErrUnsafeCredentials)
	}
	return nil
}

// createCredentials writes a new user nkey seed into the file, mode 0600,
// whole or not at all: into a temporary file first, then linked to its
// name, which fails if another process made the file meanwhile (and then
// its credentials are used).
func createCredentials(storeDir string) error {
	path := CredentialsPath(storeDir)
	dfd, _, err := openStoreDir(storeDir)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	kp, err := nkeys.CreateUser()
	if err != nil {
		return fmt.Errorf("embedded nats credentials: new nkey: %w", err)
	}
	defer kp.Wipe()
	seed, err := kp.Seed()
	if err != nil {
		return fmt.Errorf("embedded nats credentials: new nkey: %w", err)
	}
	defer clear(seed)
	content := bytes.Join([][]byte{[]byte(credentialsHeader), seed, []byte("\n")}, nil)
	defer clear(content)

	r := make([]byte, 6)
	_, _ = rand.Read(r) // never fails (crypto/rand, Go 1.24+)
	tmp := "." + credentialsName + "." + hex.EncodeToString(r)
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("embedded nats credentials: create %s: %w", filepath.Join(storeDir, tmp), err)
	}
	defer func() { _ = unix.Unlinkat(dfd, tmp, 0) }()
	f := os.NewFile(uintptr(fd), filepath.Join(storeDir, tmp))
	// The umask may only take bits away; 0600 whatever it is.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(content)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("embedded nats credentials: write %s: %w", path, err)
	}
	if err := unix.Linkat(dfd, tmp, dfd, credentialsName, 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("embedded nats credentials: create %s: %w", path, err)
	}
	if err := unix.Fsync(dfd); err != nil {
		return fmt.Errorf("embedded nats credentials: sync %s: %w", storeDir, err)
	}
	return nil
}

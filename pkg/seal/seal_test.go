package seal

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// testKey is the key docs/protocol.md's worked example seals to: the
// SHA-256 of "stretchy-ci libvirt-worker test key 1" as its private half.
func testKey(t *testing.T) Key {
	t.Helper()
	k, err := fromPrivate(sha256.Sum256([]byte("stretchy-ci libvirt-worker test key 1")))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestTestKeyIsTheDocumentedOne(t *testing.T) {
	k := testKey(t)
	if got := hex.EncodeToString(k.Public[:]); got != "666f96c4fd28f564cad97ff560bc4233b21153a9f7932cd8ac10d2b9669cf108" {
		t.Fatalf("public key %s", got)
	}
	if k.ID != "7c70d623df12581c" {
		t.Fatalf("key id %s", k.ID)
	}
}

// TestLibsodiumFixtureOpens opens a provision request sealed by libsodium
// (PyNaCl's SealedBox, crypto_box_seal), the worked example of
// docs/protocol.md 3.13: what another language seals, the worker opens.
func TestLibsodiumFixtureOpens(t *testing.T) {
	data, err := os.ReadFile("../messages/testdata/provision_sealed_python_v1.msgpack")
	if err != nil {
		t.Fatal(err)
	}
	req, err := messages.DecodeProvision(data)
	if err != nil {
		t.Fatal(err)
	}
	if req.Runner.Sealed == nil || req.Runner.Forgejo == nil || req.Runner.Forgejo.Token != "" {
		t.Fatalf("runner %+v", req.Runner)
	}
	secret, err := NewKeyring(testKey(t)).Open(*req.Runner.Sealed, req.JobID)
	if err != nil {
		t.Fatal(err)
	}
	if secret != "s3cr3t-token" {
		t.Fatalf("secret %q", secret)
	}
}

func TestSealAndOpen(t *testing.T) {
	k := testKey(t)
	other, err := Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kr := NewKeyring(k)
	const secret = "a-runner-token-9f8e"
	sealed, err := Seal(k.Published(), "job-1", secret, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if sealed.KeyID != k.ID || bytes.Contains(sealed.Box, []byte(secret)) || len(sealed.Box) < messages.SealOverhead {
		t.Fatalf("sealed %+v", sealed)
	}
	if got, err := kr.Open(sealed, "job-1"); err != nil || got != secret {
		t.Fatalf("Open = %q, %v", got, err)
	}
	rawBox := func(plain []byte) []byte {
		b, err := box.SealAnonymous(nil, plain, &k.Public, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	payload := func(p messages.SealedPayload) []byte {
		b, err := messages.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		return rawBox(b)
	}
	flipped := bytes.Clone(sealed.Box)
	flipped[len(flipped)-1] ^= 1
	toOther, err := Seal(other.Published(), "job-1", secret, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		s    messages.SealedSecret
		job  string
		want error
	}{
		{"unknown key", toOther, "job-1", ErrUnknownKey},
		{"another job", sealed, "job-2", ErrInvalid},
		{"corrupt box", messages.SealedSecret{KeyID: k.ID, Box: flipped}, "job-1", ErrInvalid},
		{"short box", messages.SealedSecret{KeyID: k.ID, Box: sealed.Box[:20]}, "job-1", ErrInvalid},
		{"no box", messages.SealedSecret{KeyID: k.ID}, "job-1", ErrInvalid},
		{"not a payload", messages.SealedSecret{KeyID: k.ID, Box: rawBox([]byte(secret))}, "job-1", ErrInvalid},
		{"no secret", messages.SealedSecret{KeyID: k.ID, Box: payload(messages.SealedPayload{V: 1, JobID: "job-1"})}, "job-1", ErrInvalid},
		{"box of another key under this id", messages.SealedSecret{KeyID: k.ID, Box: toOther.Box}, "job-1", ErrInvalid},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := kr.Open(tt.s, tt.job)
			if !errors.Is(err, tt.want) || got != "" {
				t.Fatalf("Open = %q, %v; want %v", got, err, tt.want)
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error %q quotes the secret", err)
			}
		})
	}
	if _, err := Seal(messages.SealKey{ID: k.ID, Public: other.Public[:]}, "job-1", secret, rand.Reader); err == nil {
		t.Fatal("sealed to a public key whose id is not the key's")
	}
}

// TestKeyRotation: a keyring with the new key and the old one opens
// secrets sealed to either; the new one is preferred.
func TestKeyRotation(t *testing.T) {
	old, fresh := testKey(t), mustGenerate(t)
	kr := NewKeyring(fresh, old)
	for _, k := range []Key{old, fresh} {
		s, err := Seal(k.Published(), "j", "secret", rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := kr.Open(s, "j"); err != nil || got != "secret" {
			t.Fatalf("sealed to %s: %q, %v", k.ID, got, err)
		}
	}
	if pub := kr.Published(); len(pub) != 2 || pub[0].ID != fresh.ID {
		t.Fatalf("Published = %+v, want the new key first", pub)
	}
}

func mustGenerate(t *testing.T) Key {
	t.Helper()
	k, err := Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestKeyFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	a, b := mustGenerate(t), mustGenerate(t)
	pa, err := WriteKey(dir, a)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(pa); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v, %v", fi, err)
	}
	if _, err := WriteKey(dir, a); err == nil {
		t.Fatal("a key file was replaced")
	}
	pb, err := WriteKey(dir, b)
	if err != nil {
		t.Fatal(err)
	}
	// b is the newer.
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(pa, past, past); err != nil {
		t.Fatal(err)
	}
	kr, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	keys := kr.Keys()
	if len(keys) != 2 || keys[0].ID != b.ID || keys[1].ID != a.ID || keys[0].Private != b.Private || keys[0].Path != pb {
		t.Fatalf("loaded %d keys, first %s", len(keys), keys[0].ID)
	}
	if data, _ := os.ReadFile(pa); !strings.HasPrefix(string(data), "# stretchy worker sealing key") {
		t.Fatalf("key file begins %q", data[:20])
	}
	if kr, err := LoadDir(filepath.Join(dir, "none")); err != nil || kr.Len() != 0 {
		t.Fatalf("missing dir: %v keys, %v", kr.Len(), err)
	}

	for _, tt := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  string
	}{
		{"file readable by others", func(t *testing.T, dir string) {
			p, _ := WriteKey(dir, mustGenerate(t))
			if err := os.Chmod(p, 0o644); err != nil {
				t.Fatal(err)
			}
		}, "lets group or others read it"},
		{"directory writable by others", func(t *testing.T, dir string) {
			if err := os.Chmod(dir, 0o777); err != nil {
				t.Fatal(err)
			}
		}, "lets group or others write to it"},
		{"file a link", func(t *testing.T, dir string) {
			k := mustGenerate(t)
			target, _ := WriteKey(t.TempDir(), k)
			if err := os.Symlink(target, filepath.Join(dir, k.ID+".key")); err != nil {
				t.Fatal(err)
			}
		}, "key file"},
		{"another key under the name", func(t *testing.T, dir string) {
			k := mustGenerate(t)
			p, _ := WriteKey(dir, k)
			if err := os.Rename(p, filepath.Join(dir, "0000000000000000.key")); err != nil {
				t.Fatal(err)
			}
		}, "not 0000000000000000"},
		{"not a key", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "0000000000000000.key"), []byte("private: nope\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "not 32 bytes in base64"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "keys")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			tt.setup(t, dir)
			_, err := LoadDir(dir)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("LoadDir = %v, want %q", err, tt.want)
			}
		})
	}
}

package seal

import (
	"errors"
	"fmt"
	"io"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Errors of Open.
var (
	// ErrUnknownKey: the secret is sealed to a key this keyring does not
	// hold.
	ErrUnknownKey = errors.New("sealed to a key this worker does not hold")
	// ErrInvalid: the box does not open with the key it names, or what
	// it holds is not a payload for the job.
	ErrInvalid = errors.New("sealed secret does not open")
)

// Key is a sealing key: its id, its X25519 public and private halves, and
// the file it was read from, if any.
type Key struct {
	ID      string
	Public  [32]byte
	Private [32]byte
	Path    string
}

// Generate makes a new key from r (crypto/rand.Reader in production).
func Generate(r io.Reader) (Key, error) {
	pub, priv, err := box.GenerateKey(r)
	if err != nil {
		return Key{}, fmt.Errorf("generate key: %w", err)
	}
	return Key{ID: messages.SealKeyID(pub[:]), Public: *pub, Private: *priv}, nil
}

// fromPrivate completes a key from its private half.
func fromPrivate(priv [32]byte) (Key, error) {
	pub, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return Key{}, fmt.Errorf("derive public key: %w", err)
	}
	k := Key{Private: priv}
	copy(k.Public[:], pub)
	k.ID = messages.SealKeyID(k.Public[:])
	return k, nil
}

// Published is the key as a host record lists it: no private half.
func (k Key) Published() messages.SealKey {
	return messages.SealKey{ID: k.ID, Public: append([]byte(nil), k.Public[:]...)}
}

// Seal seals secret for job jobID to the published key to, with randomness
// from r.
func Seal(to messages.SealKey, jobID, secret string, r io.Reader) (messages.SealedSecret, error) {
	if len(to.Public) != 32 {
		return messages.SealedSecret{}, fmt.Errorf("seal to key %s: public key of %d bytes, want 32", to.ID, len(to.Public))
	}
	if id := messages.SealKeyID(to.Public); id != to.ID {
		return messages.SealedSecret{}, fmt.Errorf("seal to key %s: its public key has id %s", to.ID, id)
	}
	plain, err := messages.Marshal(messages.SealedPayload{V: messages.SchemaVersion, JobID: jobID, Secret: secret})
	if err != nil {
		return messages.SealedSecret{}, err
	}
	var pub [32]byte
	copy(pub[:], to.Public)
	sealed, err := box.SealAnonymous(nil, plain, &pub, r)
	if err != nil {
		return messages.SealedSecret{}, fmt.Errorf("seal to key %s: %w", to.ID, err)
	}
	return messages.SealedSecret{KeyID: to.ID, Box: sealed}, nil
}

// Keyring is the private keys a worker holds, by id, the one to prefer
// first.
type Keyring struct {
	keys  map[string]Key
	order []string
}

// NewKeyring returns a keyring of keys, preferring them in that order.
func NewKeyring(keys ...Key) *Keyring {
	kr := &Keyring{keys: make(map[string]Key, len(keys))}
	for _, k := range keys {
		if _, dup := kr.keys[k.ID]; dup {
			continue
		}
		kr.keys[k.ID] = k
		kr.order = append(kr.order, k.ID)
	}
	return kr
}

// Len returns how many keys the keyring holds.
func (kr *Keyring) Len() int {
	if kr == nil {
		return 0
	}
	return len(kr.order)
}

// Keys returns the keys, the one to prefer first.
func (kr *Keyring) Keys() []Key {
	if kr == nil {
		return nil
	}
	out := make([]Key, 0, len(kr.order))
	for _, id := range kr.order {
		out = append(out, kr.keys[id])
	}
	return out
}

// Published returns the public halves, for the host record.
func (kr *Keyring) Published() []messages.SealKey {
	var out []messages.SealKey
	for _, k := range kr.Keys() {
		out = append(out, k.Published())
	}
	return out
}

// Open returns the secret s holds for job jobID. Its errors wrap
// ErrUnknownKey or ErrInvalid and never quote the box or the secret.
func (kr *Keyring) Open(s messages.SealedSecret, jobID string) (string, error) {
	k, ok := kr.lookup(s.KeyID)
	if !ok {
		return "", fmt.Errorf("runner.sealed: key %q: %w", s.KeyID, ErrUnknownKey)
	}
	plain, ok := box.OpenAnonymous(nil, s.Box, &k.Public, &k.Private)
	if !ok {
		return "", fmt.Errorf("runner.sealed: a box of %d bytes sealed to key %s: %w", len(s.Box), s.KeyID, ErrInvalid)
	}
	p, err := messages.DecodeSealedPayload(plain)
	switch {
	case err != nil:
		return "", fmt.Errorf("runner.sealed: what the box holds is not a sealed payload: %w", ErrInvalid)
	case p.JobID != jobID:
		return "", fmt.Errorf("runner.sealed: the box was sealed for another job: %w", ErrInvalid)
	case p.Secret == "":
		return "", fmt.Errorf("runner.sealed: the box holds no secret: %w", ErrInvalid)
	}
	return p.Secret, nil
}

func (kr *Keyring) lookup(id string) (Key, bool) {
	if kr == nil {
		return Key{}, false
	}
	k, ok := kr.keys[id]
	return k, ok
}

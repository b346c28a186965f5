package worker

import (
	"bytes"
	"context"
	"crypto/rand"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

func newKey(t *testing.T) seal.Key {
	t.Helper()
	k, err := seal.Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// forgejoFor is a provision of a Forgejo runner with secret in the clear.
func forgejoFor(job, image, secret string) messages.Provision {
	req := provisionFor(job, image)
	req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: secret, Labels: []string{"l"},
	}}
	return req
}

// sealedTo is forgejoFor with its secret sealed to key.
func sealedTo(t *testing.T, key messages.SealKey, job, image, secret string) messages.Provision {
	t.Helper()
	req := forgejoFor(job, image, "")
	s, err := seal.Seal(key, job, secret, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	req.Runner.Sealed = &s
	return req
}

// TestSealedSecrets: a worker holding two keys (the new one and the one it
// replaces) serves requests sealed to either, the secret reaching the guest
// as a plain request's would; it lists both public keys in its host record;
// with --require-sealed-secrets it refuses a secret in the clear
// (secret_not_sealed); it refuses a secret sealed to a key it does not hold
// (unknown_seal_key), a corrupt box and a box copied from another job's
// request (sealed_secret_invalid). What it refuses builds nothing, and no
// event or error quotes a secret.
func TestSealedSecrets(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	old, fresh, stranger := newKey(t), newKey(t), newKey(t)
	a := startFleetHostWith(t, env, "a", 0, 200*time.Millisecond, nil, func(c *Config) {
		c.Keys = seal.NewKeyring(fresh, old)
		c.RequireSealed = true
		c.Fleet.SealKeys = seal.NewKeyring(fresh, old).Published()
	}, "img")
	op := client.New(env.js)
	waitRegistered(t, op, map[string]int{"a": 1})
	hosts, err := op.Hosts(context.Background())
	if err != nil || len(hosts) != 1 {
		t.Fatalf("hosts %v, %v", hosts, err)
	}
	if ids := []string{hosts[0].SealKeys[0].ID, hosts[0].SealKeys[1].ID}; !slices.Equal(ids, []string{fresh.ID, old.ID}) ||
		!bytes.Equal(hosts[0].SealKeys[0].Public, fresh.Public[:]) {
		t.Fatalf("the host record lists keys %+v, want %s then %s", hosts[0].SealKeys, fresh.ID, old.ID)
	}

	corrupt := sealedTo(t, fresh.Published(), "corrupt", "img", "tok-corrupt")
	corrupt.Runner.Sealed.Box[len(corrupt.Runner.Sealed.Box)-1] ^= 1
	stolen := sealedTo(t, fresh.Published(), "victim", "img", "tok-victim")
	stolen.JobID = "thief"
	reqs := []messages.Provision{
		sealedTo(t, fresh.Published(), "new-key", "img", "tok-new"),
		sealedTo(t, old.Published(), "old-key", "img", "tok-old"),
		forgejoFor("plain", "img", "tok-plain"),
		sealedTo(t, stranger.Published(), "stranger", "img", "tok-stranger"),
		corrupt,
		stolen,
	}
	for _, req := range reqs {
		if _, err := submitProvision(context.Background(), env.js, req, "a"); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ job, secret string }{{"new-key", "tok-new"}, {"old-key", "tok-old"}} {
		waitFor(t, "runner_started of "+c.job, func() bool { return log.has(c.job, messages.StateRunnerStarted) })
		if in := a.host.stdinOf(c.job); !slices.Contains(in, c.secret) {
			t.Errorf("job %s: the guest read %q, want the secret", c.job, in)
		}
	}
	for _, c := range []struct {
		job  string
		code messages.ErrorCode
	}{
		{"plain", messages.CodeSecretNotSealed},
		{"stranger", messages.CodeUnknownSealKey},
		{"corrupt", messages.CodeSealedSecretInvalid},
		{"thief", messages.CodeSealedSecretInvalid},
	} {
		waitFor(t, "failed of "+c.job, func() bool { return log.has(c.job, messages.StateFailed) })
		evs := log.of(c.job)
		if len(evs) != 1 || evs[0].Error == nil || evs[0].Error.Code != c.code {
			t.Errorf("job %s: events %+v, want one failed with %s", c.job, evs, c.code)
			continue
		}
		t.Logf("%s: %s", c.job, evs[0].Error.Message)
		a.host.mu.Lock()
		_, built := a.host.machines[c.job]
		a.host.mu.Unlock()
		if built || len(a.host.stdinOf(c.job)) > 0 {
			t.Errorf("job %s was built", c.job)
		}
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	for _, ev := range log.events {
		for _, s := range []string{"tok-new", "tok-old", "tok-plain", "tok-stranger", "tok-corrupt", "tok-victim"} {
			if ev.Error != nil && strings.Contains(ev.Error.Message, s) {
				t.Errorf("event %+v quotes a secret", ev)
			}
		}
	}
}

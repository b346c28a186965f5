package client

import (
	"crypto/rand"
	"errors"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// TestSubmitSealsToCommonKey: Submit seals a runner secret to the first
// key that every host that may serve the request lists (the pinned
// host's preferred one when pinned), leaves it in the clear in SealAuto
// without one, refuses in SealAlways, and never changes the caller's
// request.
func TestSubmitSealsToCommonKey(t *testing.T) {
	gen := func() seal.Key {
		k, err := seal.Generate(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	fleetKey, aOnly, other := gen(), gen(), gen()
	img := []messages.HostImage{{Name: "debian-12", Admitted: true}}
	hosts := []messages.Host{
		{Host: "a", State: messages.HostActive, Images: img, SealKeys: []messages.SealKey{aOnly.Published(), fleetKey.Published()}},
		{Host: "b", State: messages.HostActive, Images: img, SealKeys: []messages.SealKey{fleetKey.Published()}},
		{Host: "c", State: messages.HostActive, SealKeys: []messages.SealKey{other.Published()}}, // carries nothing
		{Host: "d", State: messages.HostDraining, Images: img},                                   // takes nothing now
	}
	req := func() messages.Provision {
		return messages.Provision{V: 1, JobID: "j1", Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerGitHub,
			GitHub: &messages.GitHubRunner{JITConfig: "jit-secret"}}}
	}
	for _, tt := range []struct {
		name   string
		pinned string
		hosts  []messages.Host
		mode   SealMode
		want   *seal.Key // nil: not sealed
		err    bool
	}{
		{"shared: the key both carriers list", "", hosts, SealAuto, &fleetKey, false},
		{"pinned: that host's preferred key", "a", hosts, SealAuto, &aOnly, false},
		{"no common key: clear", "", append(hosts[:1:1], messages.Host{Host: "e", State: messages.HostActive, Images: img}), SealAuto, nil, false},
		{"no common key: refused", "", append(hosts[:1:1], messages.Host{Host: "e", State: messages.HostActive, Images: img}), SealAlways, nil, true},
		{"never", "", hosts, SealNever, nil, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			orig := req()
			r, keyID, err := sealFor(orig, tt.hosts, tt.pinned, tt.mode)
			if (err != nil) != tt.err || tt.err && !errors.Is(err, ErrNoSealKey) {
				t.Fatalf("sealFor = %v, want error %v", err, tt.err)
			}
			if orig.Runner.GitHub.JITConfig != "jit-secret" || orig.Runner.Sealed != nil {
				t.Fatalf("sealFor changed the caller's request: %+v", orig.Runner)
			}
			if tt.want == nil {
				if keyID != "" || r.Runner.Sealed != nil || (!tt.err && r.Runner.GitHub.JITConfig != "jit-secret") {
					t.Fatalf("sealed to %q, runner %+v", keyID, r.Runner)
				}
				return
			}
			if keyID != tt.want.ID || r.Runner.GitHub.JITConfig != "" || r.Runner.Sealed.KeyID != tt.want.ID {
				t.Fatalf("sealed to %q, runner %+v, want sealed to %s", keyID, r.Runner, tt.want.ID)
			}
			got, err := seal.NewKeyring(*tt.want).Open(*r.Runner.Sealed, "j1")
			if err != nil || got != "jit-secret" {
				t.Fatalf("opens to %q, %v", got, err)
			}
		})
	}
}

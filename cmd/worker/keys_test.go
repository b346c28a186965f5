package main

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

func TestKeysGenerateAndList(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	var out bytes.Buffer
	if err := keysCommand([]string{"generate", "--keys-dir", dir}, &out); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`key ([0-9a-f]{16}) written to (\S+) \(mode 0600\)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("generate printed %q", out.String())
	}
	id, path := m[1], m[2]
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The private key is in the file and nowhere in what was printed.
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "private: "); ok && strings.Contains(out.String(), v) {
			t.Fatal("generate printed the private key")
		}
	}
	out.Reset()
	if err := keysCommand([]string{"list", "--keys-dir", dir}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), id) || !strings.Contains(out.String(), path) {
		t.Fatalf("list printed %q", out.String())
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := keysCommand([]string{"list", "--keys-dir", dir}, &out); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("list of a key readable by the group: %v", err)
	}
	// worker run refuses to start with it, as with --require-sealed-secrets
	// and no key.
	if err := runCommand(t.Context(), []string{"--keys-dir", dir, "--nats-url", "nats://127.0.0.1:1"}); err == nil || !strings.Contains(err.Error(), "--keys-dir") {
		t.Fatalf("worker run with an unsafe key: %v", err)
	}
	if err := runCommand(t.Context(), []string{"--keys-dir", filepath.Join(dir, "none"), "--require-sealed-secrets", "--nats-url", "nats://127.0.0.1:1"}); err == nil ||
		!strings.Contains(err.Error(), "--require-sealed-secrets: no key") {
		t.Fatalf("worker run requiring sealed secrets without a key: %v", err)
	}
}

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
		mode   sealMode
		want   *seal.Key // nil: not sealed
		err    bool
	}{
		{"shared: the key both carriers list", "", hosts, sealAuto, &fleetKey, false},
		{"pinned: that host's preferred key", "a", hosts, sealAuto, &aOnly, false},
		{"no common key: clear", "", append(hosts[:1:1], messages.Host{Host: "e", State: messages.HostActive, Images: img}), sealAuto, nil, false},
		{"no common key: refused", "", append(hosts[:1:1], messages.Host{Host: "e", State: messages.HostActive, Images: img}), sealAlways, nil, true},
		{"never", "", hosts, sealNever, nil, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := req()
			sealed, err := sealFor(&r, tt.hosts, tt.pinned, tt.mode)
			if (err != nil) != tt.err {
				t.Fatalf("sealFor = %v, want error %v", err, tt.err)
			}
			if tt.want == nil {
				if sealed || r.Runner.Sealed != nil || (!tt.err && r.Runner.GitHub.JITConfig != "jit-secret") {
					t.Fatalf("sealed %v, runner %+v", sealed, r.Runner)
				}
				return
			}
			if !sealed || r.Runner.GitHub.JITConfig != "" || r.Runner.Sealed.KeyID != tt.want.ID {
				t.Fatalf("sealed %v, runner %+v, want sealed to %s", sealed, r.Runner, tt.want.ID)
			}
			got, err := seal.NewKeyring(*tt.want).Open(*r.Runner.Sealed, "j1")
			if err != nil || got != "jit-secret" {
				t.Fatalf("opens to %q, %v", got, err)
			}
		})
	}
}

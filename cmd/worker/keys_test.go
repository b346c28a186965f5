package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
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

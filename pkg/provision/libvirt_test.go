package provision

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// libvirtSocket is where Dial connects.
const libvirtSocket = "/var/run/libvirt/libvirt-sock"

// requireLibvirt skips the test when no libvirtd is listening, unless
// STRETCHY_REQUIRE_LIBVIRT=1 (as in CI) makes that a failure.
func requireLibvirt(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(libvirtSocket); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("libvirtd required (STRETCHY_REQUIRE_LIBVIRT=1) but %s is missing: %v", libvirtSocket, err)
		}
		t.Skipf("no libvirtd (%v); set STRETCHY_REQUIRE_LIBVIRT=1 to fail instead", err)
	}
}

// dial connects to uri on the real libvirtd and disconnects when t ends.
func dial(t testing.TB, uri string) *libvirt.Libvirt {
	t.Helper()
	requireLibvirt(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	l, err := Dial(ctx, uri)
	if err != nil {
		t.Fatalf("Dial(%s): %v", uri, err)
	}
	t.Cleanup(func() {
		if err := l.Disconnect(); err != nil {
			t.Errorf("disconnect %s: %v", uri, err)
		}
	})
	return l
}

// testNode connects to libvirt's test driver, served by the real libvirtd,
// with the node in testdata/testnode.xml. It returns the connection and the
// directory standing in for the node's file system.
func testNode(t *testing.T) (*libvirt.Libvirt, string) {
	t.Helper()
	requireLibvirt(t)
	dir := t.TempDir()
	tmpl, err := os.ReadFile(filepath.Join("testdata", "testnode.xml"))
	if err != nil {
		t.Fatal(err)
	}
	// The unpooled image's disk exists, outside every pool.
	if err := os.WriteFile(filepath.Join(dir, "loose.qcow2"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(dir, "node.xml")
	if err := os.WriteFile(node, []byte(strings.ReplaceAll(string(tmpl), "@DIR@", dir)), 0o644); err != nil {
		t.Fatal(err)
	}
	return dial(t, "test://"+node), dir
}

// clone clones s and removes the machine again when t ends, whatever
// happens in between. Removal runs with its own context: t.Context() is
// already canceled when cleanups run.
func clone(t testing.TB, p *Provisioner, s Spec) Machine {
	t.Helper()
	t.Cleanup(func() {
		if _, err := p.Remove(context.Background(), s.JobID); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	m, err := p.Clone(t.Context(), s)
	if err != nil {
		t.Fatalf("Clone(%s): %v", s.JobID, err)
	}
	return m
}

// testHost is the host id in the metadata of this package's clones on the
// real libvirtd: a worker running beside these tests (another package's
// test, or a worker of the host) takes over only the machines of its own
// host id, so it leaves these alone.
const testHost = "provtest"

// testJobID returns a job id no other test run uses.
func testJobID(t testing.TB) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "provtest-" + hex.EncodeToString(b)
}

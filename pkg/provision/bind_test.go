package provision

import (
	"context"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestSystemWarmMachineBinds: a warm machine is cloned under its key, with
// no job; Bind, on the running machine, records the job in its metadata,
// which Lookup and List then report; a second Bind is refused; Remove by
// key removes it and its volumes.
func TestSystemWarmMachineBinds(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	var random [6]byte
	_, _ = rand.Read(random[:])
	key := messages.WarmKey(random)
	ctx := context.Background()
	t.Cleanup(func() {
		if _, err := p.Remove(context.Background(), key); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	m, err := p.Clone(ctx, Spec{Host: testHost, Key: key, Image: testImage(), Generation: "gen-1"})
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != DomainName(key) || m.JobID != "" || !m.Warm {
		t.Fatalf("warm clone %+v", m)
	}
	if err := p.Start(ctx, key); err != nil {
		t.Fatal(err)
	}
	job := testJobID(t)
	deadline := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	if _, err := p.Bind(ctx, key, Binding{JobID: job, RunnerKind: "forgejo", Deadline: deadline}); err != nil {
		t.Fatal(err)
	}
	got, found, err := p.Lookup(ctx, key)
	if err != nil || !found {
		t.Fatalf("Lookup: %v, %v", found, err)
	}
	if got.JobID != job || got.Key != key || !got.Warm || got.RunnerKind != "forgejo" || !got.Deadline.Equal(deadline) || got.Generation != "gen-1" {
		t.Fatalf("bound machine %+v", got)
	}
	if _, err := p.Bind(ctx, key, Binding{JobID: "other"}); !errors.Is(err, ErrExists) {
		t.Fatalf("a second Bind: %v, want ErrExists", err)
	}
	if existed, err := p.Remove(ctx, key); err != nil || !existed {
		t.Fatalf("Remove: %v, %v", existed, err)
	}
	if _, found, _ := p.Lookup(ctx, key); found {
		t.Fatal("the machine is still there")
	}
}

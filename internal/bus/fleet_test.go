package bus

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

func TestFleetRegistry(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	fleets := map[string]*Fleet{}
	for _, h := range []string{"a", "b", "c"} {
		f, err := OpenFleet(ctx, js, Topology{Host: h})
		if err != nil {
			t.Fatal(err)
		}
		fleets[h] = f
	}
	put := func(h string, st messages.HostState, images ...string) {
		rec := messages.Host{State: st}
		for _, i := range images {
			rec.Images = append(rec.Images, messages.HostImage{Name: i})
		}
		if err := fleets[h].PutHost(ctx, rec); err != nil {
			t.Fatal(err)
		}
	}
	put("a", messages.HostActive, "win11", "debian-12")
	put("b", messages.HostDraining, "win11")
	put("c", messages.HostActive, "macos:14")

	tests := []struct {
		from, image string
		want        []string
	}{
		{"c", "win11", []string{"a"}}, // b drains
		{"a", "win11", nil},           // only itself
		{"a", "macos:14", []string{"c"}},
		{"b", "debian-12", []string{"a"}},
		{"b", "nowhere", nil},
	}
	for _, tt := range tests {
		t.Run(tt.from+" "+tt.image, func(t *testing.T) {
			got, err := fleets[tt.from].Carriers(ctx, tt.image)
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("Carriers = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	if err := fleets["c"].DeleteHost(ctx); err != nil {
		t.Fatal(err)
	}
	// An operator's view of the same buckets.
	op := client.New(js)
	recs, err := op.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range recs {
		names = append(names, r.Host)
	}
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Fatalf("hosts after c stopped: %q", names)
	}

	// Drains outlive the host and are read per host.
	if err := op.Drain(ctx, "c", "ops"); err != nil {
		t.Fatal(err)
	}
	for h, want := range map[string]bool{"a": false, "c": true} {
		if got, err := fleets["a"].Drained(ctx, h); err != nil || got != want {
			t.Fatalf("Drained(%s) = %v, %v", h, got, err)
		}
	}
	if err := op.Undrain(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if got, err := fleets["a"].Drained(ctx, "c"); err != nil || got {
		t.Fatalf("after undrain: %v, %v", got, err)
	}
	if err := op.Drain(ctx, "bad.host", "ops"); err == nil {
		t.Fatal("drained an invalid host id")
	}
}

// TestTriedAppends: hosts recording the same request at once all end up in
// its record, each once.
func TestTriedAppends(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	const n = 8
	errs := make(chan error, 2*n)
	for i := range n {
		f, err := OpenFleet(ctx, js, Topology{Host: fmt.Sprintf("h%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 2 { // a second try by the same host changes nothing
				if _, err := f.Tried(ctx, 42, "job-1", "img"); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	f, err := OpenFleet(ctx, js, Topology{Host: "last"})
	if err != nil {
		t.Fatal(err)
	}
	hosts, err := f.Tried(ctx, 42, "job-1", "img")
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(hosts)
	want := []string{"h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "last"}
	if !slices.Equal(hosts, want) {
		t.Fatalf("tried by %q, want %q", hosts, want)
	}
	if err := f.ForgetTried(ctx, 42); err != nil {
		t.Fatal(err)
	}
	if hosts, err := f.Tried(ctx, 42, "job-1", "img"); err != nil || !slices.Equal(hosts, []string{"last"}) {
		t.Fatalf("after forgetting: %q, %v", hosts, err)
	}
}

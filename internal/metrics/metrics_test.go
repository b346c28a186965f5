package metrics

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// source is a worker as the metrics read it.
type source struct {
	snap worker.Snapshot
}

func (s *source) Snapshot() worker.Snapshot { return s.snap }

func (s *source) Carries(image string) bool {
	return slices.ContainsFunc(s.snap.Images, func(img messages.HostImage) bool { return img.Name == image })
}

// get answers a GET of path on a server of m's handler.
func get(t *testing.T, m *Metrics, path string) (int, string) {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(srv.Close)
	resp, err := http.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// TestReadyz: each check of /readyz has its own deadline, so a check that
// hangs does not make the others fail, and the answer names only the
// checks that failed.
func TestReadyz(t *testing.T) {
	// hangs until its deadline, as a round trip to a server that is down.
	hangs := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	// answers at once, unless it is asked with a context already done, as
	// libvirt's and nats.go's calls do.
	answers := func(ctx context.Context) error { return ctx.Err() }
	tests := []struct {
		name          string
		nats, libvirt func(context.Context) error
		state         messages.HostState
		code          int
		want, not     []string
	}{
		{"both answer", answers, answers, messages.HostActive, 200, []string{"ready"}, []string{"nats", "libvirt"}},
		{"nats hangs", hangs, answers, messages.HostActive, 503, []string{"nats: context deadline exceeded"}, []string{"libvirt", "ready"}},
		{"libvirt hangs", answers, hangs, messages.HostActive, 503, []string{"libvirt: context deadline exceeded"}, []string{"nats", "ready"}},
		{"both hang", hangs, hangs, messages.HostActive, 503, []string{"nats: context deadline exceeded", "libvirt: context deadline exceeded"}, []string{"ready"}},
		{"drained", answers, answers, messages.HostDrained, 503, []string{"host drained"}, []string{"nats", "libvirt", "ready"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := New(&source{snap: worker.Snapshot{State: tt.state}}, Probes{NATS: tt.nats, Libvirt: tt.libvirt, Timeout: time.Second})
			code, body := get(t, m, "/readyz")
			if code != tt.code {
				t.Errorf("status %d, want %d; body:\n%s", code, tt.code, body)
			}
			for _, w := range tt.want {
				if !strings.Contains(body, w) {
					t.Errorf("the answer does not say %q:\n%s", w, body)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(body, n) {
					t.Errorf("the answer names %q:\n%s", n, body)
				}
			}
		})
	}
}

// TestImageLabelBounded: requests name any image they like; the image
// label names only the images the host carries, and counts the rest as
// one, so made-up images add no series.
func TestImageLabelBounded(t *testing.T) {
	src := &source{snap: worker.Snapshot{
		State:    messages.HostActive,
		Images:   []messages.HostImage{{Name: "debian-12", Admitted: true}},
		Machines: map[string]int{"debian-12": 2},
	}}
	m := New(src, Probes{})
	m.Observe(messages.Event{State: messages.StateAccepted, Image: "debian-12", PhaseMS: 5})
	for i := range 100 {
		image := fmt.Sprintf("made-up-%d", i)
		// A pinned request for an image the host does not have is
		// accepted, then fails; its machine counts while it is built.
		src.snap.Machines[image] = 1
		m.Observe(messages.Event{State: messages.StateAccepted, Image: image, PhaseMS: 5})
		m.Observe(messages.Event{State: messages.StateFailed, Image: image,
			Error: &messages.Error{Code: messages.CodeImageNotFound}})
	}
	_, body := get(t, m, "/metrics")
	for _, tt := range []struct {
		series string
		want   map[string]string // image label: value
	}{
		{"stretchy_worker_phase_duration_seconds_count", map[string]string{"debian-12": "1", otherImage: "100"}},
		{"stretchy_worker_machines_running", map[string]string{"debian-12": "2", otherImage: "100"}},
	} {
		t.Run(tt.series, func(t *testing.T) {
			got := map[string]string{}
			label := regexp.MustCompile(`image="([^"]*)"`)
			for _, line := range strings.Split(body, "\n") {
				if !strings.HasPrefix(line, tt.series+"{") {
					continue
				}
				image := label.FindStringSubmatch(line)
				if image == nil {
					t.Fatalf("no image label: %s", line)
				}
				got[image[1]] = line[strings.LastIndex(line, " ")+1:]
			}
			if len(got) != len(tt.want) {
				t.Errorf("%d series, want %d: %v", len(got), len(tt.want), slices.Sorted(maps.Keys(got)))
			}
			for image, v := range tt.want {
				if got[image] != v {
					t.Errorf("image %q: %q, want %q", image, got[image], v)
				}
			}
		})
	}
}

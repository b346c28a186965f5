package worker

import "testing"

// TestCarries: the worker tells the images its host carries, as found by
// its inventory, so that the metrics label only those (internal/metrics).
func TestCarries(t *testing.T) {
	env := startServer(t)
	a := startFleetHost(t, env, "carrier", 0, "debian-12", "ubuntu-24.04")
	waitFor(t, "images found", func() bool { return len(a.changes("image_added")) == 2 })
	for _, tt := range []struct {
		image string
		want  bool
	}{{"debian-12", true}, {"ubuntu-24.04", true}, {"made-up", false}, {"", false}} {
		if got := a.w.Carries(tt.image); got != tt.want {
			t.Errorf("Carries(%q) = %v, want %v", tt.image, got, tt.want)
		}
	}
	a.inv.set("debian-12")
	waitFor(t, "image removed", func() bool { return len(a.changes("image_removed")) == 1 })
	if a.w.Carries("ubuntu-24.04") {
		t.Error("a removed image is still carried")
	}
}

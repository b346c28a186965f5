package bench

import (
	"math"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestOwnOverheadAddsUp: the worker's own overhead and the three parts it
// leaves out add up to end to end, and each part is the span the report
// names.
func TestOwnOverheadAddsUp(t *testing.T) {
	t0 := time.Date(2026, 12, 8, 3, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	seen := map[messages.State]messages.Event{
		messages.StateAccepted:      {Time: at(7)},
		messages.StateCloned:        {Time: at(40)},
		messages.StateRunning:       {Time: at(400)},
		messages.StateAgentReady:    {Time: at(3500)},
		messages.StateRunnerStarted: {Time: at(3620)},
		messages.StateRunnerExited:  {Time: at(5730)},
		messages.StateTornDown:      {Time: at(7000), PhaseMS: 1260},
	}
	ph := map[string]float64{}
	ownOverhead(ph, t0, at(3350), at(5620), at(6980), seen)
	want := map[string]float64{
		"own_request": 7, "own_clone": 33, "own_start": 360, "own_agent": 150, "own_runner": 120,
		"own_noticed": 110, "own_teardown": 10, "own_removal": 20,
		"overhead": 810, "run": 2000, "qemu_exit": 1240,
	}
	for k, v := range want {
		if math.Abs(ph[k]-v) > 1e-9 {
			t.Errorf("%s = %v, want %v", k, ph[k], v)
		}
	}
	boot := 3350.0 - 400
	if got := ph["overhead"] + boot + ph["run"] + ph["qemu_exit"]; got != 7000 {
		t.Errorf("overhead + boot + run + QEMU's exit = %v, want end to end 7000", got)
	}
	for _, part := range OverheadParts {
		if _, ok := ph[part.Key]; !ok {
			t.Errorf("part %s not set", part.Key)
		}
	}
}

// TestExitPlaced: an exit whose watcher was cut off lies between its last
// look and the moment it was noticed; an empty interval leaves it
// unknown; a watched exit stays as it was.
func TestExitPlaced(t *testing.T) {
	t0 := time.Date(2026, 12, 8, 3, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		e       exitTime
		noticed time.Time
		want    exitTime
		known   bool
	}{
		{"watched", exitTime{at: t0, half: time.Millisecond}, t0.Add(time.Second), exitTime{at: t0, half: time.Millisecond}, true},
		{"cut", exitTime{at: t0, cut: true}, t0.Add(100 * time.Millisecond), exitTime{at: t0.Add(50 * time.Millisecond), half: 50 * time.Millisecond}, true},
		{"cut, looked last after it was noticed", exitTime{at: t0, cut: true}, t0.Add(-time.Millisecond), exitTime{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, known := tc.e.placed(tc.noticed)
			if got != tc.want || known != tc.known {
				t.Errorf("placed = %+v, %v; want %+v, %v", got, known, tc.want, tc.known)
			}
		})
	}
}

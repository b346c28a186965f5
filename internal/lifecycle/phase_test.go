package lifecycle

import "testing"

// TestPhaseTransitions pins the phase table: the moves a machine makes in
// its life, and that every phase can reach PhaseGone.
func TestPhaseTransitions(t *testing.T) {
	tests := []struct {
		from, to Phase
		ok       bool
	}{
		{PhaseNew, PhaseBuilding, true},
		{PhaseNew, PhaseReady, false},
		{PhaseBuilding, PhaseReady, true},
		{PhaseBuilding, PhaseTearingDown, false}, // a teardown ends a build by rolling it back
		{PhaseBuilding, PhaseRollingBack, true},
		{PhaseRollingBack, PhaseReady, false},
		{PhaseReady, PhaseEnding, true},
		{PhaseReady, PhaseTearingDown, true},
		{PhaseEnding, PhaseTearingDown, true},
		{PhaseEnding, PhaseReady, true},
		{PhaseTearingDown, PhaseReady, true}, // a failed teardown is tried again
		{PhaseTearingDown, PhaseBuilding, false},
		{PhaseSettling, PhaseTearingDown, true},
		{PhaseSettling, PhaseBuilding, false},
		{PhaseGone, PhaseReady, false},
		{PhaseRollingBack, PhaseIdle, true},     // a warm machine its job did not bind goes back to its pool
		{PhaseRollingBack, PhaseRemoving, true}, // a machine the rollback could not remove
		{PhaseRemoving, PhaseTearingDown, true},
		{PhaseRemoving, PhaseReady, false},
		{PhaseTearingDown, PhaseRemoving, true},
	}
	for _, tt := range tests {
		t.Run(tt.from.String()+"->"+tt.to.String(), func(t *testing.T) {
			if got := allowed(tt.from, tt.to); got != tt.ok {
				t.Fatalf("allowed(%s, %s) = %v, want %v", tt.from, tt.to, got, tt.ok)
			}
		})
	}
	for p := PhaseNew; p < PhaseGone; p++ {
		if !allowed(p, PhaseGone) {
			t.Errorf("%s cannot reach gone", p)
		}
		if p.String() == "" {
			t.Errorf("phase %d has no name", p)
		}
	}
}

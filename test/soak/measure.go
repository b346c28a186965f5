package soak

import (
	"context"
	"errors"
	"io"
	"time"
)

// RecommendedSync is the sync_interval docs/fleet.md recommends, which
// the soak's cluster runs.
const RecommendedSync = "always"

// MeasureConfig configures MeasureSync.
type MeasureConfig struct {
	NATSBin string
	Dir     string
	Rounds  int
	Events  int
	Logf    func(string, ...any)
	_       time.Duration
}

// MeasureSync is not written yet.
func MeasureSync(ctx context.Context, cfg MeasureConfig, w io.Writer) error {
	return errors.New("not yet")
}

package soak

import (
	"errors"

	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// WriteReport is not written yet.
func WriteReport(path string, h *check.History, r check.Report) error { return errors.New("not yet") }

package main

import (
	"os"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// prepareConsoleDir creates the console directory if it is missing and
// refuses one that is not the worker's alone (provision.CheckConsoleDir).
// virtlogd creates the logs, not the directory; root's and the worker's
// only, as the logs may show what a job printed.
func prepareConsoleDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return provision.CheckConsoleDir(dir)
}

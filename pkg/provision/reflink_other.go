//go:build !linux

package provision

import "errors"

var errNoFICLONE = errors.New("FICLONE is Linux-only")

func reflink(dst, src string) error { return errNoFICLONE }

func reflinkUnsupported(err error) bool { return errors.Is(err, errNoFICLONE) }

func fsName(string) string { return "a file system of another OS" }

package main

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

// TestViewLoggers: the host view's loggers say when the view stops and
// starts being current, once each time, and warn of a shared MAC address
// once per address and set of domains.
func TestViewLoggers(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	check := viewLogger(log)
	for _, err := range []error{nil, errors.New("list domains: broken"), errors.New("again"), nil, nil} {
		check(err)
	}
	shared := sharedMACLogger(log)
	shared("52:54:00:00:00:01", []string{"a", "stretchy-j"})
	shared("52:54:00:00:00:01", []string{"a", "stretchy-j"})
	shared("52:54:00:00:00:01", []string{"b", "stretchy-j"})
	out := buf.String()
	for _, tc := range []struct {
		want string
		n    int
	}{
		{"host view check failed", 1},
		{"error=\"list domains: broken\"", 1},
		{"host view current again", 1},
		{"shares its MAC address", 2},
	} {
		if got := strings.Count(out, tc.want); got != tc.n {
			t.Errorf("%q logged %d times, want %d:\n%s", tc.want, got, tc.n, out)
		}
	}
}

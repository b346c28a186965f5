package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrepareConsoleDir: the worker creates its console directory when
// missing and refuses to start with one that others could write to.
func TestPrepareConsoleDir(t *testing.T) {
	base := t.TempDir()
	tests := []struct {
		name string
		mode os.FileMode // of an existing directory; 0: none
		want string
	}{
		{"missing: created", 0, ""},
		{"the worker's", 0o700, ""},
		{"world-writable", 0o777, "group or others may write to it"},
		{"group-writable", 0o770, "group or others may write to it"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(base, strings.ReplaceAll(tt.name, " ", "-"), "console")
			if tt.mode != 0 {
				if err := os.MkdirAll(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dir, tt.mode); err != nil {
					t.Fatal(err)
				}
			}
			err := prepareConsoleDir(dir)
			if tt.want == "" {
				fi, serr := os.Stat(dir)
				if err != nil || serr != nil || fi.Mode().Perm() != 0o700 {
					t.Fatalf("prepareConsoleDir = %v; directory %v, %v", err, fi, serr)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("prepareConsoleDir = %v, want %q", err, tt.want)
			}
		})
	}
}

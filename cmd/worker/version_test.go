package main

import (
	"runtime/debug"
	"testing"
)

// TestBuildInfoVersion: a build from a git checkout, which Go stamps with
// the commit but not a module version, is named by its commit, its time
// and whether the tree was modified; a module version is kept as it is.
func TestBuildInfoVersion(t *testing.T) {
	const rev = "5faf1c40af9f403b67aba3286b7002528a50f981"
	vcs := func(modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev},
			{Key: "vcs.time", Value: "2026-11-27T06:01:13Z"}, {Key: "vcs.modified", Value: modified}}
	}
	tests := []struct {
		name     string
		version  string
		settings []debug.BuildSetting
		want     string
	}{
		{"checkout", "(devel)", vcs("false"), "devel-20261127060113-5faf1c40af9f"},
		{"modified checkout", "(devel)", vcs("true"), "devel-20261127060113-5faf1c40af9f+dirty"},
		{"no commit time", "(devel)", []debug.BuildSetting{{Key: "vcs.revision", Value: rev}}, "devel-5faf1c40af9f"},
		{"no vcs (-buildvcs=false, go run)", "(devel)", nil, "(devel)"},
		{"go install of a tag", "v1.5.0", nil, "v1.5.0"},
		{"tagged checkout", "v1.5.0", vcs("false"), "v1.5.0"},
		{"pseudo-version of a modified checkout", "v0.0.0-20261127060113-5faf1c40af9f+dirty", vcs("true"),
			"v0.0.0-20261127060113-5faf1c40af9f+dirty"},
		{"no version", "", nil, "(devel)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/stretchy-ci/libvirt-worker", Version: tt.version}, Settings: tt.settings}
			if got := buildInfoVersion(bi); got != tt.want {
				t.Errorf("version %q, want %q", got, tt.want)
			}
		})
	}
}

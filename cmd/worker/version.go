package main

import (
	"runtime/debug"
	"time"
)

// buildVersion is set at link time (-ldflags "-X main.buildVersion=v1.2.3");
// without it the version comes from the build information.
var buildVersion string

// version is the worker's version as it appears in the host registry.
func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	return buildInfoVersion(bi)
}

// buildInfoVersion is the version of a build by its build information:
// the module version if it has one (go install of a tag, or the version
// Go derives from a checkout's tags), else, for a build from a git
// checkout, devel-<commit time>-<commit>, with +dirty if the tree was
// modified (the vcs.* settings go build records), else "(devel)".
func buildInfoVersion(bi *debug.BuildInfo) string {
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	vcs := map[string]string{}
	for _, s := range bi.Settings {
		vcs[s.Key] = s.Value
	}
	rev := vcs["vcs.revision"]
	if rev == "" {
		return "(devel)"
	}
	v := "devel-"
	if t, err := time.Parse(time.RFC3339Nano, vcs["vcs.time"]); err == nil {
		v += t.UTC().Format("20060102150405") + "-"
	}
	v += rev[:min(12, len(rev))]
	if vcs["vcs.modified"] == "true" {
		v += "+dirty"
	}
	return v
}

package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestNoFakeAgentInNormalBuild builds the worker as a host gets it and as
// the soak builds it, and checks that only the soak's holds the fake
// guest agent and the variable that turns it on: a production worker can
// never be made to skip the real guest agent.
func TestNoFakeAgentInNormalBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the worker twice")
	}
	dir := t.TempDir()
	markers := [][]byte{[]byte(fakeAgentMarkerEnv), []byte("main.(*fakeAgent)")}
	for _, tc := range []struct {
		name string
		tags []string
		want bool
	}{
		{name: "normal", want: false},
		{name: "soak", tags: []string{"-tags", "soak"}, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin := filepath.Join(dir, tc.name)
			args := append([]string{"build"}, tc.tags...)
			args = append(args, "-o", bin, ".")
			cmd := exec.Command("go", args...)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("go %v: %v\n%s", args, err, out)
			}
			b, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range markers {
				if got := bytes.Contains(b, m); got != tc.want {
					t.Errorf("%s build holds %q: %v, want %v", tc.name, m, got, tc.want)
				}
			}
		})
	}
}

// fakeAgentMarkerEnv is the soak build's variable, spelled here so that
// this file does not depend on the build tag.
const fakeAgentMarkerEnv = "STRETCHY_SOAK_AGENT"

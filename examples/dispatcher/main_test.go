package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// TestJobDescriptions: each line becomes the provision request its fields
// describe, by the names of worker submit's flags, its secret read from
// its file; the request passes the protocol's checks.
func TestJobDescriptions(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(secret, []byte("tok-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lines := `{"job": "d-1", "image": "tiny-linux", "runner": "forgejo", "secret_file": "` + secret + `", "deadline": "90s",
		"fields": {"url": "https://forgejo.example.org/", "uuid": "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", "label": ["tiny", "stub-exit=3"]}}

{"job": "d-2", "image": "tiny-linux", "max_lifetime": "10m"}
`
	specs, err := readSpecs(strings.NewReader(strings.ReplaceAll(lines, "\n\t\t", " ")))
	if err != nil || len(specs) != 2 {
		t.Fatalf("read %d specs, %v", len(specs), err)
	}
	req, deadline, err := specs[0].request(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f := req.Runner.Forgejo
	if req.Runner.Kind != messages.RunnerForgejo || f == nil || f.Token != "tok-1" || f.URL != "https://forgejo.example.org/" ||
		strings.Join(f.Labels, ",") != "tiny,stub-exit=3" || deadline != 90*time.Second {
		t.Fatalf("request %+v (forgejo %+v), deadline %s", req, f, deadline)
	}
	req, deadline, err = specs[1].request(time.Hour)
	if err != nil || req.Runner.Kind != messages.RunnerNone || req.MaxLifetimeS != 600 || deadline != time.Hour {
		t.Fatalf("request %+v, deadline %s, %v", req, deadline, err)
	}
	for _, s := range specs {
		req, _, _ := s.request(time.Hour)
		req.V, req.RequestedAt = messages.SchemaVersion, time.Now()
		if err := runners.Validate(&req); err != nil {
			t.Errorf("job %s: %v", s.Job, err)
		}
	}
	for _, bad := range []string{`{"job": "x", "runner": "travis"}`, `{"job": "x", "deadline": "soon"}`, `{"job": "x", "colour": "red"}`} {
		specs, err := readSpecs(strings.NewReader(bad))
		if err == nil {
			_, _, err = specs[0].request(time.Hour)
		}
		if err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

// TestPhases: the progress line counts a job by its status.
func TestPhases(t *testing.T) {
	for _, tt := range []struct {
		r    result
		want string
	}{
		{result{}, "waiting"},
		{result{status: client.Status{State: messages.StateCloning}}, "booting"},
		{result{status: client.Status{State: messages.StateRunnerStarted}}, "running"},
		{result{status: client.Status{State: messages.StateTearingDown}}, "ending"},
		{result{status: client.Status{State: messages.StateTornDown, Outcome: &client.Outcome{}}}, "done"},
		{result{finished: true}, "done"},
	} {
		if got := phase(tt.r); got != tt.want {
			t.Errorf("phase(%+v) = %s, want %s", tt.r.status, got, tt.want)
		}
	}
}

package messages

import (
	"bytes"
	"encoding/hex"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

var update = flag.Bool("update", false, "rewrite the golden msgpack fixtures")

var requestedAt = time.Date(2026, 11, 27, 5, 0, 0, 0, time.UTC)

func goldenCases() map[string]any {
	return map[string]any{
		"provision_none_v1": &Provision{
			V: 1, JobID: "job-42", Image: "debian-12", Runner: Runner{Kind: RunnerNone},
			BootTimeoutS: 60, MaxLifetimeS: 3600, RequestedAt: requestedAt,
		},
		"provision_forgejo_v1": &Provision{
			V: 1, JobID: "fj-1", Image: "debian-12",
			Runner: Runner{Kind: RunnerForgejo, Forgejo: &ForgejoRunner{
				URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
				Token: "s3cr3t-token", Labels: []string{"debian-12", "x86_64"}, Handle: "h-77",
			}},
			RequestedAt: requestedAt,
		},
		"provision_github_v1": &Provision{
			V: 1, JobID: "gh-1", Image: "ubuntu-24.04",
			Runner:      Runner{Kind: RunnerGitHub, GitHub: &GitHubRunner{JITConfig: "eyJqaXQiOiJjb25maWcifQ=="}},
			RequestedAt: requestedAt,
		},
		"provision_jenkins_v1": &Provision{
			V: 1, JobID: "jk-1", Image: "freebsd-14",
			Runner: Runner{Kind: RunnerJenkins, Jenkins: &JenkinsAgent{
				URL: "https://jenkins.example.org/", AgentName: "stretchy-jk-1", Secret: "abcdef0123", WorkDir: "/home/stretchy/work",
			}},
			RequestedAt: requestedAt,
		},
		"provision_sized_v1": &Provision{
			V: 1, JobID: "job-46", Image: "debian-12", Runner: Runner{Kind: RunnerNone}, RequestedAt: requestedAt,
			VCPUs: 4, MemoryMiB: 8192, ScratchDiskGiB: 50, HoldOnFailureS: 1800,
		},
		"teardown_v1": &Teardown{V: 1, JobID: "job-42", Reason: "job finished", RequestedAt: requestedAt},
		"event_running_v1": &Event{
			V: 1, JobID: "job-42", Host: "host-a", Image: "debian-12", Domain: "stretchy-job-42",
			State: StateRunning, Time: requestedAt.Add(9 * time.Second), Seq: 5, Attempt: 1, PhaseMS: 4200,
		},
		"event_runner_exited_v1": &Event{
			V: 1, JobID: "fj-1", Host: "host-a", Image: "debian-12", Domain: "stretchy-fj-1",
			State: StateRunnerExited, Time: requestedAt.Add(10 * time.Minute), Seq: 8, Attempt: 0, PhaseMS: 583000,
			OS: "linux", ExitCode: ptr(0), Output: "job finished: success\n",
		},
		"event_runner_exited_withheld_v1": &Event{
			V: 1, JobID: "fj-2", Host: "host-a", Image: "debian-12", Domain: "stretchy-fj-2",
			State: StateRunnerExited, Time: requestedAt.Add(10 * time.Minute), Seq: 8, Attempt: 0,
			OS: "linux", ExitCode: ptr(1), OutputWithheld: true,
		},
		"event_warm_ready_v1": &Event{
			V: 1, Host: "host-a", Image: "debian-12", Domain: "stretchy-_warm-0a1b2c3d4e5f", State: StateAgentReady,
			Time: requestedAt.Add(12 * time.Second), Seq: 5, PhaseMS: 7400, OS: "linux", Machine: "_warm-0a1b2c3d4e5f",
		},
		"event_runner_started_warm_v1": &Event{
			V: 1, JobID: "fj-3", Host: "host-a", Image: "debian-12", Domain: "stretchy-_warm-0a1b2c3d4e5f", State: StateRunnerStarted,
			Time: requestedAt.Add(time.Minute), Seq: 7, Attempt: 1, PhaseMS: 180, OS: "linux", RunnerPID: 233,
			Machine: "_warm-0a1b2c3d4e5f", Warm: true,
		},
		"event_failed_v1": &Event{
			V: 1, JobID: "job-43", Host: "host-a", Image: "nope", Domain: "stretchy-job-43", State: StateFailed,
			Time: requestedAt, Seq: 2, Attempt: 1,
			Error: &Error{Code: CodeImageNotFound, Message: `image "nope" is not defined on host-a`},
		},
		"event_failed_console_v1": &Event{
			V: 1, JobID: "job-47", Host: "host-a", Image: "debian-12", Domain: "stretchy-job-47", State: StateFailed,
			Time: requestedAt.Add(5 * time.Minute), Seq: 6, Attempt: 1,
			Console: "[    1.734510] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n[    1.735002] ---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---\n",
			Error:   &Error{Code: CodeBootTimeout, Message: "the guest agent did not answer within 300s"},
		},
		"event_failed_held_v1": &Event{
			V: 1, JobID: "job-48", Host: "host-a", Image: "debian-12", Domain: "stretchy-job-48", State: StateFailed,
			Time: requestedAt.Add(6 * time.Minute), Seq: 6, Attempt: 1, HeldUntil: requestedAt.Add(36 * time.Minute),
			Console: "init: /sbin/init failed\n",
			Error:   &Error{Code: CodeBootTimeout, Message: "the guest agent did not answer within 300s"},
		},
		"event_released_v1": &Event{
			V: 1, JobID: "job-48", Host: "host-a", Image: "debian-12", Domain: "stretchy-job-48", State: StateReleased,
			Time: requestedAt.Add(36 * time.Minute), Seq: 7, PhaseMS: 120, Reason: ReasonHoldExpired,
		},
		"host_resources_v1": &Host{
			V: 1, Host: "host-b", Version: "v1.5.0", State: HostActive,
			Images:     []HostImage{{Name: "debian-12", OS: "linux", Firmware: "bios", CloneMode: "linked", Generation: "5f0c2a9e41d7b3c8", Admitted: true}},
			SlotsTotal: 3, MachinesMax: 8, MachinesRunning: 2,
			VCPUsTotal: 16, VCPUsUsed: 6, MemoryTotalMiB: 32768, MemoryUsedMiB: 12288, MaxVCPUsPerMachine: 8, MaxMemoryPerMachineMiB: 16384,
			Held:    []HostHeld{{JobID: "job-48", Until: requestedAt.Add(36 * time.Minute)}},
			Started: requestedAt.Add(-time.Hour), Heartbeat: requestedAt,
		},
		"host_scratch_v1": &Host{
			V: 1, Host: "host-c", Version: "v1.6.0", State: HostActive,
			Images:     []HostImage{{Name: "debian-12", OS: "linux", Firmware: "bios", CloneMode: "linked", Generation: "5f0c2a9e41d7b3c8", Admitted: true}},
			SlotsTotal: 3, MachinesMax: 8, MachinesRunning: 1,
			Pools:         []HostPool{{Name: "ci-images", FreeBytes: 53687091200}},
			MaxScratchGiB: 100,
			Started:       requestedAt.Add(-time.Hour), Heartbeat: requestedAt,
		},
		"control_hold_v1":    &Control{V: 1, Op: ControlHold, JobID: "job-42", ForS: 1800, By: "ops@bastion"},
		"control_console_v1": &Control{V: 1, Op: ControlConsole, JobID: "job-42", Bytes: 65536},
		"control_reply_v1": &ControlReply{
			V: 1, OK: true, Host: "host-a", Phase: "held", HeldUntil: requestedAt.Add(30 * time.Minute),
		},
		"control_reply_error_v1": &ControlReply{
			V: 1, Host: "host-a", Phase: "building", Error: "the machine of job job-42 is being built; hold it once its runner started: not possible in the machine's phase",
		},
		"event_dropped_v1": &Event{
			V: 1, JobID: "job-44", Host: "host-a", Image: "debian-12", Domain: "stretchy-job-44", State: StateDropped,
			Time: requestedAt.Add(40 * time.Second), Seq: 3, Attempt: 1, Reason: ReasonClaimLost, Holder: "host-b",
		},
		"claim_v1": &Claim{V: 1, Host: "host-b", Request: 1207, Since: requestedAt.Add(35 * time.Second)},
		"host_v1": &Host{
			V: 1, Host: "host-a", Version: "v1.4.0", State: HostActive,
			Images: []HostImage{
				{Name: "debian-12", OS: "linux", Firmware: "bios", CloneMode: "linked", Generation: "5f0c2a9e41d7b3c8", Admitted: true},
				{Name: "win11+gpu", OS: "windows", Firmware: "efi", CloneMode: "copy", Generation: "91ab03cd77e2f610", Admitted: false},
			},
			SlotsTotal: 3, SlotsInUse: 1, MachinesMax: 8, MachinesRunning: 2,
			Pools:   []HostPool{{Name: "ci-images", FreeBytes: 53687091200}, {Name: "win", FreeBytes: 1073741824, Low: true}},
			Started: requestedAt.Add(-time.Hour), Heartbeat: requestedAt,
		},
		// The box is the one libsodium made for
		// provision_sealed_python_v1 (docs/protocol.md 3.13), to the test
		// key of pkg/seal.
		"provision_sealed_v1": &Provision{
			V: 1, JobID: "fj-2", Image: "debian-12",
			Runner: Runner{Kind: RunnerForgejo, Forgejo: &ForgejoRunner{
				URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Labels: []string{"debian-12"},
			}, Sealed: &SealedSecret{KeyID: "7c70d623df12581c", Box: mustHex(
				"8520365cb921ed1b9a4e6fa614f0ba1659cc57f8a4d7441e1bba44e06825f8751ab6204439934db0d0b497815d531274e97fed55c89e1ace6ab80d91483aee450e98b633087fa003b9ce3c744f467f1233079b63")}},
			RequestedAt: requestedAt,
		},
		"host_seal_keys_v1": &Host{
			V: 1, Host: "host-a", Version: "v1.5.0", State: HostActive,
			Images:     []HostImage{{Name: "debian-12", OS: "linux", Firmware: "bios", CloneMode: "linked", Generation: "5f0c2a9e41d7b3c8", Admitted: true}},
			SlotsTotal: 3, MachinesMax: 8, Pools: []HostPool{{Name: "ci-images", FreeBytes: 53687091200}},
			SealKeys: []SealKey{{ID: "7c70d623df12581c", Public: mustHex("666f96c4fd28f564cad97ff560bc4233b21153a9f7932cd8ac10d2b9669cf108")}},
			Started:  requestedAt.Add(-time.Hour), Heartbeat: requestedAt,
		},
		"drain_v1": &Drain{V: 1, Host: "host-a", By: "ops@bastion", At: requestedAt},
		"tried_v1": &Tried{V: 1, JobID: "job-45", Image: "macos:14", Hosts: []string{"host-a", "host-b"}},
	}
}

func ptr[T any](v T) *T { return &v }

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// TestGolden pins the encoding of every message kind. Run with -update after
// a deliberate change of the contract, and update docs/protocol.md with it.
func TestGolden(t *testing.T) {
	for name, v := range goldenCases() {
		t.Run(name, func(t *testing.T) {
			got, err := Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", name+".msgpack")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read fixture (run go test -update once): %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("encoding drifted from %s:\n got %x\nwant %x", path, got, want)
			}
			// The fixture decodes back to the same value.
			back := reflect.New(reflect.TypeOf(v).Elem()).Interface()
			if err := msgpack.Unmarshal(want, back); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(normalize(back), normalize(v)) {
				t.Fatalf("round trip changed the value:\n got %+v\nwant %+v", back, v)
			}
		})
	}
}

// normalize makes times comparable with DeepEqual (decoded times are local).
func normalize(v any) any {
	switch m := v.(type) {
	case *Provision:
		c := *m
		c.RequestedAt = c.RequestedAt.UTC()
		return c
	case *Teardown:
		c := *m
		c.RequestedAt = c.RequestedAt.UTC()
		return c
	case *Event:
		c := *m
		c.Time, c.HeldUntil = c.Time.UTC(), c.HeldUntil.UTC()
		return c
	case *ControlReply:
		c := *m
		c.HeldUntil = c.HeldUntil.UTC()
		return c
	case *Claim:
		c := *m
		c.Since = c.Since.UTC()
		return c
	case *Host:
		c := *m
		c.Started, c.Heartbeat = c.Started.UTC(), c.Heartbeat.UTC()
		for i := range c.Held {
			c.Held[i].Until = c.Held[i].Until.UTC()
		}
		return c
	case *Drain:
		c := *m
		c.At = c.At.UTC()
		return c
	}
	return v
}

// TestFixturesAreMapsWithNames checks the property other languages rely on:
// every message is a map keyed by field name.
func TestFixturesAreMapsWithNames(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "provision_forgejo_v1.msgpack"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := msgpack.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"v", "job_id", "image", "runner", "requested_at"} {
		if _, ok := m[k]; !ok {
			t.Errorf("key %q missing from %v", k, m)
		}
	}
	if _, ok := m["boot_timeout_s"]; ok {
		t.Error("zero optional field boot_timeout_s should be omitted")
	}
}

func TestUnknownFieldsIgnored(t *testing.T) {
	newer := map[string]any{
		"v": 1, "job_id": "j1", "image": "img", "requested_at": requestedAt,
		"runner":        map[string]any{"kind": "none", "future_knob": true},
		"priority":      7,
		"labels_future": []string{"a", "b"},
	}
	data, err := msgpack.Marshal(newer)
	if err != nil {
		t.Fatal(err)
	}
	p, err := DecodeProvision(data)
	if err != nil {
		t.Fatalf("a message with unknown fields must decode: %v", err)
	}
	if err := p.ValidateEnvelope(); err != nil {
		t.Fatalf("and validate: %v", err)
	}
	if p.JobID != "j1" || p.Image != "img" || p.Runner.Kind != RunnerNone {
		t.Fatalf("decoded %+v", p)
	}
}

func TestDecodeRejects(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"not msgpack", []byte("hello, world"), ErrMalformed},
		{"truncated", mustMarshal(t, goldenCases()["provision_none_v1"])[:10], ErrMalformed},
		{"array instead of map", mustMarshal(t, []any{1, "j1"}), ErrMalformed},
		{"wrong type for job_id", mustMarshal(t, map[string]any{"v": 1, "job_id": 12}), ErrMalformed},
		{"too large", make([]byte, MaxMessageSize+1), ErrTooLarge},
		{"empty", nil, ErrMalformed},
		{"nil timestamp", mustMarshal(t, map[string]any{"v": 1, "job_id": "j", "requested_at": nil}), ErrMalformed},
		{"timestamp as string", mustMarshal(t, map[string]any{"v": 1, "job_id": "j", "requested_at": "yesterday"}), ErrMalformed},
		{"runner as list", mustMarshal(t, map[string]any{"v": 1, "job_id": "j", "runner": []any{"none"}}), ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeProvision(tt.data)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := msgpack.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestProvisionValidateEnvelope checks what ValidateEnvelope checks;
// pkg/runners tests the runner section (TestValidate).
func TestProvisionValidateEnvelope(t *testing.T) {
	valid := func() Provision {
		return *goldenCases()["provision_forgejo_v1"].(*Provision)
	}
	tests := []struct {
		name   string
		mutate func(*Provision)
		want   string // substring of the error; "" means valid
	}{
		{"valid", func(*Provision) {}, ""},
		{"version 2", func(p *Provision) { p.V = 2 }, "unsupported schema version"},
		{"version missing", func(p *Provision) { p.V = 0 }, "unsupported schema version"},
		{"job id empty", func(p *Provision) { p.JobID = "" }, "job_id"},
		{"job id with slash", func(p *Provision) { p.JobID = "a/b" }, "job_id"},
		{"job id with dots", func(p *Provision) { p.JobID = ".." }, "job_id"},
		{"job id with NUL", func(p *Provision) { p.JobID = "a\x00b" }, "job_id"},
		{"job id with xml", func(p *Provision) { p.JobID = "a<b>" }, "job_id"},
		{"job id lookalike", func(p *Provision) { p.JobID = "jоb" }, "job_id"}, // Cyrillic о
		{"job id too long", func(p *Provision) { p.JobID = strings.Repeat("a", 65) }, "job_id"},
		{"job id 64", func(p *Provision) { p.JobID = strings.Repeat("a", 64) }, ""},
		{"image managed", func(p *Provision) { p.Image = "stretchy-x" }, "reserved"},
		{"image xml", func(p *Provision) { p.Image = "a'/><x" }, "image"},
		{"image empty", func(p *Provision) { p.Image = "" }, "image"},
		{"negative boot timeout", func(p *Provision) { p.BootTimeoutS = -1 }, "boot_timeout_s"},
		{"absurd lifetime", func(p *Provision) { p.MaxLifetimeS = 1 << 40 }, "max_lifetime_s"},
		{"no requested_at", func(p *Provision) { p.RequestedAt = time.Time{} }, "requested_at"},
		{"sized", func(p *Provision) { p.VCPUs, p.MemoryMiB, p.ScratchDiskGiB, p.HoldOnFailureS = 2, 256, 1, 30 }, ""},
		{"largest size", func(p *Provision) {
			p.VCPUs, p.MemoryMiB, p.ScratchDiskGiB, p.HoldOnFailureS = MaxVCPUs, MaxMemoryMiB, MaxScratchDiskGiB, 86400
		}, ""},
		{"smallest memory", func(p *Provision) { p.MemoryMiB = MinMemoryMiB }, ""},
		{"negative vcpus", func(p *Provision) { p.VCPUs = -1 }, "vcpus: must be between 0 (the image's) and 1024, got -1"},
		{"too many vcpus", func(p *Provision) { p.VCPUs = MaxVCPUs + 1 }, "vcpus: must be between 0 (the image's) and 1024, got 1025"},
		{"negative memory", func(p *Provision) { p.MemoryMiB = -256 }, "memory_mib: must be 0 (the image's) or between 32 and 4194304, got -256"},
		{"memory below the minimum", func(p *Provision) { p.MemoryMiB = MinMemoryMiB - 1 }, "memory_mib: must be 0 (the image's) or between 32 and 4194304, got 31"},
		{"memory above the maximum", func(p *Provision) { p.MemoryMiB = MaxMemoryMiB + 1 }, "memory_mib"},
		{"negative scratch disk", func(p *Provision) { p.ScratchDiskGiB = -1 }, "scratch_disk_gib: must be between 0 (none) and 65536, got -1"},
		{"scratch disk too large", func(p *Provision) { p.ScratchDiskGiB = MaxScratchDiskGiB + 1 }, "scratch_disk_gib"},
		{"negative hold", func(p *Provision) { p.HoldOnFailureS = -1 }, "hold_on_failure_s: must be between 0 (no hold) and 86400, got -1"},
		{"hold over a day", func(p *Provision) { p.HoldOnFailureS = 86401 }, "hold_on_failure_s"},
		// The runner section is not the envelope's.
		{"unknown kind", func(p *Provision) { p.Runner.Kind = "buildkite" }, ""},
		{"missing section", func(p *Provision) { p.Runner.Forgejo = nil }, ""},
		{"no token", func(p *Provision) { p.Runner.Forgejo.Token = "" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := valid()
			f := *p.Runner.Forgejo
			p.Runner.Forgejo = &f
			tt.mutate(&p)
			err := p.ValidateEnvelope()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("want error containing %q, got %v", tt.want, err)
			}
		})
	}
}

func TestPeekJobID(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"valid map, bad other field", mustMarshal(t, map[string]any{"job_id": "j7", "v": "one"}), "j7"},
		{"invalid id", mustMarshal(t, map[string]any{"job_id": "../etc"}), ""},
		{"garbage", []byte{0xc1, 0x00}, ""},
		{"no id", mustMarshal(t, map[string]any{"image": "x"}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := PeekJobID(tt.data); got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTerminalStates(t *testing.T) {
	for _, s := range States {
		want := s == StateTornDown || s == StateFailed
		if s.Terminal() != want {
			t.Errorf("%s.Terminal() = %v", s, s.Terminal())
		}
	}
}

func TestSubjects(t *testing.T) {
	if got := EventSubject("h1", "j1", StateRunning); got != "stretchy.LIBVIRT.evt.h1.j1.running" {
		t.Errorf("EventSubject = %q", got)
	}
	if got := EventFilter("", "j1", ""); got != "stretchy.LIBVIRT.evt.*.j1.*" {
		t.Errorf("EventFilter = %q", got)
	}
	if got := TeardownSubject("h1"); got != "stretchy.LIBVIRT.req.host.h1.teardown" {
		t.Errorf("TeardownSubject = %q", got)
	}
}

// TestFieldRules pins the rules pkg/runners applies to the fields of
// runner sections.
func TestFieldRules(t *testing.T) {
	const secret = "s3cr3t"
	tests := []struct {
		name  string
		check func(field, v string) string
		v     string
		want  string
	}{
		{"text", CheckText, "日本語 and spaces", ""},
		{"text empty", CheckText, "", "f: missing"},
		{"text 1024", CheckText, strings.Repeat("t", 1024), ""},
		{"text 1025", CheckText, strings.Repeat("t", 1025), "f: longer than 1024 bytes"},
		{"text tab", CheckText, "a\tb", "f: contains control characters"},
		{"secret", CheckSecret, secret, ""},
		{"secret empty", CheckSecret, "", "f: missing"},
		{"secret 16384", CheckSecret, strings.Repeat("s", 16<<10), ""},
		{"secret 16385", CheckSecret, strings.Repeat("s", 16<<10+1), "f: longer than 16384 bytes"},
		{"secret newline", CheckSecret, secret + "\n", "f: contains control characters"},
		{"url", CheckURL, "https://code.example.org/a?b=c", ""},
		{"url http", CheckURL, "http://10.0.0.1:3000", ""},
		{"url empty", CheckURL, "", "f: missing"},
		{"url credentials", CheckURL, "https://u:" + secret + "@x/", "f: must not carry credentials"},
		{"url user", CheckURL, "https://" + secret + "@x/", "f: must not carry credentials"},
		{"url space", CheckURL, "https://x/a b", "f: must be a URL of at most 2048 bytes without spaces or control characters"},
		{"url 2049", CheckURL, "https://x/" + strings.Repeat("a", 2039), "f: must be a URL of at most 2048 bytes without spaces or control characters"},
		{"url ftp", CheckURL, "ftp://x/", "f: scheme must be http or https"},
		{"url relative", CheckURL, "/a/b", "f: scheme must be http or https"},
		{"url no host", CheckURL, "http://", "f: has no host"},
		{"url unparsable", CheckURL, "http://[::1", "f: not a URL"},
		{"uuid", CheckUUID, "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", ""},
		{"uuid upper case", CheckUUID, "0E6F5F3C-3B7A-4C2E-9D7A-1C2B3A4D5E6F", ""},
		{"uuid empty", CheckUUID, "", "f: missing"},
		{"uuid text", CheckUUID, "u-1", "f: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"},
		{"uuid without hyphens", CheckUUID, "0e6f5f3c3b7a4c2e9d7a1c2b3a4d5e6f", "f: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"},
		{"uuid urn", CheckUUID, "urn:uuid:0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", "f: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"},
		{"uuid trailing newline", CheckUUID, "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f\n", "f: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"},
		{"uuid secret", CheckUUID, secret, "f: must be a UUID, 32 hexadecimal digits as 8-4-4-4-12"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.check("f", tt.v); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestCheckLabels(t *testing.T) {
	padded := func(field, label string) string {
		if strings.TrimSpace(label) != label {
			return field + ": padded"
		}
		return ""
	}
	tests := []struct {
		name   string
		labels []string
		each   func(field, label string) string
		want   []string
	}{
		{"one", []string{"debian-12"}, nil, nil},
		{"64", slices.Repeat([]string{"l"}, 64), nil, nil},
		{"none", nil, nil, []string{"f: must hold 1-64 labels, got 0"}},
		{"65", slices.Repeat([]string{"l"}, 65), nil, []string{"f: must hold 1-64 labels, got 65"}},
		{"256 bytes", []string{strings.Repeat("l", 256)}, nil, nil},
		{"257 bytes", []string{strings.Repeat("l", 257)}, nil, []string{"f[0]: longer than 256 bytes"}},
		{"each after the rule, label by label", []string{"\ta", "b", " c", ""}, padded,
			[]string{"f[0]: contains control characters", "f[0]: padded", "f[2]: padded", "f[3]: missing"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := CheckLabels("f", tt.labels, tt.each); !slices.Equal(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// doctorCheck is one check of "worker doctor --json".
type doctorCheck struct {
	Check      string `json:"check"`
	Target     string `json:"target"`
	Status     string `json:"status"`
	Message    string `json:"message"`
	Hint       string `json:"hint"`
	DurationMS int64  `json:"duration_ms"`
}

// doctorReport is the document "worker doctor --json" prints.
type doctorReport struct {
	Status string        `json:"status"`
	Checks []doctorCheck `json:"checks"`
}

// doctorEnv is the test process's environment without STRETCHY_
// variables, so that the host's settings do not change what doctor checks.
func doctorEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRETCHY_") {
			env = append(env, kv)
		}
	}
	return env
}

// runDoctor runs "worker doctor --json args..." and returns its report
// and exit status.
func runDoctor(t *testing.T, args ...string) (doctorReport, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, workerBinary(t), append([]string{"doctor", "--json"}, args...)...)
	cmd.Env = doctorEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("worker doctor %v: %v\n%s", args, err, stderr.String())
	}
	var r doctorReport
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("worker doctor %v printed no JSON document (%v):\n%s\nstderr:\n%s", args, err, stdout.String(), stderr.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("worker doctor %v:\n%s\nstderr:\n%s", args, stdout.String(), stderr.String())
		}
	})
	return r, cmd.ProcessState.ExitCode()
}

// get returns the checks named check for target.
func (r doctorReport) get(check, target string) []doctorCheck {
	var out []doctorCheck
	for _, c := range r.Checks {
		if c.Check == check && c.Target == target {
			out = append(out, c)
		}
	}
	return out
}

// want asserts that exactly one check named check for target has status,
// and that its message and hint contain the given texts.
func (r doctorReport) want(t *testing.T, check, target, status, inMessage, inHint string) doctorCheck {
	t.Helper()
	got := r.get(check, target)
	if len(got) != 1 {
		t.Fatalf("%d checks %s for %q, want 1: %+v", len(got), check, target, got)
	}
	c := got[0]
	if c.Status != status || !strings.Contains(c.Message, inMessage) || !strings.Contains(c.Hint, inHint) {
		t.Errorf("check %s %s = %s %q (hint %q); want %s mentioning %q, hint mentioning %q",
			check, target, c.Status, c.Message, c.Hint, status, inMessage, inHint)
	}
	if status != "ok" && c.Hint == "" {
		t.Errorf("check %s %s is %s without a hint", check, target, c.Status)
	}
	return c
}

func (r doctorReport) failed() []doctorCheck {
	var out []doctorCheck
	for _, c := range r.Checks {
		if c.Status == "fail" {
			out = append(out, c)
		}
	}
	return out
}

// hasLine reports whether a line of doctor's output starts with status
// and check and contains text.
func hasLine(out, status, check, text string) bool {
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) > 2 && f[0] == status && f[1] == check && strings.Contains(line, text) {
			return true
		}
	}
	return false
}

func doctorRand(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func TestDoctorImage(t *testing.T) {
	dialLibvirt(t)
	r, code := runDoctor(t, "--image", testImage())
	if code != 0 || len(r.failed()) > 0 {
		t.Fatalf("exit status %d, failed checks %+v; want 0 and none", code, r.failed())
	}
	r.want(t, "libvirt", "qemu:///system", "ok", "connected", "")
	r.want(t, "image", testImage(), "ok", "defined", "")
	r.want(t, "image.name", testImage(), "ok", "", "")
	r.want(t, "image.state", testImage(), "ok", "shut off", "")
	r.want(t, "image.settings", testImage(), "ok", "clone mode linked", "")
	r.want(t, "image.storage", testImage(), "ok", "disk vda: /var/lib/libvirt/ci-images/tiny-linux.qcow2 (qcow2, pool ci-images)", "")
	if pools := r.get("pool", "ci-images"); len(pools) != 1 || pools[0].Status != "ok" {
		t.Errorf("pool ci-images: %+v, want one ok check", pools)
	}
	if len(r.get("pool.space", "ci-images")) != 1 {
		t.Errorf("no free space check of pool ci-images")
	}
	if r.Status != "ok" && r.Status != "warn" {
		t.Errorf("status %q, want ok or warn", r.Status)
	}
}

// defineDoctorImage defines an image domain from the test image with the
// given writable disk (none if empty), started if running, and removes it
// when the test ends.
func defineDoctorImage(t *testing.T, l *libvirt.Libvirt, name, disk string, running bool) {
	t.Helper()
	undefine := func() {
		dom, err := l.DomainLookupByName(name)
		if err != nil {
			return
		}
		_ = l.DomainDestroy(dom)
		if err := l.DomainUndefineFlags(dom, 0); err != nil {
			t.Errorf("cleanup: undefine %s: %v", name, err)
		}
	}
	undefine() // left by an interrupted run
	t.Cleanup(undefine)
	def := domainXML(t, l, testImage())
	def.Name, def.UUID, def.Description = name, "", ""
	for i := range def.Devices.Interfaces {
		def.Devices.Interfaces[i].MAC = nil
	}
	if disk == "" {
		def.Devices.Disks = nil
	} else {
		def.Devices.Disks = def.Devices.Disks[:1]
		d := &def.Devices.Disks[0]
		d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: disk}}
		d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"}
		d.Address, d.BackingStore = nil, nil
	}
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainDefineXMLFlags(doc, 0)
	if err != nil {
		t.Fatalf("define %s: %v", name, err)
	}
	if running {
		if err := l.DomainCreate(dom); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
	}
}

// overlayVolume creates a qcow2 overlay on the test image's disk in pool
// ci-images and deletes it when the test ends.
func overlayVolume(t *testing.T, l *libvirt.Libvirt, name string) string {
	t.Helper()
	pool, err := l.StoragePoolLookupByName("ci-images")
	if err != nil {
		t.Fatal(err)
	}
	base, err := l.StorageVolLookupByName(pool, testImage()+".qcow2")
	if err != nil {
		t.Fatal(err)
	}
	basePath, err := l.StorageVolGetPath(base)
	if err != nil {
		t.Fatal(err)
	}
	vx := libvirtxml.StorageVolume{
		Name:     name,
		Capacity: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 64 << 20},
		Target:   &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{
			Path: basePath, Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"},
		},
	}
	doc, err := vx.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	vol, err := l.StorageVolCreateXML(pool, doc, 0)
	if err != nil {
		t.Fatalf("create volume %s: %v", name, err)
	}
	// Registered before the domain's cleanup, so it runs after it.
	t.Cleanup(func() {
		if err := l.StorageVolDelete(vol, 0); err != nil {
			t.Errorf("cleanup: delete volume %s: %v", name, err)
		}
	})
	path, err := l.StorageVolGetPath(vol)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDoctorRefusesBadImages(t *testing.T) {
	l := dialLibvirt(t)
	tests := []struct {
		name string
		// prepare defines the image and returns its name.
		prepare func(t *testing.T) string
		check   string
		// inMessage and inHint are in the failed check.
		inMessage, inHint string
	}{
		{
			name:      "missing",
			prepare:   func(t *testing.T) string { return "doctortest-missing-" + doctorRand(t) },
			check:     "image",
			inMessage: "no domain of this name",
			inHint:    "virsh -c qemu:///system list --all",
		},
		{
			// Not stretchy-<job id>: workers on this host would adopt
			// or remove such a domain.
			name: "named like a machine",
			prepare: func(t *testing.T) string {
				defineDoctorImage(t, l, "stretchy-doctor.bad", "", false)
				return "stretchy-doctor.bad"
			},
			check:     "image.name",
			inMessage: `must not start with "stretchy-"`,
			inHint:    "domrename stretchy-doctor.bad",
		},
		{
			name: "running",
			prepare: func(t *testing.T) string {
				name := "doctortest-run-" + doctorRand(t)
				defineDoctorImage(t, l, name, overlayVolume(t, l, name+"-vda.qcow2"), true)
				return name
			},
			check:     "image.state",
			inMessage: "is running; images must be shut off",
			inHint:    "shut it down",
		},
		{
			name: "disk outside every pool",
			prepare: func(t *testing.T) string {
				disk := filepath.Join(t.TempDir(), "loose.qcow2")
				if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M").CombinedOutput(); err != nil {
					t.Fatalf("qemu-img: %v\n%s", err, out)
				}
				name := "doctortest-loose-" + doctorRand(t)
				defineDoctorImage(t, l, name, disk, false)
				return name
			},
			check:     "image.storage",
			inMessage: "loose.qcow2 is outside every storage pool",
			inHint:    "volume of a dir, fs or netfs storage pool",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			image := tt.prepare(t)
			r, code := runDoctor(t, "--image", image)
			if code != 1 || r.Status != "fail" {
				t.Errorf("exit status %d, status %q; want 1, fail", code, r.Status)
			}
			r.want(t, tt.check, image, "fail", tt.inMessage, tt.inHint)
			if failed := r.failed(); len(failed) != 1 {
				t.Errorf("failed checks %+v, want only %s", failed, tt.check)
			}
		})
	}
}

// doctorLeftovers lists the domains and volumes of doctor's boot checks.
func doctorLeftovers(t *testing.T, l *libvirt.Libvirt) []string {
	t.Helper()
	left, err := resources(l, messages.DomainName("doctor-"))
	if err != nil {
		t.Fatal(err)
	}
	return left
}

func TestDoctorBoot(t *testing.T) {
	l := dialLibvirt(t)
	image := testImage()
	r, code := runDoctor(t, "--boot", "--image", image, "--domain-type", "qemu", "--boot-timeout", "90s")
	if code != 0 || len(r.failed()) > 0 {
		t.Fatalf("exit status %d, failed checks %+v; want 0 and none", code, r.failed())
	}
	r.want(t, "boot.start", image, "ok", "as stretchy-doctor-", "")
	if agent := r.want(t, "boot.agent", image, "ok", "the guest agent answered", ""); agent.DurationMS <= 0 {
		t.Errorf("boot.agent has no boot time: %+v", agent)
	}
	r.want(t, "boot.os", image, "ok", `linux (guest-get-osinfo id "stretchy-tiny", uname -s "Linux")`, "")
	r.want(t, "boot.echo", image, "ok", "printed Hello", "")
	r.want(t, "boot.home", image, "ok", "/home/stretchy exists", "")
	// The test guest's stubs answer the version calls with fixed fake
	// versions (test/guest/README.md).
	r.want(t, "boot.runner.forgejo", image, "ok", `/usr/local/bin/forgejo-runner exists, version "forgejo-runner version v12.8.0-stub"`, "")
	r.want(t, "boot.runner.github", image, "ok", `/home/stretchy/actions-runner/run.sh exists, version "2.330.0-stub"`, "")
	r.want(t, "boot.runner.jenkins", image, "ok", `/home/stretchy/agent.jar exists, version "3283.v0stub"`, "")
	// The tiny guest has Debian 12's qemu-ga 7.2.
	r.want(t, "boot.agent_version", image, "warn", "older than 8.0", "8.0 or newer")
	r.want(t, "boot.cleanup", image, "ok", "removed stretchy-doctor-", "")
	if left := doctorLeftovers(t, l); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

// TestDoctorBootFindsRunnerRegistration: a .runner file in stretchy's
// home, as forgejo-runner register or create-runner-file leave one, is
// read by forgejo-runner one-job from its working directory as a second
// server connection, beside the one the worker passes on its command
// line, so every Forgejo job on the image fails at once. The image here
// is an overlay of the test image that holds such a file; doctor --boot
// must fail the Forgejo runner's check and say to remove it.
func TestDoctorBootFindsRunnerRegistration(t *testing.T) {
	l := dialLibvirt(t)
	image := "doctortest-reg-" + doctorRand(t)
	defineDoctorImage(t, l, image, overlayVolume(t, l, image+"-vda.qcow2"), true)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	agent := qga.New(l, qga.Options{})
	if err := agent.WaitReady(ctx, image); err != nil {
		t.Fatal(err)
	}
	// Written as stretchy, as the runner would; synced, so that the
	// image keeps it when it is stopped hard.
	plant := `su -s /bin/sh stretchy -c 'cd && printf "{\"uuid\": \"0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f\"}\n" >.runner' && sync`
	if _, err := agent.Run(ctx, image, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", plant}, Capture: true}); err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainLookupByName(image)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.DomainDestroy(dom); err != nil {
		t.Fatal(err)
	}

	r, code := runDoctor(t, "--boot", "--image", image, "--domain-type", "qemu", "--boot-timeout", "90s")
	if code != 1 || r.Status != "fail" {
		t.Errorf("exit status %d, status %q; want 1, fail", code, r.Status)
	}
	r.want(t, "boot.runner.forgejo", image, "fail", "/home/stretchy/.runner exists", "remove /home/stretchy/.runner from the image")
	if failed := r.failed(); len(failed) != 1 {
		t.Errorf("failed checks %+v, want only boot.runner.forgejo", failed)
	}
	// The other runners do not read it.
	r.want(t, "boot.runner.github", image, "ok", "run.sh exists", "")
	r.want(t, "boot.runner.jenkins", image, "ok", "agent.jar exists", "")
	r.want(t, "boot.cleanup", image, "ok", "removed stretchy-doctor-", "")
	if left := doctorLeftovers(t, l); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

// TestDoctorBootCleansUp checks that the boot check's machine goes when a
// step fails and when doctor is interrupted.
func TestDoctorBootCleansUp(t *testing.T) {
	l := dialLibvirt(t)
	image := testImage()

	t.Run("agent too slow", func(t *testing.T) {
		// The tiny guest needs seconds to boot under TCG.
		r, code := runDoctor(t, "--boot", "--image", image, "--domain-type", "qemu", "--boot-timeout", "300ms")
		if code != 1 {
			t.Errorf("exit status %d, want 1", code)
		}
		r.want(t, "boot.agent", image, "fail", "guest agent not ready in time", "--boot-timeout")
		r.want(t, "boot.cleanup", image, "ok", "removed stretchy-doctor-", "")
		if left := doctorLeftovers(t, l); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
	})

	t.Run("interrupted", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, workerBinary(t), "doctor", "--boot", "--image", image, "--domain-type", "qemu")
		cmd.Env = doctorEnv()
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var out strings.Builder
		lines := bufio.NewScanner(stdout)
		for lines.Scan() {
			out.WriteString(lines.Text() + "\n")
			if strings.HasPrefix(lines.Text(), "ok    boot.start") {
				// Now it waits for the guest agent.
				if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
					t.Fatal(err)
				}
			}
		}
		err = cmd.Wait()
		if cmd.ProcessState.ExitCode() != 1 {
			t.Errorf("exit %v after SIGINT, want status 1", err)
		}
		for _, want := range [][]string{
			{"fail", "boot.agent", image + ": interrupted"},
			{"ok", "boot.cleanup", image + ": removed stretchy-doctor-"},
		} {
			if !hasLine(out.String(), want[0], want[1], want[2]) {
				t.Errorf("output has no line with %q:\n%s", want, out.String())
			}
		}
		if left := doctorLeftovers(t, l); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
	})
}

func TestDoctorNATS(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	const host = "doctortest"

	r, code := runDoctor(t, "--nats-url", url, "--host", host)
	if code != 0 || len(r.failed()) > 0 {
		t.Fatalf("before a worker ran: exit status %d, failed checks %+v; want 0 and none", code, r.failed())
	}
	r.want(t, "nats", url, "ok", "JetStream enabled", "")
	for _, stream := range []string{messages.RequestsStream, messages.EventsStream} {
		r.want(t, "nats.stream", stream, "warn", "missing; a worker creates it when it starts", "worker run")
	}
	r.want(t, "nats.claims", messages.ClaimsBucket, "warn", "missing; a worker creates it when it starts", "worker run")
	if got := r.get("nats.consumer", bus.SharedProvisionConsumer); len(got) != 0 {
		t.Errorf("consumers checked without a request stream: %+v", got)
	}

	if _, err := bus.Ensure(t.Context(), js, bus.Topology{Host: host}); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.OpenClaims(t.Context(), js, bus.Topology{Host: host}); err != nil {
		t.Fatal(err)
	}
	r, code = runDoctor(t, "--nats-url", url, "--host", host)
	if code != 0 || len(r.failed()) > 0 {
		t.Fatalf("after a worker ran: exit status %d, failed checks %+v; want 0 and none", code, r.failed())
	}
	for _, stream := range []string{messages.RequestsStream, messages.EventsStream} {
		r.want(t, "nats.stream", stream, "ok", "present", "")
	}
	for _, consumer := range []string{bus.SharedProvisionConsumer, bus.HostProvisionConsumer(host), bus.HostTeardownConsumer(host)} {
		r.want(t, "nats.consumer", consumer, "ok", "present", "")
	}
	r.want(t, "nats.claims", messages.ClaimsBucket, "ok", "TTL 15s, 0 claims", "")

	// Another host's consumers are not there.
	r, _ = runDoctor(t, "--nats-url", url, "--host", "doctortest-other")
	r.want(t, "nats.consumer", bus.HostTeardownConsumer("doctortest-other"), "warn", "host doctortest-other", "--host")

	r, code = runDoctor(t, "--nats-url", "nats://127.0.0.1:1")
	if code != 1 {
		t.Errorf("unreachable NATS: exit status %d, want 1", code)
	}
	r.want(t, "nats", "nats://127.0.0.1:1", "fail", "", "nats-server")
}

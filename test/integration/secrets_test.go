package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// secretsHost is the host id of the worker process under test.
const secretsHost = "itest-secrets"

// metadataNS is the namespace of the worker's domain metadata.
const metadataNS = "https://stretchy-ci.dev/xmlns/libvirt-worker/1"

// plantedSecret returns a secret value no run used before.
func plantedSecret(kind string) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "LEAK-" + kind + "-" + hex.EncodeToString(b)
}

// leakForms are the strings whose presence shows that secret leaked: the
// value itself, and the part of its base64 encoding that any base64 text
// containing it has (at each of the three alignments), as guest-exec's
// input-data would carry it.
func leakForms(secret string) []string {
	forms := []string{secret}
	for pad := range 3 {
		enc := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", pad) + secret))
		forms = append(forms, enc[4:len(enc)-4])
	}
	return forms
}

// leaks reports which secrets appear, in any form, in text.
func leaks(text []byte, secrets []string) []string {
	var out []string
	for _, s := range secrets {
		for _, f := range leakForms(s) {
			if bytes.Contains(text, []byte(f)) {
				out = append(out, s)
				break
			}
		}
	}
	return out
}

// machineDump is what the host and the guest show of a running machine.
type machineDump struct {
	xml, inactiveXML, metadata, argv string
}

// dumpMachine reads the domain XML (with secure fields), its persistent
// definition, the worker's metadata and every guest command line.
func dumpMachine(l *libvirt.Libvirt, agent *qga.Agent, domain string) (machineDump, error) {
	var d machineDump
	dom, err := l.DomainLookupByName(domain)
	if err != nil {
		return d, fmt.Errorf("look up %s: %w", domain, err)
	}
	if d.xml, err = l.DomainGetXMLDesc(dom, libvirt.DomainXMLSecure); err != nil {
		return d, err
	}
	if d.inactiveXML, err = l.DomainGetXMLDesc(dom, libvirt.DomainXMLSecure|libvirt.DomainXMLInactive); err != nil {
		return d, err
	}
	if d.metadata, err = l.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{metadataNS}, 0); err != nil {
		return d, fmt.Errorf("metadata of %s: %w", domain, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := agent.Run(ctx, domain, qga.ExecRequest{
		Path: "/bin/sh", Args: []string{"-c", `for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' <"$f"; echo; done`}, Capture: true,
	})
	if err != nil {
		return d, fmt.Errorf("guest command lines of %s: %w", domain, err)
	}
	d.argv = string(st.Stdout)
	return d, nil
}

// waitEvent polls el for an event of job in one of states, without
// failing the test (it runs outside the test goroutine).
func waitEvent(el *eventLog, job string, timeout time.Duration, states ...messages.State) (messages.Event, bool) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, ev := range el.of(job) {
			for _, s := range states {
				if ev.State == s {
					return ev, true
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return messages.Event{}, false
}

// TestSecretsNeverLeak runs three real jobs, one per runner kind, on a
// worker process logging at debug level, with a unique secret in each
// secret field, plus requests that fail on the way (unknown image,
// invalid, undecodable), and looks for every secret in the worker's whole
// log, every stored event (raw bytes), the domain XML and metadata, and
// the guest's command lines.
func TestSecretsNeverLeak(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	worker := startProcess(t, url, "--host", secretsHost)
	agent := qga.New(l, qga.Options{})
	ctx := context.Background()

	fjSecret, ghSecret, jkSecret := plantedSecret("forgejo"), plantedSecret("github"), plantedSecret("jenkins")
	secrets := []string{fjSecret, ghSecret, jkSecret}
	runs := []struct {
		job    string
		runner messages.Runner
	}{
		{isolatedJob(t, "leak-fj"), messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: fjSecret, Labels: []string{"debian-12"}, Handle: "h-1",
		}}},
		{isolatedJob(t, "leak-gh"), messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: ghSecret}}},
		{isolatedJob(t, "leak-jk"), messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{
			URL: "https://jenkins.example.org/", AgentName: "agent-1", Secret: jkSecret, WorkDir: "/home/stretchy/work",
		}}},
	}
	for _, r := range runs {
		req := provisionRequest(r.job)
		req.Runner = r.runner
		if _, err := submitReq(ctx, js, req, ""); err != nil {
			t.Fatal(err)
		}
	}

	// Requests that fail, each carrying a secret too.
	errSecrets := []string{plantedSecret("noimage"), plantedSecret("invalid"), plantedSecret("undecodable"), plantedSecret("control")}
	secrets = append(secrets, errSecrets...)
	noImage, invalid, undecodable, control := isolatedJob(t, "leak-noimg"), isolatedJob(t, "leak-inval"), isolatedJob(t, "leak-undec"), isolatedJob(t, "leak-ctrl")
	failing := map[string]messages.ErrorCode{
		noImage: messages.CodeImageNotFound, invalid: messages.CodeInvalidRequest,
		undecodable: messages.CodeBadMessage, control: messages.CodeInvalidRequest,
	}
	req := provisionRequest(noImage)
	req.Image = "no-such-image-for-secrets"
	req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: errSecrets[0], Labels: []string{"x"},
	}}
	if _, err := submitReq(ctx, js, req, ""); err != nil {
		t.Fatal(err)
	}
	// Credentials in the URL and the secret field: refused, naming no value.
	req = provisionRequest(invalid)
	req.Runner = messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{
		URL: "https://agent:" + errSecrets[1] + "@jenkins.example.org/", AgentName: "a", Secret: errSecrets[1],
	}}
	publishRaw(t, js, messages.ProvisionSubject(), &req)
	// A secret with a control character, in a request of the wrong shape.
	req = provisionRequest(control)
	req.Runner = messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: errSecrets[3] + "\x1b"}}
	publishRaw(t, js, messages.ProvisionSubject(), &req)
	// Undecodable (v is a string) but for a readable job id.
	bad, err := messages.Marshal(map[string]any{
		"v": "1", "job_id": undecodable, "image": testImage(), "requested_at": time.Now().UTC(),
		"runner": map[string]any{"kind": "github", "github": map[string]any{"jit_config": errSecrets[2]}},
	})
	if err != nil {
		t.Fatal(err)
	}
	publish(t, js, messages.ProvisionSubject(), bad)

	// While each runner runs, read what the host and the guest show.
	var wg sync.WaitGroup
	var mu sync.Mutex
	dumps := map[string]machineDump{}
	var problems []string
	for _, r := range runs {
		wg.Go(func() {
			if _, ok := waitEvent(events, r.job, bootWait, messages.StateRunnerStarted); !ok {
				mu.Lock()
				problems = append(problems, r.job+": no runner_started")
				mu.Unlock()
				return
			}
			d, err := dumpMachine(l, agent, messages.DomainName(r.job))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: dump the running machine: %v", r.job, err))
				return
			}
			dumps[r.job] = d
		})
	}
	wg.Wait()
	for _, p := range problems {
		t.Error(p)
	}

	for _, r := range runs {
		events.waitState(t, r.job, messages.StateTornDown, 2*time.Minute)
	}
	for job, code := range failing {
		ev := events.waitState(t, job, messages.StateFailed, time.Minute)
		if ev.Error == nil || ev.Error.Code != code {
			t.Errorf("job %s: failed event %+v, want %s", job, ev.Error, code)
		}
	}
	waitQueueEmpty(t, js)
	worker.stop(t)
	log := worker.log.Bytes()

	// The checks can see what they look for.
	for _, r := range runs {
		if !bytes.Contains(log, []byte(r.job)) {
			t.Fatalf("the worker log does not mention job %s; is it captured?", r.job)
		}
		d := dumps[r.job]
		if !strings.Contains(d.metadata, r.job) || !strings.Contains(d.argv, "stretchy") {
			t.Errorf("job %s: the dumps look empty: metadata %q", r.job, d.metadata)
		}
	}
	for _, s := range secrets {
		inStdin := base64.StdEncoding.EncodeToString([]byte("token=" + s + "\n"))
		if len(leaks([]byte(inStdin), []string{s})) != 1 {
			t.Fatalf("the leak check misses %s in base64", s)
		}
	}

	if got := leaks(log, secrets); len(got) > 0 {
		t.Errorf("the worker log carries secrets %v", got)
	}
	stored := storedEvents(t, js)
	for _, raw := range stored {
		if got := leaks(raw, secrets); len(got) > 0 {
			t.Errorf("a stored event carries secrets %v: %q", got, raw)
		}
	}
	for job, d := range dumps {
		for what, text := range map[string]string{"domain XML": d.xml, "inactive domain XML": d.inactiveXML, "metadata": d.metadata, "guest command lines": d.argv} {
			if got := leaks([]byte(text), secrets); len(got) > 0 {
				t.Errorf("job %s: the %s carries secrets %v", job, what, got)
			}
		}
	}
	t.Logf("%d secrets looked for in %d KiB of log, %d events, %d machines' XML, metadata and guest command lines",
		len(secrets), len(log)>>10, len(stored), len(dumps))
}

// publishRaw publishes a request without validating it first.
func publishRaw(t *testing.T, js jetstream.JetStream, subject string, v any) {
	t.Helper()
	data, err := messages.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	publish(t, js, subject, data)
}

// TestSecretsScrubbedAcrossRestart: a runner that prints its token has it
// replaced by [REDACTED] in runner_exited; a worker that adopted the
// machine after a SIGKILL of its predecessor no longer knows the token, so
// it publishes the runner's exit without the output (output_withheld)
// instead of output it cannot scrub. Neither worker's log, nor any stored
// event, carries the token. Before the fix the adopted job's runner_exited
// carried the token in clear.
func TestSecretsScrubbedAcrossRestart(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	const host = "itest-secrets-restart"
	first := startProcess(t, url, "--host", host)

	quick, slow := uniqueJob(t, "print-quick"), uniqueJob(t, "print-slow")
	quickSecret, slowSecret := plantedSecret("quick"), plantedSecret("slow")
	submit := func(job, secret, sleep string) {
		req := provisionRequest(job)
		req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: secret,
			Labels: []string{"debian stub-print-secret stub-sleep=" + sleep},
		}}
		if _, err := submitReq(context.Background(), js, req, host); err != nil {
			t.Fatal(err)
		}
	}
	submit(quick, quickSecret, "1")
	submit(slow, slowSecret, "40")

	exited := events.waitState(t, quick, messages.StateRunnerExited, bootWait+time.Minute)
	if !strings.Contains(exited.Output, "my secret is [REDACTED]") || exited.OutputWithheld {
		t.Fatalf("runner_exited of %s: output %q (withheld %v), want the printed secret redacted", quick, exited.Output, exited.OutputWithheld)
	}
	events.waitState(t, slow, messages.StateRunnerStarted, bootWait)
	first.kill(t)
	second := startProcess(t, url, "--host", host)

	exited = events.waitState(t, slow, messages.StateRunnerExited, 2*time.Minute)
	if exited.Output != "" || !exited.OutputWithheld || exited.ExitCode == nil || *exited.ExitCode != 0 {
		t.Fatalf("runner_exited of the adopted %s: %+v, want exit code 0, no output, output_withheld", slow, exited)
	}
	for _, job := range []string{quick, slow} {
		events.waitState(t, job, messages.StateTornDown, 2*time.Minute)
	}
	second.stop(t)
	secrets := []string{quickSecret, slowSecret}
	for name, log := range map[string][]byte{"first": first.log.Bytes(), "second": second.log.Bytes()} {
		if got := leaks(log, secrets); len(got) > 0 {
			t.Errorf("the %s worker's log carries secrets %v", name, got)
		}
	}
	for _, raw := range storedEvents(t, js) {
		if got := leaks(raw, secrets); len(got) > 0 {
			t.Errorf("a stored event carries secrets %v: %q", got, raw)
		}
	}
}

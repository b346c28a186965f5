package integration

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// TestSealedSecretTravelsSealed: a job whose runner secret an orchestrator
// sealed to the worker's key (docs/protocol.md 3.13). A NATS client
// subscribed to ">" (with every permission) from before the request was
// published, the request stream's stored message and the NATS server's
// files on disk hold no form of the secret; the worker, started with
// --require-sealed-secrets, opens it, and its runner in the guest gets it:
// the stub runner prints the secret it was given, and the worker, which
// knows the secret only from the box, publishes that output with the
// secret redacted. The worker's log carries no form of it either.
func TestSealedSecretTravelsSealed(t *testing.T) {
	dialLibvirt(t)
	store := t.TempDir()
	srv, err := embedded.Start(embedded.Options{StoreDir: store, Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	url := srv.ClientURL()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	events := followEvents(t, js)

	// Everything that crosses the server, from the start.
	var mu sync.Mutex
	var seen [][]byte
	sub, err := nc.Subscribe(">", func(m *nats.Msg) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, append([]byte(m.Subject+" "+m.Reply+" "), m.Data...))
		for k, vs := range m.Header {
			seen = append(seen, []byte(k+": "+strings.Join(vs, ",")))
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	keysDir := filepath.Join(t.TempDir(), "keys")
	key, err := seal.Generate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := seal.WriteKey(keysDir, key); err != nil {
		t.Fatal(err)
	}
	const host = "itest-sealed"
	job := uniqueJob(t, "sealed")
	secret := plantedSecret("sealed")
	req := provisionRequest(job)
	req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
		Labels: []string{"debian stub-print-secret stub-sleep=1"},
	}}
	sealed, err := seal.Seal(key.Published(), job, secret, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	req.Runner.Sealed = &sealed
	seq, err := submitReq(context.Background(), js, req, host)
	if err != nil {
		t.Fatal(err)
	}
	// The request as the stream stores it, before any worker read it.
	requests, err := js.Stream(context.Background(), messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := requests.GetMsg(context.Background(), seq)
	if err != nil {
		t.Fatal(err)
	}
	if got := leaks(raw.Data, []string{secret}); len(got) > 0 {
		t.Fatalf("the stored request carries the secret")
	}
	stored, err := messages.DecodeProvision(raw.Data)
	if err != nil || stored.Runner.Sealed == nil || stored.Runner.Forgejo.Token != "" {
		t.Fatalf("the stored request %+v, %v: want the secret sealed", stored.Runner, err)
	}

	worker := startProcess(t, url, "--host", host, "--keys-dir", keysDir, "--require-sealed-secrets")
	exited := events.waitState(t, job, messages.StateRunnerExited, bootWait+time.Minute)
	if !strings.Contains(exited.Output, "my secret is [REDACTED]") {
		t.Fatalf("runner_exited output %q: want the secret the runner printed redacted, which shows it got the one sealed", exited.Output)
	}
	events.waitState(t, job, messages.StateTornDown, 2*time.Minute)
	worker.stop(t)

	mu.Lock()
	traffic := seen
	mu.Unlock()
	if len(traffic) < 10 {
		t.Fatalf("the > subscription saw %d messages; is it working?", len(traffic))
	}
	for _, m := range traffic {
		if got := leaks(m, []string{secret}); len(got) > 0 {
			t.Fatalf("a message on NATS carries the secret: %.200q", m)
		}
	}
	log := worker.log.Bytes()
	if !strings.Contains(string(log), job) {
		t.Fatalf("the worker's log does not mention job %s; is it captured?", job)
	}
	if got := leaks(log, []string{secret}); len(got) > 0 {
		t.Fatal("the worker's log carries the secret")
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	var files int
	err = filepath.WalkDir(store, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		if got := leaks(data, []string{secret}); len(got) > 0 {
			t.Errorf("the NATS server's file %s carries the secret", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d messages seen on >, %d files of the server's store, %d bytes of worker log: no form of the secret", len(traffic), files, len(log))
}

package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// startCluster runs three in-process JetStream servers as one cluster on
// loopback and returns them, their client URLs joined, and a client of
// the whole cluster.
func startCluster(t *testing.T) ([]*server.Server, string, jetstream.JetStream) {
	t.Helper()
	var routes []string
	ports := make([]int, 3)
	for i := range ports {
		ports[i] = freePort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[i]))
	}
	servers := make([]*server.Server, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range servers {
		wg.Add(1)
		go func() { // nodes wait for each other to be ready
			defer wg.Done()
			servers[i], errs[i] = embedded.Start(embedded.Options{StoreDir: t.TempDir(), Port: -1,
				Cluster: &embedded.Cluster{Name: "stretchy-test", Node: fmt.Sprintf("n%d", i+1), Port: ports[i], Routes: routes}})
		}()
	}
	wg.Wait()
	var urls []string
	for i, s := range servers {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		t.Cleanup(func() {
			s.Shutdown()
			s.WaitForShutdown()
		})
		urls = append(urls, s.ClientURL())
	}
	url := strings.Join(urls, ",")
	nc, err := nats.Connect(url, nats.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// The cluster is ready once it can place an R3 stream.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "PROBE", Subjects: []string{"probe"}, Replicas: 3})
		if err == nil {
			err = js.DeleteStream(ctx, "PROBE")
		}
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the JetStream cluster did not come up: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return servers, url, js
}

// defineOverlayImage defines an image named name from the test image with
// a qcow2 overlay of its disk, and removes both when the test ends.
func defineOverlayImage(t *testing.T, l *libvirt.Libvirt, name string) {
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
	_, capacity, _, err := l.StorageVolGetInfo(base)
	if err != nil {
		t.Fatal(err)
	}
	vx := libvirtxml.StorageVolume{
		Name:     name + ".qcow2",
		Capacity: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: capacity},
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
		t.Fatalf("create volume for %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := l.StorageVolDelete(vol, 0); err != nil {
			t.Errorf("cleanup: delete volume of %s: %v", name, err)
		}
	})
	path, err := l.StorageVolGetPath(vol)
	if err != nil {
		t.Fatal(err)
	}
	defineDoctorImage(t, l, name, path, false)
}

// TestCluster: three NATS nodes with R3 streams and buckets, three worker
// processes with different host ids and images. Jobs go only to hosts
// that carry their image; a NATS node is killed mid-run and a worker is
// killed with SIGKILL while it builds a machine (then started again); no
// request and no event is lost, and every job ends with exactly one
// terminal event.
func TestCluster(t *testing.T) {
	l := dialLibvirt(t)
	servers, url, js := startCluster(t)
	events := followEvents(t, js)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	imgA, imgB := "cluster-a-"+hex.EncodeToString(b), "cluster-b-"+hex.EncodeToString(b)
	defineOverlayImage(t, l, imgA)
	defineOverlayImage(t, l, imgB)
	carriers := map[string]map[string]bool{imgA: {"cl-1": true, "cl-3": true}, imgB: {"cl-2": true}}
	common := []string{"--replicas", "3", "--max-vms", "2"}
	startProcess(t, url, append(common, "--host", "cl-1", "--images", imgA)...)
	startProcess(t, url, append(common, "--host", "cl-2", "--images", imgB)...)
	// cl-3 kills itself with SIGKILL after its first clone.
	t.Setenv("STRETCHY_FAULT", lifecycle.FaultAfterClone)
	cl3 := startProcess(t, url, append(common, "--host", "cl-3", "--images", imgA)...)
	t.Setenv("STRETCHY_FAULT", "")
	waitHosts(t, js, "three hosts with their images", func(hs map[string]messages.Host) bool {
		return carries(hs["cl-1"], imgA) && carries(hs["cl-2"], imgB) && carries(hs["cl-3"], imgA)
	})
	for _, cfg := range []string{messages.RequestsStream, messages.EventsStream, "KV_" + messages.ClaimsBucket, "KV_" + messages.HostsBucket} {
		s, err := js.Stream(context.Background(), cfg)
		if err != nil || s.CachedInfo().Config.Replicas != 3 {
			t.Fatalf("stream %s: %v, replicas %d", cfg, err, s.CachedInfo().Config.Replicas)
		}
	}

	var jobs []string
	image := map[string]string{}
	submit := func(img string, shared bool) {
		job := uniqueJob(t, "cluster")
		req := stubRunnerRequest(job, 2)
		req.Image = img
		jobs, image[job] = append(jobs, job), img
		var err error
		if shared {
			_, err = submitReq(context.Background(), js, req, "")
		} else {
			err = submitReqByImage(context.Background(), js, req)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := range 4 {
		submit(imgA, i%2 == 1)
		submit(imgB, i%2 == 0)
	}
	// Kill a node once the first machine runs.
	events.wait(t, bootWait, "a machine running", func(evs []messages.Event) bool {
		for _, ev := range evs {
			if ev.State == messages.StateRunning {
				return true
			}
		}
		return false
	})
	servers[1].Shutdown()
	t.Logf("killed NATS node n2 at the first running machine")
	if !waitKilled(t, cl3, bootWait) {
		t.Fatal("cl-3 was not killed at its fault point")
	}
	t.Logf("cl-3 killed itself (SIGKILL) after its first clone")
	for range 2 {
		submit(imgA, false)
		submit(imgB, true)
	}
	// cl-3 comes back, reconciles its half-built machine away and serves.
	startProcess(t, url, append(common, "--host", "cl-3", "--images", imgA)...)

	events.wait(t, 10*time.Minute, "every job ended", func(evs []messages.Event) bool {
		ended := map[string]bool{}
		for _, ev := range evs {
			if ev.State.Terminal() {
				ended[ev.JobID] = true
			}
		}
		for _, j := range jobs {
			if !ended[j] {
				return false
			}
		}
		return true
	})
	byHost := map[string]int{}
	for _, j := range jobs {
		var terminal int
		var seqs []uint64
		for _, ev := range events.of(j) {
			seqs = append(seqs, ev.Seq)
			if ev.State.Terminal() {
				terminal++
				byHost[ev.Host]++
				if ev.State != messages.StateTornDown {
					t.Errorf("job %s ended %s: %+v", j, ev.State, ev.Error)
				}
			}
			if !carriers[image[j]][ev.Host] {
				t.Errorf("job %s of image %s has an event of host %s", j, image[j], ev.Host)
			}
		}
		if terminal != 1 {
			t.Errorf("job %s has %d terminal events", j, terminal)
		}
		for i, s := range seqs {
			if s != uint64(i+1) {
				t.Errorf("job %s: event seqs %v have a gap", j, seqs)
				break
			}
		}
	}
	t.Logf("%d jobs, terminal events by host %v", len(jobs), byHost)
	if n := requestsLeft(t, js); n != 0 {
		t.Fatalf("%d requests left", n)
	}
	if left := managedLeftovers(t, l); len(left) > 0 {
		t.Fatalf("left on the host: %v", left)
	}
}

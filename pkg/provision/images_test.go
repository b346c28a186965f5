package provision

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Helpers for tests on qemu:///system: test images of various shapes built
// from the tiny Linux guest, and talking to a guest's agent.

// testPool is the pool holding the tiny guest's disk and the test images.
const testPool = "ci-images"

// systemConn connects to qemu:///system and makes sure the tiny image
// exists.
func systemConn(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	l := dial(t, string(libvirt.QEMUSystem))
	if _, err := l.DomainLookupByName(testImage()); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("image %s not defined on %s: %v", testImage(), libvirt.QEMUSystem, err)
		}
		t.Skipf("image %s not defined on %s; set STRETCHY_TEST_IMAGE", testImage(), libvirt.QEMUSystem)
	}
	return l
}

func randHex(t testing.TB) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// imageShape says what a test image looks like besides the tiny guest's
// root disk vda.
type imageShape struct {
	// rootVolume declares vda as type='volume' instead of type='file'.
	rootVolume bool
	// rootCapacity, if set, grows vda (a copy of the tiny guest's disk,
	// 14 MB of data) to that virtual size: a big, mostly empty image.
	rootCapacity uint64
	// extraDisks adds a writable raw type='volume' disk vdb and a shared
	// read-only disk vdc.
	extraDisks bool
	// uefi adds OVMF with an NVRAM in the pool ("volume") or in libvirt's
	// NVRAM directory outside any pool ("file").
	uefi string
	// metadata is put into the image's <metadata>.
	metadata string
	// cmdline, if set, replaces the kernel command line.
	cmdline string
	// interfaces, if set, replace the tiny guest's user-mode NIC.
	interfaces []libvirtxml.DomainInterface
}

// testImageDef is a test image on qemu:///system.
type testImageDef struct {
	Name string
	Def  *libvirtxml.Domain
	// Disks are the paths of the image's writable disks, by target.
	Disks map[string]string
	// NVRAM is the image's NVRAM path, if UEFI.
	NVRAM string
}

// defineTestImage defines an image domain provtest-img-<rand> of the given
// shape from the tiny guest, with volumes provtest-img-<rand>-* in
// testPool, and removes all of it when t ends.
func defineTestImage(t testing.TB, l *libvirt.Libvirt, shape imageShape) testImageDef {
	t.Helper()
	name := "provtest-img-" + randHex(t)
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		t.Fatal(err)
	}
	var vols []libvirt.StorageVol
	var hostFiles []string
	t.Cleanup(func() {
		if dom, err := l.DomainLookupByName(name); err == nil {
			_ = l.DomainDestroy(dom)
			if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineKeepNvram); err != nil {
				t.Errorf("cleanup: undefine %s: %v", name, err)
			}
		}
		for _, v := range vols {
			if err := l.StorageVolDelete(v, 0); err != nil && !isNoStorageVol(err) {
				t.Errorf("cleanup: delete %s: %v", v.Name, err)
			}
		}
		for _, f := range hostFiles {
			if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	newVol := func(vx libvirtxml.StorageVolume, from *libvirt.StorageVol) (libvirt.StorageVol, string) {
		t.Helper()
		doc, err := vx.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		var vol libvirt.StorageVol
		if from != nil {
			vol, err = l.StorageVolCreateXMLFrom(pool, doc, *from, 0)
		} else {
			vol, err = l.StorageVolCreateXML(pool, doc, 0)
		}
		if err != nil {
			t.Fatalf("create volume %s: %v", vx.Name, err)
		}
		vols = append(vols, vol)
		path, err := l.StorageVolGetPath(vol)
		if err != nil {
			t.Fatal(err)
		}
		return vol, path
	}
	format := func(f string) *libvirtxml.StorageVolumeTarget {
		return &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: f}}
	}

	def := domainXML(t, l, testImage())
	def.Name, def.UUID, def.Title, def.Description, def.Metadata = name, "", "", "", nil
	if shape.metadata != "" {
		def.Metadata = &libvirtxml.DomainMetadata{XML: shape.metadata}
	}
	if shape.cmdline != "" {
		def.OS.Cmdline = shape.cmdline
	}
	if shape.interfaces != nil {
		def.Devices.Interfaces = shape.interfaces
	}
	for i := range def.Devices.Interfaces {
		def.Devices.Interfaces[i].MAC = nil // libvirt picks one
	}
	img := testImageDef{Name: name, Def: def, Disks: map[string]string{}}

	// vda, the root disk.
	rootName := name + "-vda.qcow2"
	tiny, err := l.StorageVolLookupByName(pool, testImage()+".qcow2")
	if err != nil {
		t.Fatal(err)
	}
	rootVol, rootPath := newVol(libvirtxml.StorageVolume{Name: rootName, Capacity: &libvirtxml.StorageVolumeSize{Value: 64 << 20}, Target: format("qcow2")}, &tiny)
	if shape.rootCapacity > 64<<20 {
		if err := l.StorageVolResize(rootVol, shape.rootCapacity, 0); err != nil {
			t.Fatalf("resize %s: %v", rootName, err)
		}
	}
	img.Disks["vda"] = rootPath
	root := &def.Devices.Disks[0]
	if root.Target.Dev != "vda" {
		t.Fatalf("tiny image's first disk is %s, want vda", root.Target.Dev)
	}
	if shape.rootVolume {
		root.Source = &libvirtxml.DomainDiskSource{Volume: &libvirtxml.DomainDiskSourceVolume{Pool: testPool, Volume: rootName}}
	} else {
		root.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: rootPath}}
	}
	root.Address = nil

	if shape.extraDisks {
		dataName := name + "-vdb.img"
		_, dataPath := newVol(libvirtxml.StorageVolume{Name: dataName, Capacity: &libvirtxml.StorageVolumeSize{Value: 16 << 20}, Target: format("raw")}, nil)
		img.Disks["vdb"] = dataPath
		_, roPath := newVol(libvirtxml.StorageVolume{Name: name + "-ro.img", Capacity: &libvirtxml.StorageVolumeSize{Value: 1 << 20}, Target: format("raw")}, nil)
		def.Devices.Disks = append(def.Devices.Disks,
			libvirtxml.DomainDisk{
				Device: "disk",
				Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
				Source: &libvirtxml.DomainDiskSource{Volume: &libvirtxml.DomainDiskSourceVolume{Pool: testPool, Volume: dataName}},
				Target: &libvirtxml.DomainDiskTarget{Dev: "vdb", Bus: "virtio"},
			},
			libvirtxml.DomainDisk{
				Device:   "disk",
				Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
				Source:   &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: roPath}},
				Target:   &libvirtxml.DomainDiskTarget{Dev: "vdc", Bus: "virtio"},
				ReadOnly: &libvirtxml.DomainDiskReadOnly{},
			})
	}

	switch shape.uefi {
	case "":
	case "volume", "file":
		vars, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS.fd")
		if err != nil {
			t.Skipf("no OVMF: %v", err)
		}
		if shape.uefi == "volume" {
			vol, path := newVol(libvirtxml.StorageVolume{Name: name + "-nvram.fd", Capacity: &libvirtxml.StorageVolumeSize{Value: uint64(len(vars))}, Target: format("raw")}, nil)
			if err := l.StorageVolUpload(vol, strings.NewReader(string(vars)), 0, uint64(len(vars)), 0); err != nil {
				t.Fatal(err)
			}
			img.NVRAM = path
		} else {
			img.NVRAM = "/var/lib/libvirt/qemu/nvram/" + name + "_VARS.fd"
			if err := os.MkdirAll("/var/lib/libvirt/qemu/nvram", 0o755); err != nil {
				t.Fatal(err)
			}
			hostFiles = append(hostFiles, img.NVRAM)
			if err := os.WriteFile(img.NVRAM, vars, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		def.OS.Loader = &libvirtxml.DomainLoader{Path: "/usr/share/OVMF/OVMF_CODE.fd", Readonly: "yes", Type: "pflash"}
		def.OS.NVRam = &libvirtxml.DomainNVRam{NVRam: img.NVRAM, Template: "/usr/share/OVMF/OVMF_VARS.fd"}
	default:
		t.Fatalf("unknown uefi %q", shape.uefi)
	}

	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.DomainDefineXMLFlags(doc, 0); err != nil {
		t.Fatalf("define %s: %v", name, err)
	}
	img.Def = domainXML(t, l, name)
	return img
}

// fileSum returns the SHA-256 of a file and its modification time.
func fileSum(t testing.TB, path string) (string, time.Time) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), fi.ModTime()
}

// agent sends one command to the guest agent of dom and decodes the
// "return" member of its answer into out.
func agent(l *libvirt.Libvirt, dom libvirt.Domain, cmd string, args any, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	res, err := l.QEMUDomainAgentCommand(dom, string(b), 5, 0)
	if err != nil {
		return err
	}
	if len(res) == 0 {
		return errors.New("no answer")
	}
	var wrapper struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal([]byte(res[0]), &wrapper); err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(wrapper.Return, out)
}

// waitAgent waits until the guest agent of the domain answers guest-ping.
func waitAgent(t testing.TB, l *libvirt.Libvirt, name string, timeout time.Duration) libvirt.Domain {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	begin := time.Now()
	for {
		err := agent(l, dom, "guest-ping", nil, nil)
		if err == nil {
			t.Logf("%s: guest agent answers after %v", name, time.Since(begin).Round(time.Millisecond))
			return dom
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: guest agent silent for %v: %v", name, timeout, err)
		case <-tick.C:
		}
	}
}

// guestExec runs argv in the guest and returns its exit code and output.
func guestExec(t testing.TB, l *libvirt.Libvirt, dom libvirt.Domain, argv ...string) (int, string) {
	t.Helper()
	var started struct {
		PID int `json:"pid"`
	}
	if err := agent(l, dom, "guest-exec", map[string]any{"path": argv[0], "arg": argv[1:], "capture-output": true}, &started); err != nil {
		t.Fatalf("guest-exec %q: %v", argv, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			OutData  []byte `json:"out-data"`
		}
		if err := agent(l, dom, "guest-exec-status", map[string]any{"pid": started.PID}, &st); err != nil {
			t.Fatalf("guest-exec-status: %v", err)
		}
		if st.Exited {
			return st.ExitCode, string(st.OutData)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("guest-exec %q did not finish", argv)
	return 0, ""
}

// domainState returns the state of the named domain.
func domainState(t testing.TB, l *libvirt.Libvirt, name string) libvirt.DomainState {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		t.Fatal(err)
	}
	return libvirt.DomainState(s)
}

// poolVolumeNames returns the names of the volumes in testPool with the
// given prefix.
func poolVolumeNames(t testing.TB, l *libvirt.Libvirt, prefix string) []string {
	t.Helper()
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		t.Fatal(err)
	}
	vols, _, err := l.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range vols {
		if strings.HasPrefix(v.Name, prefix) {
			names = append(names, v.Name)
		}
	}
	return names
}

// createVolume creates a raw volume in testPool and returns its path.
func createVolume(t testing.TB, l *libvirt.Libvirt, name string, size uint64) string {
	t.Helper()
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		t.Fatal(err)
	}
	vx := libvirtxml.StorageVolume{Name: name, Capacity: &libvirtxml.StorageVolumeSize{Value: size},
		Target: &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "raw"}}}
	doc, _ := vx.Marshal()
	vol, err := l.StorageVolCreateXML(pool, doc, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.StorageVolDelete(vol, 0); err != nil && !isNoStorageVol(err) {
			t.Errorf("cleanup: delete %s: %v", name, err)
		}
	})
	path, err := l.StorageVolGetPath(vol)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

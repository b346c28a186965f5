package provision

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// Benchmarks of clone+define on qemu:///system for images of growing
// (virtual) size, against doing the same with virsh. Removal is outside
// the timer. Run with e.g. -run '^$' -bench . -benchtime=5x.

// benchSizes are the virtual sizes of the benchmark images, each holding
// the tiny guest's 14 MB of data.
var benchSizes = []struct {
	name  string
	bytes uint64
}{
	{"64MiB", 64 << 20},
	{"10GiB", 10 << 30},
	{"50GiB", 50 << 30},
}

var benchModes = []CloneMode{CloneLinked, CloneCopy}

func BenchmarkClone(b *testing.B) {
	l := systemConn(b)
	p := New(l, Options{DomainType: "qemu"})
	for _, size := range benchSizes {
		img := defineTestImage(b, l, imageShape{rootCapacity: size.bytes})
		for _, mode := range benchModes {
			b.Run(fmt.Sprintf("%s/%s", mode, size.name), func(b *testing.B) {
				for range b.N {
					job := testJobID(b)
					if _, err := p.Clone(context.Background(), Spec{Host: testHost, JobID: job, Image: img.Name, CloneMode: mode}); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if _, err := p.Remove(context.Background(), job); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		}
	}
}

// BenchmarkVirsh does what BenchmarkClone measures with virsh processes:
// vol-create-as with a backing volume (linked) or vol-clone (copy), then
// define of a definition prepared beforehand.
func BenchmarkVirsh(b *testing.B) {
	l := systemConn(b)
	p := New(l, Options{DomainType: "qemu"})
	for _, size := range benchSizes {
		img := defineTestImage(b, l, imageShape{rootCapacity: size.bytes})
		src := img.Disks["vda"]
		for _, mode := range benchModes {
			b.Run(fmt.Sprintf("%s/%s", mode, size.name), func(b *testing.B) {
				for range b.N {
					job := testJobID(b)
					vol := volumeName(job, "vda", "qcow2")
					path := filepath.Join(filepath.Dir(src), vol)
					b.StopTimer()
					xmlFile := virshDefinition(b, p, img, job, path)
					b.StartTimer()
					var create []string
					if mode == CloneLinked {
						create = []string{"vol-create-as", testPool, vol, strconv.FormatUint(size.bytes, 10),
							"--format", "qcow2", "--backing-vol", src, "--backing-vol-format", "qcow2"}
					} else {
						create = []string{"vol-clone", "--pool", testPool, filepath.Base(src), vol}
					}
					virsh(b, create...)
					virsh(b, "define", xmlFile)
					b.StopTimer()
					if _, err := p.Remove(context.Background(), job); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		}
	}
}

// virshDefinition writes the definition of the job's clone of img, with
// its disk at path, to a file.
func virshDefinition(b *testing.B, p *Provisioner, img testImageDef, job, path string) string {
	b.Helper()
	meta, err := encodeMetadata(Machine{JobID: job, Image: img.Name, Volumes: []string{path}})
	if err != nil {
		b.Fatal(err)
	}
	uuid, err := newUUID(p.rand)
	if err != nil {
		b.Fatal(err)
	}
	def, _, err := cloneXML(img.Def, clonePlan{
		Image: img.Name, Name: DomainName(job), UUID: uuid, Type: "qemu", Linked: true,
		Disks: map[string]diskOut{"vda": {Path: path, Format: "qcow2"}}, Metadata: meta, Rand: p.rand,
	})
	if err != nil {
		b.Fatal(err)
	}
	doc, err := def.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	file := filepath.Join(b.TempDir(), "domain.xml")
	if err := os.WriteFile(file, []byte(doc), 0o644); err != nil {
		b.Fatal(err)
	}
	return file
}

func virsh(b *testing.B, args ...string) {
	b.Helper()
	out, err := exec.Command("virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...).CombinedOutput()
	if err != nil {
		b.Fatalf("virsh %q: %v: %s", args, err, out)
	}
}

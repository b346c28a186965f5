package provision

import (
	"errors"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"
)

func TestMetadataRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		m    Machine
	}{
		{"all fields", Machine{
			JobID: "job-1", Image: "tiny-linux", Host: "host-a", RunnerKind: "forgejo",
			RequestedAt: time.Date(2026, 3, 4, 5, 6, 7, 891000000, time.UTC),
			Deadline:    time.Date(2026, 3, 4, 7, 6, 7, 0, time.FixedZone("CET", 3600)),
			CloneMode:   CloneReflink,
			OS:          "windows",
			Volumes:     []string{"/pool/stretchy-job-1-vda.qcow2", "/pool/stretchy-job-1-vdb.img", "/pool/stretchy-job-1-nvram.fd", "/pool/stretchy-job-1-scratch.qcow2"},
			VCPUs:       2,
			MemoryMiB:   256,
			ScratchGiB:  10,
			ConsoleLogs: []string{"/var/log/c/stretchy-job-1.log", "/var/log/c/stretchy-job-1.console1.log"},
		}},
		{"zero times and no volumes", Machine{JobID: "j", Image: "img"}},
		{"text needing escapes", Machine{JobID: "j", Image: "a<b>&'\"", Host: "h"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inner, err := encodeMetadata(tt.m)
			if err != nil {
				t.Fatal(err)
			}
			// Through a whole domain document, as libvirt stores it.
			def, _, err := cloneXML(image(nil), clonePlan{Name: "stretchy-j", UUID: "u", Metadata: inner})
			if err != nil {
				t.Fatal(err)
			}
			doc, err := def.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if !regexp.MustCompile(`<stretchy:machine xmlns:stretchy="https://stretchy-ci.dev/xmlns/libvirt-worker/1">`).MatchString(doc) {
				t.Errorf("metadata element not in the stretchy namespace:\n%s", doc)
			}
			var back libvirtxml.Domain
			if err := back.Unmarshal(doc); err != nil {
				t.Fatal(err)
			}
			var got Machine
			if err := decodeMetadata(back.Metadata.XML, &got); err != nil {
				t.Fatalf("decodeMetadata: %v", err)
			}
			if !got.RequestedAt.Equal(tt.m.RequestedAt) || !got.Deadline.Equal(tt.m.Deadline) {
				t.Errorf("times = %v, %v; want %v, %v", got.RequestedAt, got.Deadline, tt.m.RequestedAt, tt.m.Deadline)
			}
			got.RequestedAt, got.Deadline = tt.m.RequestedAt, tt.m.Deadline
			if !reflect.DeepEqual(got, tt.m) {
				t.Errorf("round trip = %+v, want %+v", got, tt.m)
			}
		})
	}
}

// TestMetadataWithoutSize: a machine built before the metadata recorded
// sizes and console logs decodes with them empty, and a machine without
// console logs records no element for them.
func TestMetadataWithoutSize(t *testing.T) {
	var m Machine
	old := `<machine><job_id>a</job_id><image>img</image><volumes><volume>/p/stretchy-a-vda.qcow2</volume></volumes></machine>`
	if err := decodeMetadata(old, &m); err != nil {
		t.Fatal(err)
	}
	if m.VCPUs != 0 || m.MemoryMiB != 0 || m.ScratchGiB != 0 || m.ConsoleLogs != nil || len(m.Volumes) != 1 {
		t.Errorf("decoded %+v", m)
	}
	doc, err := encodeMetadata(Machine{JobID: "a", Image: "img", VCPUs: 1, MemoryMiB: 128})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(doc, "console_logs") || strings.Contains(doc, "scratch_gib") || !strings.Contains(doc, "<vcpus>1</vcpus><memory_mib>128</memory_mib>") {
		t.Errorf("encoded %s", doc)
	}
}

func TestDecodeMetadata(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		wantJob string
		wantErr bool
	}{
		{"as virDomainGetMetadata returns it", "<machine>\n  <job_id>a</job_id>\n</machine>", "a", false},
		{"in the default namespace", `<machine xmlns="https://stretchy-ci.dev/xmlns/libvirt-worker/1"><job_id>a</job_id></machine>`, "a", false},
		{"among other applications' elements", `<x:y xmlns:x="urn:x"><machine>no</machine></x:y><s:machine xmlns:s="https://stretchy-ci.dev/xmlns/libvirt-worker/1"><job_id>b</job_id></s:machine>`, "b", false},
		{"other namespace only", `<machine xmlns="urn:other"><job_id>c</job_id></machine>`, "", true},
		{"bad time", `<machine xmlns="https://stretchy-ci.dev/xmlns/libvirt-worker/1"><deadline>soon</deadline></machine>`, "", true},
		{"broken XML", `<machine xmlns="https://stretchy-ci.dev/xmlns/libvirt-worker/1"><job_id>`, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Machine
			err := decodeMetadata(tt.doc, &m)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error: %v", err, tt.wantErr)
			}
			if m.JobID != tt.wantJob {
				t.Errorf("job = %q, want %q", m.JobID, tt.wantJob)
			}
		})
	}
}

func TestDecodeImageSettings(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		want    imageSettings
		wantErr error
	}{
		{"as virDomainGetMetadata returns it", `<image clone-mode="copy" os="windows"/>`, imageSettings{CloneCopy, "windows"}, nil},
		{"as virsh metadata --set writes it", `<stretchy:image xmlns:stretchy="https://stretchy-ci.dev/xmlns/libvirt-worker/1" clone-mode="reflink"/>`, imageSettings{CloneReflink, ""}, nil},
		{"os only", `<image os="linux"/>`, imageSettings{"", "linux"}, nil},
		{"unknown mode", `<image clone-mode="fast"/>`, imageSettings{}, ErrInvalidCloneMode},
		{"a machine's element", `<machine><job_id>a</job_id></machine>`, imageSettings{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeImageSettings(tt.doc)
			if tt.name == "a machine's element" {
				if err == nil {
					t.Fatalf("decoded %+v from a machine's element", got)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("settings = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestMetadataElementForSetMetadata: the element virDomainSetMetadata
// takes has no prefix and no namespace declaration, and decodes as the
// full element does.
func TestMetadataElementForSetMetadata(t *testing.T) {
	m := Machine{JobID: "job-1", Warm: true, Generation: "g", Image: "img", Host: "h"}
	doc, err := encodeMetadataElement(m)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(doc, "<machine>") || !strings.HasSuffix(doc, "</machine>") || strings.Contains(doc, "xmlns") {
		t.Fatalf("element %s", doc)
	}
	var got Machine
	if err := decodeMetadata(doc, &got); err != nil || got.JobID != "job-1" || !got.Warm || got.Generation != "g" {
		t.Fatalf("decoded %+v, %v", got, err)
	}
}

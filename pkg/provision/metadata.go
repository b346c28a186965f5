package provision

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

const (
	// metadataNS is the XML namespace of the element this package keeps in
	// a managed domain's <metadata>; libvirt keeps one element per namespace.
	metadataNS = "https://stretchy-ci.dev/xmlns/libvirt-worker/1"
	// metadataPrefix is the namespace prefix used in the domain XML.
	metadataPrefix = "stretchy"
	// metadataElement is the local name of that element.
	metadataElement = "machine"
	// imageElement is the local name of the element operators put in an
	// image's <metadata>, in the same namespace, to set its defaults:
	//
	//	virsh metadata IMAGE https://stretchy-ci.dev/xmlns/libvirt-worker/1 \
	//	  --key stretchy --config --set '<image clone-mode="copy" os="windows"/>'
	imageElement = "image"
)

// machineMetadata is the <stretchy:machine> element. Its children carry no
// namespace so that one struct both encodes (with the prefixed name set in
// XMLName) and decodes (where encoding/xml resolves the prefix to
// metadataNS).
type machineMetadata struct {
	XMLName     xml.Name
	XMLNS       string    `xml:"xmlns:stretchy,attr,omitempty"`
	JobID       string    `xml:"job_id"`
	Warm        bool      `xml:"warm,omitempty"`
	Generation  string    `xml:"generation,omitempty"`
	Image       string    `xml:"image"`
	Host        string    `xml:"host,omitempty"`
	RunnerKind  string    `xml:"runner_kind,omitempty"`
	RequestedAt string    `xml:"requested_at,omitempty"`
	Deadline    string    `xml:"deadline,omitempty"`
	CloneMode   string    `xml:"clone_mode,omitempty"`
	OS          string    `xml:"os,omitempty"`
	Volumes     []string  `xml:"volumes>volume"`
	VCPUs       int       `xml:"vcpus,omitempty"`
	MemoryMiB   int       `xml:"memory_mib,omitempty"`
	ScratchGiB  int       `xml:"scratch_gib,omitempty"`
	ConsoleLogs *fileList `xml:"console_logs"`
	HeldUntil   string    `xml:"held_until,omitempty"`
	HoldForS    int64     `xml:"hold_for_s,omitempty"`
	HoldOnFail  int64     `xml:"hold_on_failure_s,omitempty"`
}

// fileList is a list of <file> elements, absent when empty.
type fileList struct {
	Files []string `xml:"file"`
}

// encodeMetadata returns the element to place inside <metadata> for m.
func encodeMetadata(m Machine) (string, error) {
	md := machineMetadata{
		XMLName:     xml.Name{Local: metadataPrefix + ":" + metadataElement},
		XMLNS:       metadataNS,
		JobID:       m.JobID,
		Warm:        m.Warm,
		Generation:  m.Generation,
		Image:       m.Image,
		Host:        m.Host,
		RunnerKind:  m.RunnerKind,
		RequestedAt: formatTime(m.RequestedAt),
		Deadline:    formatTime(m.Deadline),
		CloneMode:   string(m.CloneMode),
		OS:          m.OS,
		Volumes:     m.Volumes,
		VCPUs:       m.VCPUs,
		MemoryMiB:   m.MemoryMiB,
		ScratchGiB:  m.ScratchGiB,
		HeldUntil:   formatTime(m.HeldUntil),
		HoldForS:    int64(m.HoldFor / time.Second),
		HoldOnFail:  int64(m.HoldOnFailure / time.Second),
	}
	if len(m.ConsoleLogs) > 0 {
		md.ConsoleLogs = &fileList{Files: m.ConsoleLogs}
	}
	b, err := xml.Marshal(md)
	if err != nil {
		return "", fmt.Errorf("encode metadata: %w", err)
	}
	return string(b), nil
}

// encodeMetadataElement returns m's element as virDomainSetMetadata takes
// it: no prefix and no namespace declaration, which libvirt adds from the
// key and URI it is given.
func encodeMetadataElement(m Machine) (string, error) {
	doc, err := encodeMetadata(m)
	if err != nil {
		return "", err
	}
	doc = strings.Replace(doc, "<"+metadataPrefix+":"+metadataElement+` xmlns:stretchy="`+metadataNS+`"`, "<"+metadataElement, 1)
	doc = strings.TrimSuffix(doc, "</"+metadataPrefix+":"+metadataElement+">") + "</" + metadataElement + ">"
	return doc, nil
}

// decodeMetadata finds this package's element in doc and fills in m's
// recorded fields; m.Name and m.Running are left alone. doc is either what
// virDomainGetMetadata returns for metadataNS, the element with its
// namespace stripped, or the inner XML of <metadata>, where the element must
// be in metadataNS to be told apart from other applications' elements.
func decodeMetadata(doc string, m *Machine) error {
	var md machineMetadata
	if err := decodeElement(doc, metadataElement, &md); err != nil {
		return fmt.Errorf("decode metadata: %w", err)
	}
	requested, err := parseTime(md.RequestedAt)
	if err != nil {
		return fmt.Errorf("decode metadata: requested_at: %w", err)
	}
	deadline, err := parseTime(md.Deadline)
	if err != nil {
		return fmt.Errorf("decode metadata: deadline: %w", err)
	}
	m.JobID = md.JobID
	m.Warm = md.Warm
	m.Generation = md.Generation
	m.Image = md.Image
	m.Host = md.Host
	m.RunnerKind = md.RunnerKind
	m.RequestedAt = requested
	m.Deadline = deadline
	m.CloneMode = CloneMode(md.CloneMode)
	m.OS = md.OS
	m.Volumes = md.Volumes
	m.VCPUs = md.VCPUs
	m.MemoryMiB = md.MemoryMiB
	m.ScratchGiB = md.ScratchGiB
	m.ConsoleLogs = nil
	if md.ConsoleLogs != nil {
		m.ConsoleLogs = md.ConsoleLogs.Files
	}
	if m.HeldUntil, err = parseTime(md.HeldUntil); err != nil {
		return fmt.Errorf("decode metadata: held_until: %w", err)
	}
	m.HoldFor = time.Duration(max(0, md.HoldForS)) * time.Second
	m.HoldOnFailure = time.Duration(max(0, md.HoldOnFail)) * time.Second
	return nil
}

// imageSettings are an image's defaults, from its <stretchy:image> element.
type imageSettings struct {
	// CloneMode is the image's default clone mode, "" for CloneLinked.
	CloneMode CloneMode `xml:"clone-mode,attr"`
	// OS is the guest OS family; it spares callers detecting it.
	OS string `xml:"os,attr"`
}

// decodeImageSettings decodes an image's element, as decodeMetadata does
// a machine's.
func decodeImageSettings(doc string) (imageSettings, error) {
	var s imageSettings
	if err := decodeElement(doc, imageElement, &s); err != nil {
		return imageSettings{}, fmt.Errorf("decode image metadata: %w", err)
	}
	if s.CloneMode != "" && !s.CloneMode.valid() {
		return imageSettings{}, fmt.Errorf("decode image metadata: clone-mode %q: %w", s.CloneMode, ErrInvalidCloneMode)
	}
	return s, nil
}

// decodeElement decodes the first top-level element named local, in
// metadataNS or in no namespace, of doc into v.
func decodeElement(doc, local string, v any) error {
	dec := xml.NewDecoder(strings.NewReader(doc))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return errors.New("no " + local + " element in namespace " + metadataNS)
		}
		if err != nil {
			return err
		}
		start, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		if start.Name.Local != local || (start.Name.Space != metadataNS && start.Name.Space != "") {
			// Only top-level elements count.
			if err := dec.Skip(); err != nil {
				return err
			}
			continue
		}
		return dec.DecodeElement(v, &start)
	}
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Format(time.RFC3339Nano)
}

func parseTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	return time.Parse(time.RFC3339Nano, s)
}

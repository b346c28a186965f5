package messages

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Buckets of a fleet of workers. Each is a JetStream key-value bucket whose
// stream is "KV_" + its name.
const (
	// HostsBucket holds one Host record per running worker, key the host
	// id; its TTL removes the record of a worker that stopped refreshing
	// it.
	HostsBucket = "STRETCHY_LIBVIRT_HOSTS"
	// DrainsBucket holds a Drain per host that an operator asked to
	// drain, key the host id. It has no TTL: a drained host that restarts
	// stays drained until the key is deleted (worker undrain).
	DrainsBucket = "STRETCHY_LIBVIRT_DRAINS"
	// TriedBucket records, per shared provision request that a host could
	// not serve, the hosts that tried it (a Tried), key the request's
	// stream sequence in decimal.
	TriedBucket = "STRETCHY_LIBVIRT_TRIED"
)

// ValidImage reports whether name can be asked for in a provision request:
// the pattern of section 3.1 of docs/protocol.md, and not a managed name.
func ValidImage(name string) bool {
	return imagePattern.MatchString(name) && !strings.HasPrefix(name, ManagedPrefix)
}

// ImageToken encodes an image name as one NATS subject token: ASCII
// letters, digits and '-' stay as they are, every other byte becomes '_'
// followed by its value in two lowercase hex digits ('.' is "_2e", '+'
// "_2b", ':' "_3a", '_' "_5f"). The encoding is reversible
// (ParseImageToken) and never contains '.', '*', '>' or white space.
func ImageToken(image string) string {
	var b strings.Builder
	for i := 0; i < len(image); i++ {
		c := image[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "_%02x", c)
		}
	}
	return b.String()
}

// ErrBadToken is returned by ParseImageToken for a token ImageToken does
// not produce.
var ErrBadToken = errors.New("not an image token")

// ParseImageToken decodes a token made by ImageToken. It accepts only the
// encoding ImageToken produces, so each image has exactly one token.
func ParseImageToken(tok string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(tok); i++ {
		c := tok[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			b.WriteByte(c)
		case c == '_' && i+2 < len(tok):
			v, err := hex.DecodeString(tok[i+1 : i+3])
			if err != nil || tok[i+1:i+3] != strings.ToLower(tok[i+1:i+3]) {
				return "", fmt.Errorf("%w: %q: bad escape at byte %d", ErrBadToken, tok, i)
			}
			if d := v[0]; d >= 'A' && d <= 'Z' || d >= 'a' && d <= 'z' || d >= '0' && d <= '9' || d == '-' {
				return "", fmt.Errorf("%w: %q: %q must not be escaped", ErrBadToken, tok, d)
			}
			b.WriteByte(v[0])
			i += 2
		default:
			return "", fmt.Errorf("%w: %q: byte %d", ErrBadToken, tok, i)
		}
	}
	if tok == "" {
		return "", fmt.Errorf("%w: empty", ErrBadToken)
	}
	return b.String(), nil
}

// ImageProvisionSubject is the subject of provision requests for image,
// which every host that carries the image takes from.
func ImageProvisionSubject(image string) string {
	return subjectRoot + ".req.image." + ImageToken(image) + ".provision"
}

// ImageProvisionSubjects matches the provision subjects of every image.
const ImageProvisionSubjects = subjectRoot + ".req.image.*.provision"

// MaxConsumerName is the longest durable consumer name nats-server accepts
// (JSMaxNameLen; the name is also a directory of its file store).
const MaxConsumerName = 255

// ImageConsumer names the durable consumer that the hosts carrying image
// share: "image_" + ImageToken(image), or, when that is longer than
// MaxConsumerName, "imagehash_" + the first 32 hex digits of the SHA-256 of
// the image name. The two forms cannot collide: their prefixes differ at
// the sixth byte ('_' or 'h').
func ImageConsumer(image string) string {
	name := "image_" + ImageToken(image)
	if len(name) <= MaxConsumerName {
		return name
	}
	sum := sha256.Sum256([]byte(image))
	return "imagehash_" + hex.EncodeToString(sum[:16])
}

// HostState says whether a host takes provisions.
type HostState string

// Host states. A draining host takes no provisions but serves teardowns and
// keeps its machines; it is drained once it has none left.
const (
	HostActive   HostState = "active"
	HostDraining HostState = "draining"
	HostDrained  HostState = "drained"
)

// Host is a worker's record in HostsBucket, refreshed every few seconds.
// Its JSON form (worker hosts --json) uses the same field names.
type Host struct {
	V    int    `msgpack:"v" json:"v"`
	Host string `msgpack:"host" json:"host"`
	// Version is the worker's version.
	Version string    `msgpack:"version" json:"version"`
	State   HostState `msgpack:"state" json:"state"`
	// Images are the images the host carries and serves, sorted by name.
	Images []HostImage `msgpack:"images" json:"images"`
	// SlotsTotal and SlotsInUse are the host's operation slots
	// (--parallelism) and how many run an operation now.
	SlotsTotal int `msgpack:"slots_total" json:"slots_total"`
	SlotsInUse int `msgpack:"slots_in_use" json:"slots_in_use"`
	// MachinesMax is --max-vms; MachinesRunning counts the machines that
	// exist or are being built.
	MachinesMax     int `msgpack:"machines_max" json:"machines_max"`
	MachinesRunning int `msgpack:"machines_running" json:"machines_running"`
	// Pools are the storage pools of the host's images.
	Pools []HostPool `msgpack:"pools" json:"pools"`
	// The host's bounds on machine sizes (0: none) and what its machines
	// hold: VCPUsTotal and MemoryTotalMiB are --host-vcpus and
	// --host-memory, the used ones the sizes of the machines that exist
	// or are being built, held ones included.
	VCPUsTotal             int `msgpack:"vcpus_total,omitempty" json:"vcpus_total,omitempty"`
	VCPUsUsed              int `msgpack:"vcpus_used,omitempty" json:"vcpus_used"`
	MemoryTotalMiB         int `msgpack:"memory_total_mib,omitempty" json:"memory_total_mib,omitempty"`
	MemoryUsedMiB          int `msgpack:"memory_used_mib,omitempty" json:"memory_used_mib"`
	MaxVCPUsPerMachine     int `msgpack:"max_vcpus_per_machine,omitempty" json:"max_vcpus_per_machine,omitempty"`
	MaxMemoryPerMachineMiB int `msgpack:"max_memory_per_machine_mib,omitempty" json:"max_memory_per_machine_mib,omitempty"`
	// MaxScratchGiB is --max-scratch-gib, the bound on one machine's
	// scratch disk (0: none).
	MaxScratchGiB int `msgpack:"max_scratch_gib,omitempty" json:"max_scratch_gib,omitempty"`
	// Held are the machines the host keeps after their jobs ended.
	Held []HostHeld `msgpack:"held,omitempty" json:"held,omitempty"`
	// SealKeys are the keys runner secrets may be sealed to for this host
	// (3.13), the one to prefer first.
	SealKeys []SealKey `msgpack:"seal_keys,omitempty" json:"seal_keys,omitempty"`
	// Started is when the worker process started; Heartbeat when the
	// record was written.
	Started   time.Time `msgpack:"started" json:"started"`
	Heartbeat time.Time `msgpack:"heartbeat" json:"heartbeat"`
}

// HostHeld is a held machine: its job, and when its hold ends.
type HostHeld struct {
	JobID string    `msgpack:"job_id" json:"job_id"`
	Until time.Time `msgpack:"until" json:"until"`
}

// HostImage is an image as a host carries it.
type HostImage struct {
	Name string `msgpack:"name" json:"name"`
	// OS is the OS family the image declares, empty when it is detected
	// at boot.
	OS string `msgpack:"os,omitempty" json:"os,omitempty"`
	// Firmware is "bios" or "efi".
	Firmware  string `msgpack:"firmware" json:"firmware"`
	CloneMode string `msgpack:"clone_mode" json:"clone_mode"`
	// Generation changes whenever the image's definition or its disks are
	// replaced.
	Generation string `msgpack:"generation" json:"generation"`
	// Admitted is false while a pool of the image has less free space
	// than the host's minimum: the host then takes none of its requests.
	Admitted bool `msgpack:"admitted" json:"admitted"`
}

// HostPool is a storage pool's free space as a host last saw it.
type HostPool struct {
	Name      string `msgpack:"name" json:"name"`
	FreeBytes uint64 `msgpack:"free_bytes" json:"free_bytes"`
	// Low is true when FreeBytes is below the host's minimum.
	Low bool `msgpack:"low,omitempty" json:"low,omitempty"`
}

// Drain is the value of a host's key in DrainsBucket: an operator asked the
// host to take no more provisions.
type Drain struct {
	V    int       `msgpack:"v" json:"v"`
	Host string    `msgpack:"host" json:"host"`
	By   string    `msgpack:"by,omitempty" json:"by,omitempty"`
	At   time.Time `msgpack:"at" json:"at"`
}

// Tried is the value of a shared provision request's key in TriedBucket:
// the hosts that pulled it and could not serve its image.
type Tried struct {
	V     int      `msgpack:"v" json:"v"`
	JobID string   `msgpack:"job_id" json:"job_id"`
	Image string   `msgpack:"image" json:"image"`
	Hosts []string `msgpack:"hosts" json:"hosts"`
}

// DecodeHost decodes the value of a key in HostsBucket.
func DecodeHost(data []byte) (Host, error) {
	var h Host
	err := unmarshal(data, &h)
	return h, err
}

// DecodeDrain decodes the value of a key in DrainsBucket.
func DecodeDrain(data []byte) (Drain, error) {
	var d Drain
	err := unmarshal(data, &d)
	return d, err
}

// DecodeTried decodes the value of a key in TriedBucket.
func DecodeTried(data []byte) (Tried, error) {
	var t Tried
	err := unmarshal(data, &t)
	return t, err
}

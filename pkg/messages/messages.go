package messages

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

// SchemaVersion is the major version of this contract, carried in every
// message's "v" field. Adding optional fields does not change it.
const SchemaVersion = 1

// MaxMessageSize bounds every request payload. Larger payloads are refused
// before they are decoded.
const MaxMessageSize = 64 << 10

// Defaults and bounds for the optional durations of a provision request.
const (
	DefaultBootTimeout = 5 * time.Minute
	MaxBootTimeout     = time.Hour
	DefaultMaxLifetime = 6 * time.Hour
	MaxMaxLifetime     = 7 * 24 * time.Hour
	// MaxHoldOnFailure bounds hold_on_failure_s; a host caps it further
	// (worker --max-hold).
	MaxHoldOnFailure = 24 * time.Hour
)

// Bounds of the optional size of a provision request's machine. They only
// keep absurd values off the wire: each host refuses a size beyond its own,
// lower bounds with CodeResourcesExceeded.
const (
	MaxVCPUs          = 1024
	MinMemoryMiB      = 32
	MaxMemoryMiB      = 4 << 20  // 4 TiB
	MaxScratchDiskGiB = 64 << 10 // 64 TiB
)

// RunnerKind selects the CI runner the worker starts in the machine.
type RunnerKind string

// Runner kinds. RunnerNone boots the machine and starts nothing; it is torn
// down by a teardown request or at its deadline, which is useful to check an
// image.
const (
	RunnerNone    RunnerKind = "none"
	RunnerForgejo RunnerKind = "forgejo"
	RunnerGitHub  RunnerKind = "github"
	RunnerJenkins RunnerKind = "jenkins"
)

// Provision asks a worker to create, boot and hand a machine to one job.
// It is published on ProvisionSubject, or on HostProvisionSubject to pin it
// to one host.
type Provision struct {
	// V is the schema version, SchemaVersion.
	V int `msgpack:"v"`
	// JobID identifies the job and is the idempotency key: a worker never
	// creates a second machine for a job it already has one for.
	JobID string `msgpack:"job_id"`
	// Image is the name of the shut-off libvirt domain that is cloned.
	Image string `msgpack:"image"`
	// Runner says which runner to start in the machine, with its settings.
	Runner Runner `msgpack:"runner"`
	// BootTimeoutS bounds, in seconds, the time from starting the machine
	// until it is ready; 0 means DefaultBootTimeout.
	BootTimeoutS int64 `msgpack:"boot_timeout_s,omitempty"`
	// MaxLifetimeS bounds, in seconds, the machine's whole life counted from
	// RequestedAt; 0 means DefaultMaxLifetime.
	MaxLifetimeS int64 `msgpack:"max_lifetime_s,omitempty"`
	// RequestedAt is when the orchestrator made the decision.
	RequestedAt time.Time `msgpack:"requested_at"`
	// VCPUs is the machine's number of virtual CPUs; 0 keeps the image's.
	VCPUs int `msgpack:"vcpus,omitempty"`
	// MemoryMiB is the machine's memory in MiB; 0 keeps the image's.
	MemoryMiB int `msgpack:"memory_mib,omitempty"`
	// ScratchDiskGiB adds an empty disk of that many GiB to the machine;
	// 0 adds none.
	ScratchDiskGiB int `msgpack:"scratch_disk_gib,omitempty"`
	// HoldOnFailureS asks the host to keep the machine, in seconds, after
	// the job failed, for debugging; the host caps it. 0 holds nothing.
	HoldOnFailureS int64 `msgpack:"hold_on_failure_s,omitempty"`
}

// Runner is the runner section of a provision request: a kind and the
// settings of that kind. Exactly the section named by Kind is read. The
// table of runner kinds in pkg/runners says what each section must hold
// and which of its fields are secrets; runners.Validate checks it.
type Runner struct {
	Kind    RunnerKind     `msgpack:"kind"`
	Forgejo *ForgejoRunner `msgpack:"forgejo,omitempty"`
	GitHub  *GitHubRunner  `msgpack:"github,omitempty"`
	Jenkins *JenkinsAgent  `msgpack:"jenkins,omitempty"`
	// Sealed, when set, holds the kind's secret sealed to a key of the
	// worker's (docs/protocol.md 3.13); the secret field of the kind's
	// section is then empty. Only a worker holding the key's private half
	// can read it.
	Sealed *SealedSecret `msgpack:"sealed,omitempty"`
}

// SealedSecret is a runner secret sealed to a worker key: an X25519 sealed
// box as libsodium's crypto_box_seal makes it, of a msgpack-encoded
// SealedPayload, to the public key whose id is KeyID.
type SealedSecret struct {
	// KeyID names the key: the lowercase hex of the first 8 bytes of the
	// SHA-256 of its 32-byte public key (SealKeyID).
	KeyID string `msgpack:"key_id"`
	// Box is crypto_box_seal(msgpack(SealedPayload), public key): 32
	// bytes of ephemeral public key, then the ciphertext with its
	// 16-byte tag.
	Box []byte `msgpack:"box"`
}

// SealedPayload is what a SealedSecret's box holds. JobID binds it to the
// request it was sealed for: a box copied into another job's request is
// refused.
type SealedPayload struct {
	V      int    `msgpack:"v"`
	JobID  string `msgpack:"job_id"`
	Secret string `msgpack:"secret"`
}

// SealOverhead is what crypto_box_seal adds to its message: an ephemeral
// public key and the Poly1305 tag.
const SealOverhead = 32 + 16

// MaxSealedBox bounds a SealedSecret's box: a payload with the longest
// secret, its job id and msgpack framing, sealed.
const MaxSealedBox = maxSecretLen + 256 + SealOverhead

// SealKeyID returns the id of the sealing key with the given 32-byte
// public key.
func SealKeyID(public []byte) string {
	sum := sha256.Sum256(public)
	return hex.EncodeToString(sum[:8])
}

// SealKey is a worker's sealing key as its host record publishes it: its
// id and 32-byte X25519 public key. Orchestrators seal to it.
type SealKey struct {
	ID     string `msgpack:"id" json:"id"`
	Public []byte `msgpack:"public" json:"public"`
}

// ForgejoRunner holds what `forgejo-runner one-job` needs for an ephemeral
// runner the orchestrator registered through Forgejo's API.
type ForgejoRunner struct {
	URL    string   `msgpack:"url"`
	UUID   string   `msgpack:"uuid"`
	Token  string   `msgpack:"token"` // secret
	Labels []string `msgpack:"labels"`
	Handle string   `msgpack:"handle,omitempty"`
}

// GitHubRunner holds the just-in-time configuration the orchestrator
// obtained from GitHub's generate-jitconfig endpoint.
type GitHubRunner struct {
	JITConfig string `msgpack:"jit_config"` // secret
}

// JenkinsAgent holds what an inbound Jenkins agent needs to connect.
type JenkinsAgent struct {
	URL       string `msgpack:"url"`
	AgentName string `msgpack:"agent_name"`
	Secret    string `msgpack:"secret"` // secret
	WorkDir   string `msgpack:"work_dir,omitempty"`
}

// Teardown asks the worker on one host to remove the machine of a job. It is
// published on TeardownSubject of the host named in the job's events.
type Teardown struct {
	V           int       `msgpack:"v"`
	JobID       string    `msgpack:"job_id"`
	Reason      string    `msgpack:"reason,omitempty"`
	RequestedAt time.Time `msgpack:"requested_at"`
}

// BootTimeout returns the effective boot timeout of p.
func (p *Provision) BootTimeout() time.Duration {
	if p.BootTimeoutS == 0 {
		return DefaultBootTimeout
	}
	return time.Duration(p.BootTimeoutS) * time.Second
}

// MaxLifetime returns the effective maximum lifetime of p.
func (p *Provision) MaxLifetime() time.Duration {
	if p.MaxLifetimeS == 0 {
		return DefaultMaxLifetime
	}
	return time.Duration(p.MaxLifetimeS) * time.Second
}

// HoldOnFailure returns how long p asks its machine to be kept after a
// failure, before the host's cap.
func (p *Provision) HoldOnFailure() time.Duration {
	return time.Duration(p.HoldOnFailureS) * time.Second
}

// Deadline is the instant the machine of p is torn down at the latest.
func (p *Provision) Deadline() time.Time {
	return p.RequestedAt.Add(p.MaxLifetime())
}

package messages

import (
	"encoding/hex"
	"regexp"
	"strings"
)

// ProvisionerID names this provisioner in the orchestrator and in the subject
// namespace, so other provisioners can share one NATS deployment without
// seeing these messages.
const ProvisionerID = "LIBVIRT"

// ManagedPrefix starts the name of every libvirt domain the worker creates.
// Domains without it belong to the operator and are never touched.
const ManagedPrefix = "stretchy-"

// Stream names and subject roots. The request stream uses work-queue
// retention: a request is removed once a worker acknowledges it. The event
// stream keeps events by age for the orchestrator and for audit.
const (
	RequestsStream = "STRETCHY_LIBVIRT_REQUESTS"
	EventsStream   = "STRETCHY_LIBVIRT_EVENTS"
	// ClaimsBucket is the key-value bucket of job claims: key job_id,
	// value a Claim. Its stream is "KV_" + ClaimsBucket.
	ClaimsBucket = "STRETCHY_LIBVIRT_CLAIMS"

	subjectRoot     = "stretchy." + ProvisionerID
	RequestSubjects = subjectRoot + ".req.>"
	EventSubjects   = subjectRoot + ".evt.>"
)

// ProvisionSubject is the shared subject for provision requests that any
// host may take.
func ProvisionSubject() string { return subjectRoot + ".req.provision" }

// HostProvisionSubject is the subject for provision requests pinned to host.
func HostProvisionSubject(host string) string {
	return subjectRoot + ".req.host." + host + ".provision"
}

// TeardownSubject is the subject for teardown requests for machines on host.
// The orchestrator learns a job's host from the job's events.
func TeardownSubject(host string) string {
	return subjectRoot + ".req.host." + host + ".teardown"
}

// EventSubject is the subject an event for job on host in state is published
// on. Its tokens let readers filter by host, job or state on the server. The
// events of a warm machine that no job has bound yet carry the machine's
// key in the job's place.
func EventSubject(host, jobID string, state State) string {
	return subjectRoot + ".evt." + host + "." + jobID + "." + string(state)
}

// Subject is the subject ev is published on: its job's, or for a warm
// machine no job has bound yet, the machine's.
func (ev *Event) Subject() string { return EventSubject(ev.Host, ev.Token(), ev.State) }

// Token is the job id of ev, or the warm machine's key when it has none:
// the fourth token of its subject.
func (ev *Event) Token() string {
	if ev.JobID == "" {
		return ev.Machine
	}
	return ev.JobID
}

// EventFilter builds an event subject filter; an empty argument matches any
// value in that position.
func EventFilter(host, jobID string, state State) string {
	tok := func(s string) string {
		if s == "" {
			return "*"
		}
		return s
	}
	return strings.Join([]string{subjectRoot, "evt", tok(host), tok(jobID), tok(string(state))}, ".")
}

// DomainName is the libvirt domain name of the machine with key: a cold
// machine's key is its job id.
func DomainName(key string) string { return ManagedPrefix + key }

// Warm machines are booted before any job exists (warm pools), so their
// domain name carries no job id: ManagedPrefix, then a key that no job id
// can be, since job ids start with a letter or digit. A warm machine keeps
// its name when a job binds it; its events carry the key as Event.Machine.
var warmKeyPattern = regexp.MustCompile(`^_warm-[0-9a-f]{12}$`)

// WarmKey returns the key of a new warm machine, from 6 random bytes.
func WarmKey(random [6]byte) string { return "_warm-" + hex.EncodeToString(random[:]) }

// ValidWarmKey reports whether key names a warm machine.
func ValidWarmKey(key string) bool { return warmKeyPattern.MatchString(key) }

// ValidMachineKey reports whether key, what follows ManagedPrefix in a
// managed domain's name, names a machine of the worker: a job id (the
// machine of that job) or a warm machine's key.
func ValidMachineKey(key string) bool { return ValidJobID(key) || ValidWarmKey(key) }

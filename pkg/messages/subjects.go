package messages

import "strings"

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
// on. Its tokens let readers filter by host, job or state on the server.
func EventSubject(host, jobID string, state State) string {
	return subjectRoot + ".evt." + host + "." + jobID + "." + string(state)
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

// DomainName is the libvirt domain name of the machine for jobID.
func DomainName(jobID string) string { return ManagedPrefix + jobID }

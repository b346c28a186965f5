package client

import (
	"errors"
	"strings"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Inbox prefixes of the roles a client connects in, for
// nats.CustomInboxPrefix. Replies to a connection's requests (JetStream
// API calls, acknowledged publishes, control requests) arrive on inboxes
// under its prefix, and each role may subscribe under its own prefix only,
// so that none reads another's replies (docs/security.md 2.0). They are
// not scoped to this provisioner, as one connection may drive several.
const (
	// OrchestratorInbox is the prefix of an orchestrator: worker submit
	// and worker events.
	OrchestratorInbox = "_INBOX.stretchy.orchestrator"
	// OperatorInbox is the prefix of an operator: worker hosts, drain,
	// undrain, hold, release and console. A worker answers control
	// requests only on reply subjects under it.
	OperatorInbox = "_INBOX.stretchy.operator"
)

// Role is whom a client acts for, which picks its inbox prefix and the
// NATS permissions its user needs. One connection has one prefix: an
// orchestrator that also holds machines or drains hosts connects twice,
// once per role.
type Role int

const (
	// Orchestrator submits provisions and teardowns, follows jobs,
	// replays events and reads the host registry.
	Orchestrator Role = iota
	// Operator reads the host registry and the drain requests, drains
	// and undrains hosts, and holds, releases and reads the console of a
	// job's machine (control requests, which a worker answers only to
	// OperatorInbox).
	Operator
)

// InboxPrefix returns the role's inbox prefix.
func (r Role) InboxPrefix() string {
	if r == Operator {
		return OperatorInbox
	}
	return OrchestratorInbox
}

// Permissions returns what the role's NATS user must be allowed to
// publish and subscribe to, connected with the role's inbox prefix:
// OrchestratorPermissions or OperatorPermissions.
func (r Role) Permissions() (pub, sub []string) {
	if r == Operator {
		return OperatorPermissions()
	}
	return OrchestratorPermissions()
}

func (r Role) String() string {
	if r == Operator {
		return "operator"
	}
	return "orchestrator"
}

const (
	jsAPI = "$JS.API."
)

// under is the subscribe permission of an inbox prefix: every inbox
// under it.
func under(prefix string) string { return prefix + ".>" }

// OrchestratorPermissions returns the subjects an orchestrator's NATS user
// must be allowed to publish to and to subscribe to for every call of an
// Orchestrator client: Submit (shared, by image or pinned to any host,
// CheckCarriers and sealing included), Job.Teardown (its host found from
// the job's events), Job.Follow, Job.Wait, Job.Status, Events and Hosts,
// connected with the inbox prefix OrchestratorInbox. It cannot create the
// streams (docs/security.md 2.2). The tests of internal/bus run these
// calls as a user holding exactly these subjects, and without each.
func OrchestratorPermissions() (pub, sub []string) {
	evt, hosts := messages.EventsStream, messages.HostsBucket
	pub = []string{
		messages.RequestSubjects, // Submit, Job.Teardown
		// Hosts: the hosts' images and the keys to seal secrets to.
		jsAPI + "STREAM.INFO.KV_" + hosts,
		jsAPI + "DIRECT.GET.KV_" + hosts + ".$KV." + hosts + ".>",
		// Events, and a job's history: an ordered consumer with a
		// generated name and one filter under the event subjects.
		jsAPI + "CONSUMER.CREATE." + evt + ".*." + messages.EventSubjects,
		jsAPI + "CONSUMER.INFO." + evt + ".*",
		jsAPI + "CONSUMER.MSG.NEXT." + evt + ".*",
		// An ordered consumer that resets (after a reconnect or a missed
		// heartbeat) deletes its previous consumer.
		jsAPI + "CONSUMER.DELETE." + evt + ".*",
	}
	return pub, []string{under(OrchestratorInbox)}
}

// OperatorPermissions returns the subjects an operator's NATS user needs
// for every call of an Operator client: Hosts (the host registry), Drains,
// Drain and Undrain (drain requests of any host), and Job.Hold,
// Job.Release and Job.Console (the job's history, which names its host,
// then a control request to that host's worker), connected with the inbox
// prefix OperatorInbox. They read and write nothing else.
func OperatorPermissions() (pub, sub []string) {
	hosts, drains, evt := messages.HostsBucket, messages.DrainsBucket, messages.EventsStream
	return []string{
		// The job's history, read to its end (no follow, so no reset).
		jsAPI + "CONSUMER.CREATE." + evt + ".*." + messages.EventSubjects,
		jsAPI + "CONSUMER.INFO." + evt + ".*",
		jsAPI + "CONSUMER.MSG.NEXT." + evt + ".*",
		messages.ControlSubjects,
		jsAPI + "STREAM.INFO.KV_" + hosts,
		jsAPI + "DIRECT.GET.KV_" + hosts + ".$KV." + hosts + ".>",
		jsAPI + "STREAM.INFO.KV_" + drains,
		jsAPI + "DIRECT.GET.KV_" + drains + ".$KV." + drains + ".>",
		"$KV." + drains + ".>",
	}, []string{under(OperatorInbox)}
}

// CheckInboxPrefix says what makes p no inbox prefix: a connection's
// inboxes are p, a dot and more tokens, and its NATS user's permission to
// subscribe to them is p.>, so p is one or more literal tokens.
func CheckInboxPrefix(p string) error {
	switch {
	case p == "":
		return errors.New("empty")
	case strings.ContainsAny(p, " \t\r\n"):
		return errors.New("white space in a subject")
	case strings.ContainsAny(p, "*>"):
		return errors.New("a wildcard (* or >) in a prefix of literal subjects")
	case strings.HasSuffix(p, "."):
		return errors.New("a trailing dot: the prefix is tokens without their separator, such as " + OperatorInbox)
	case strings.HasPrefix(p, ".") || strings.Contains(p, ".."):
		return errors.New("an empty token")
	}
	return nil
}

package bus

import "github.com/stretchy-ci/libvirt-worker/pkg/messages"

// The subjects below are the JetStream API and acknowledgement subjects
// that the calls of this package make, for NATS users with least
// privilege. docs/security.md explains each; permissions_test.go runs the
// real calls as a user holding exactly these and, one subject removed at a
// time, checks that the server refuses something.

const (
	jsAPI = "$JS.API."
	jsAck = "$JS.ACK."
)

// Each role has an inbox prefix of its own (docs/security.md 2.0): the
// worker's is WorkerInbox; the orchestrator's and the operator's, with
// their permissions, are pkg/client's (client.OrchestratorInbox,
// client.OperatorPermissions, ...), as the calls they cover are.

// WorkerInbox returns the inbox prefix of the worker of host (and of
// worker doctor checking that host). Host ids name this provisioner's
// hosts only, so the provisioner's id is part of it.
func WorkerInbox(host string) string {
	return "_INBOX.stretchy." + messages.ProvisionerID + ".worker." + host
}

// under is the subscribe permission of an inbox prefix: every inbox
// under it.
func under(prefix string) string { return prefix + ".>" }

// maxDeliveries is where the server announces that a consumer of the
// request stream gave up on a message; the worker takes these advisories
// (internal/worker/advisory.go) to report the job and delete the message.
const maxDeliveries = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + messages.RequestsStream + ".>"

// WorkerPermissions returns the subjects the worker of host must be allowed
// to publish to and to subscribe to, and no more, connected with the inbox
// prefix WorkerInbox(host). They cover bus.Ensure
// (both streams, the host's consumers), the image consumers, pulls from
// those consumers, every kind of acknowledgement, forwarding shared
// requests to image subjects, publishing the host's events,
// Publisher.LastEvent and Publisher.Recent, ending requests that reached
// max deliveries, the job claims, the fleet's buckets and the arrivals of
// provisions.
func WorkerPermissions(host string) (pub, sub []string) {
	req, evt := messages.RequestsStream, messages.EventsStream
	pub = []string{
		// Ensure: CreateOrUpdateStream tries an update first, then a create.
		jsAPI + "STREAM.UPDATE." + req,
		jsAPI + "STREAM.CREATE." + req,
		jsAPI + "STREAM.UPDATE." + evt,
		jsAPI + "STREAM.CREATE." + evt,
	}
	for _, c := range []struct{ name, filter string }{
		{SharedProvisionConsumer, messages.ProvisionSubject()},
		{HostProvisionConsumer(host), messages.HostProvisionSubject(host)},
		{HostTeardownConsumer(host), messages.TeardownSubject(host)},
	} {
		pub = append(pub, jsAPI+"CONSUMER.CREATE."+req+"."+c.name+"."+c.filter) // Ensure
	}
	pub = append(pub,
		// EnsureImageConsumer: the consumers of the images the host finds,
		// whose names are not known in advance.
		jsAPI+"CONSUMER.CREATE."+req+".*."+messages.ImageProvisionSubjects,
		// Fetch from the host's consumers and from any image's; for the
		// same reason the pull and acknowledgement subjects cannot name
		// the consumers (docs/security.md 2.4).
		jsAPI+"CONSUMER.MSG.NEXT."+req+".*",
		jsAck+req+".>",                  // ack, nak, term, in progress
		jsAPI+"CONSUMER.INFO."+req+".*", // requests waiting per consumer (metrics)
		messages.ImageProvisionSubjects, // Forward: a shared request to its image's subject
	)
	pub = append(pub,
		messages.EventFilter(host, "", ""), // Publisher.Append: this host's events only
		jsAPI+"STREAM.INFO."+evt,           // Ensure reads the configuration; LastEvent and Append look the stream up
		jsAPI+"STREAM.MSG.GET."+evt,        // LastEvent; Append reads the job's newest event after a refused publish
		// Recent: an ordered consumer over this host's events.
		jsAPI+"CONSUMER.CREATE."+evt+".*."+messages.EventFilter(host, "", ""),
		jsAPI+"CONSUMER.INFO."+evt+".*",
		jsAPI+"CONSUMER.MSG.NEXT."+evt+".*",
		// A max-deliveries advisory: read the request it names, delete it.
		jsAPI+"STREAM.INFO."+req,
		jsAPI+"STREAM.MSG.GET."+req,
		jsAPI+"STREAM.MSG.DELETE."+req,
	)
	// Claims (claims.go): OpenClaims reads the account's limits and
	// creates or updates the bucket's stream; Take, Keep and Release
	// write keys with compare-and-set; reading a claim is a direct get.
	kvStream := "KV_" + messages.ClaimsBucket
	kvKeys := "$KV." + messages.ClaimsBucket + "."
	pub = append(pub,
		jsAPI+"INFO",
		jsAPI+"STREAM.UPDATE."+kvStream,
		jsAPI+"STREAM.CREATE."+kvStream,
		kvKeys+">",
		jsAPI+"DIRECT.GET."+kvStream+"."+kvKeys+">",
	)
	// The fleet's buckets (fleet.go): OpenFleet looks each bucket up and
	// creates or updates it; the host writes its own record and, on
	// SIGUSR1, its own drain request, reads the others' records (keys from
	// the stream's state, values by direct get) and its drain request, and
	// records the shared requests it tried.
	hosts, drains, tried := messages.HostsBucket, messages.DrainsBucket, messages.TriedBucket
	for _, b := range []string{hosts, drains, tried} {
		pub = append(pub,
			jsAPI+"STREAM.INFO.KV_"+b,
			jsAPI+"STREAM.UPDATE.KV_"+b,
			jsAPI+"STREAM.CREATE.KV_"+b,
		)
	}
	pub = append(pub,
		"$KV."+hosts+"."+host,
		jsAPI+"DIRECT.GET.KV_"+hosts+".$KV."+hosts+".>",
		"$KV."+drains+"."+host,
		jsAPI+"DIRECT.GET.KV_"+drains+".$KV."+drains+"."+host,
		"$KV."+tried+".>",
		jsAPI+"DIRECT.GET.KV_"+tried+".$KV."+tried+".>",
	)
	// Control requests to this host (internal/worker/control.go), which
	// it answers under the server's allow_responses (docs/security.md).
	// Arrivals (arrivals.go): publishes of provisions, which wake the
	// pull loop.
	sub = append([]string{under(WorkerInbox(host)), maxDeliveries, messages.ControlSubject(host)}, ArrivalSubjects(host)...)
	return pub, sub
}

// StreamPermissions returns the subjects needed to create or update both
// streams with CreateOrUpdateStream, for an orchestrator that creates them
// before any worker runs (workers hold these already), beside
// client.OrchestratorPermissions.
func StreamPermissions() (pub []string) {
	for _, s := range []string{messages.RequestsStream, messages.EventsStream} {
		pub = append(pub, jsAPI+"STREAM.UPDATE."+s, jsAPI+"STREAM.CREATE."+s)
	}
	return pub
}

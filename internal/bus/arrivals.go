package bus

import (
	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// ArrivalSubjects are the provision subjects whose publishes a worker of
// host watches on core NATS: its pinned requests, shared ones and every
// image's. A publish there tells the pull loop which consumer has a new
// request at once, instead of when its next long poll comes round.
func ArrivalSubjects(host string) []string {
	return []string{messages.HostProvisionSubject(host), messages.ProvisionSubject(), messages.ImageProvisionSubjects}
}

// WatchArrivals calls notify with the subject of each request published
// to ArrivalSubjects(host), from the connection's delivery goroutine
// (notify must not block), until stop. A notification is only a hint: the
// request is taken from its consumer like any other, by whichever worker
// pulls it first.
func WatchArrivals(nc *nats.Conn, host string, notify func(subject string)) (stop func(), err error) {
	var subs []*nats.Subscription
	stop = func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
	}
	for _, subject := range ArrivalSubjects(host) {
		s, err := nc.Subscribe(subject, func(m *nats.Msg) { notify(m.Subject) })
		if err != nil {
			stop()
			return nil, err
		}
		subs = append(subs, s)
	}
	// The server refuses a subscription without permission
	// asynchronously (the connection's error handler reports it); the
	// worker then finds its requests by its periodic pulls alone.
	if err := nc.Flush(); err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}

package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Control requests (docs/protocol.md 2.9): an operator holds or releases
// a job's machine, or reads its console, with a core NATS request to the
// host's control subject, which the worker answers at once (a release
// once the machine is gone).

// controlTimeout bounds the handling of one control request: a release
// waits for a slot and a removal.
const controlTimeout = 2 * time.Minute

// serveControl answers the host's control requests until ctx ends; it
// needs the NATS connection and a host id (Config.Fleet).
func (w *Worker) serveControl(ctx context.Context) {
	nc := w.cfg.NATS
	if nc == nil || w.fl == nil {
		return
	}
	host := w.fl.cfg.Host
	reqs := make(chan *nats.Msg, 64)
	sub, err := nc.ChanSubscribe(messages.ControlSubject(host), reqs)
	if err != nil {
		w.fl.tell(Change{Kind: "error", Err: fmt.Errorf("subscribe to control requests: %w", err)})
		return
	}
	defer func() { _ = sub.Unsubscribe() }()
	var handlers conc.WaitGroup
	defer handlers.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case msg := <-reqs:
			handlers.Go(func() { w.answerControl(ctx, msg) })
		}
	}
}

// DefaultReplyPrefixes are the subjects under which control requests are
// answered: nats.go's default inbox prefix.
var DefaultReplyPrefixes = []string{nats.InboxPrefix}

// answerControl handles one control request and replies, unless its reply
// subject is not an inbox: the worker may publish where its sender may
// not (the claims bucket, the event subjects), so a request that asks for
// a reply anywhere else is refused, and nothing of it is done.
func (w *Worker) answerControl(ctx context.Context, msg *nats.Msg) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	reply := messages.ControlReply{V: messages.SchemaVersion, Host: w.fl.cfg.Host}
	c, err := messages.DecodeControl(msg.Data)
	answer := msg.Reply != ""
	if answer && !isInbox(msg.Reply, w.replyPrefixes()) {
		answer = false
		err = fmt.Errorf("reply subject %q is not an inbox (%s): not answered", msg.Reply, strings.Join(w.replyPrefixes(), ", "))
	}
	if err == nil {
		err = c.Validate()
	}
	if err == nil {
		err = w.control(ctx, c, &reply)
	}
	reply.OK = err == nil
	if err != nil {
		reply.Error = err.Error()
	}
	if answer {
		if data, merr := messages.Marshal(reply); merr == nil {
			_ = msg.Respond(data)
		}
	}
	if w.cfg.OnControl != nil {
		w.cfg.OnControl(c, err)
	}
}

func (w *Worker) replyPrefixes() []string {
	if len(w.cfg.ReplyPrefixes) > 0 {
		return w.cfg.ReplyPrefixes
	}
	return DefaultReplyPrefixes
}

// isInbox reports whether subject is a literal subject under one of the
// inbox prefixes: no wildcard, no empty token, nothing but the prefix.
func isInbox(subject string, prefixes []string) bool {
	if strings.ContainsAny(subject, " \t\r\n") {
		return false
	}
	for _, p := range prefixes {
		rest, ok := strings.CutPrefix(subject, p)
		if !ok || rest == "" {
			continue
		}
		for _, tok := range strings.Split(rest, ".") {
			if tok == "" || tok == "*" || tok == ">" {
				return false
			}
		}
		return true
	}
	return false
}

func (w *Worker) control(ctx context.Context, c messages.Control, reply *messages.ControlReply) error {
	var info lifecycle.HoldInfo
	var err error
	switch c.Op {
	case messages.ControlHold:
		info, err = w.life.Hold(ctx, c.JobID, time.Duration(c.ForS)*time.Second)
	case messages.ControlRelease:
		// Removing a held machine is an operation: it takes a slot, as a
		// teardown does.
		if !w.inSlot(ctx, teardownFirst, func() { info, err = w.life.Release(ctx, c.JobID) }) {
			err = errors.Join(ctx.Err(), errors.New("no operation slot came free"))
		}
	case messages.ControlConsole:
		n := c.Bytes
		if n <= 0 || n > messages.MaxControlConsoleBytes {
			n = messages.MaxControlConsoleBytes
		}
		reply.Console, reply.ConsoleWithheld, err = w.life.Console(ctx, c.JobID, n)
		return err
	}
	reply.Phase = info.Phase.String()
	if !info.HeldUntil.IsZero() {
		reply.HeldUntil = info.HeldUntil.UTC()
	}
	reply.HoldForS = int64(info.HoldFor / time.Second)
	return err
}

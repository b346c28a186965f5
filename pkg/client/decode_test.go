package client

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// corpus is every golden and malformed message of pkg/messages: events,
// other messages and the 180 bad requests.
func corpus(tb testing.TB) [][]byte {
	tb.Helper()
	var out [][]byte
	for _, pattern := range []string{"*.msgpack", "bad/*.msgpack"} {
		files, err := filepath.Glob(filepath.Join("..", "..", "pkg", "messages", "testdata", pattern))
		if err != nil {
			tb.Fatal(err)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				tb.Fatal(err)
			}
			out = append(out, b)
		}
	}
	if len(out) < 100 {
		tb.Fatalf("only %d corpus files", len(out))
	}
	return out
}

// sameAsDecodeEvent fails unless d decodes data as messages.DecodeEvent
// does: the same event, and the same error or none.
func sameAsDecodeEvent(tb testing.TB, d *eventDecoder, data []byte) {
	tb.Helper()
	want, werr := messages.DecodeEvent(data)
	got, gerr := d.decode(data)
	if fmt.Sprint(gerr) != fmt.Sprint(werr) {
		tb.Fatalf("decode(%x): error %v, DecodeEvent's %v", data, gerr, werr)
	}
	if !reflect.DeepEqual(got, want) {
		tb.Fatalf("decode(%x) = %+v, DecodeEvent = %+v", data, got, want)
	}
}

// TestEventDecoderDecodesAsDecodeEvent: over the whole corpus, one decoder
// after the other, the decoder of a replay gives what DecodeEvent gives,
// also after inputs it refused.
func TestEventDecoderDecodesAsDecodeEvent(t *testing.T) {
	d := newEventDecoder()
	for _, data := range corpus(t) {
		sameAsDecodeEvent(t, d, data)
	}
}

// FuzzEventDecoder: for any payload, between two real events, the replay's
// decoder returns what DecodeEvent returns.
func FuzzEventDecoder(f *testing.F) {
	all := corpus(f)
	for _, data := range all {
		f.Add(data)
	}
	event, err := os.ReadFile(filepath.Join("..", "..", "pkg", "messages", "testdata", "event_runner_exited_v1.msgpack"))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d := newEventDecoder()
		sameAsDecodeEvent(t, d, event)
		sameAsDecodeEvent(t, d, data)
		sameAsDecodeEvent(t, d, event)
	})
}

func TestAckSequences(t *testing.T) {
	tests := []struct {
		name         string
		reply        string
		seq, pending uint64
		ok           bool
	}{
		{"v1", "$JS.ACK.STRETCHY_LIBVIRT_EVENTS.ordered_x.1.42.7.1700000000000000000.99", 42, 99, true},
		{"nothing pending", "$JS.ACK.S.c.3.18446744073709551615.1.1.0", 18446744073709551615, 0, true},
		{"v2 with domain and account", "$JS.ACK.dom.ACCHASH.S.c.1.42.7.1700000000000000000.99.rnd", 0, 0, false},
		{"too few tokens", "$JS.ACK.S.c.1.42.7.17", 0, 0, false},
		{"not a number", "$JS.ACK.S.c.1.4x.7.17.99", 0, 0, false},
		{"negative", "$JS.ACK.S.c.1.-4.7.17.99", 0, 0, false},
		{"overflow", "$JS.ACK.S.c.1.18446744073709551616.7.17.99", 0, 0, false},
		{"empty token", "$JS.ACK.S.c.1..7.17.99", 0, 0, false},
		{"not an ack subject", "_INBOX.abc", 0, 0, false},
		{"empty", "", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seq, pending, ok := ackSequences(tt.reply)
			if seq != tt.seq || pending != tt.pending || ok != tt.ok {
				t.Fatalf("ackSequences(%q) = %d, %d, %v; want %d, %d, %v", tt.reply, seq, pending, ok, tt.seq, tt.pending, tt.ok)
			}
		})
	}
}

// TestAckSequencesAgreeWithMetadata: for every message a replay gets from
// the server, the reply subject gives the stream sequence and pending
// count that the client library's Metadata gives.
func TestAckSequencesAgreeWithMetadata(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "meta", 300)
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, messages.EventsStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{messages.EventFilter("h1", "", "")},
	})
	if err != nil {
		t.Fatal(err)
	}
	it, err := cons.Messages()
	if err != nil {
		t.Fatal(err)
	}
	defer it.Stop()
	for n := 0; ; n++ {
		msg, err := it.Next()
		if err != nil {
			t.Fatal(err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		seq, pending, ok := ackSequences(msg.Reply())
		if !ok || seq != meta.Sequence.Stream || pending != meta.NumPending {
			t.Fatalf("ackSequences(%q) = %d, %d, %v; Metadata says %d, %d", msg.Reply(), seq, pending, ok, meta.Sequence.Stream, meta.NumPending)
		}
		if pending == 0 {
			if n+1 != 80 {
				t.Fatalf("%d events of host h1, want 80", n+1)
			}
			return
		}
	}
}

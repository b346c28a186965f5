package client

import (
	"bytes"
	"strings"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// eventDecoder decodes the events of one replay with one msgpack decoder,
// which a replay of many events would otherwise make (with its reader and
// buffers, and the event itself on the heap) once per event.
//
// It decides nothing about the wire format: a payload that is not plainly
// a msgpack map within messages.MaxMessageSize, or that the decoder
// refuses (or panics on), is decoded again by messages.DecodeEvent, whose
// result and error are returned. So it returns what DecodeEvent returns,
// for every input (FuzzEventDecoder).
type eventDecoder struct {
	r   bytes.Reader
	dec *msgpack.Decoder
	ev  messages.Event
}

func newEventDecoder() *eventDecoder {
	d := &eventDecoder{}
	d.dec = msgpack.NewDecoder(&d.r)
	return d
}

// decode decodes data as messages.DecodeEvent does.
func (d *eventDecoder) decode(data []byte) (messages.Event, error) {
	if len(data) == 0 || len(data) > messages.MaxMessageSize || !mapHeader(data[0]) || !d.fast(data) {
		return messages.DecodeEvent(data)
	}
	return d.ev, nil
}

// fast decodes data into d.ev, reporting false for anything the decoder
// refuses or panics on.
func (d *eventDecoder) fast(data []byte) (ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	d.r.Reset(data)
	d.dec.Reset(&d.r)
	d.ev = messages.Event{}
	return d.dec.Decode(&d.ev) == nil
}

// mapHeader reports whether b starts a msgpack map: fixmap, map16 or
// map32.
func mapHeader(b byte) bool { return b&0xf0 == 0x80 || b == 0xde || b == 0xdf }

// ackSequences reads a JetStream message's stream sequence and the number
// of messages pending after it from its reply subject, in the layout
// $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
// seq>.<time>.<pending>, without the allocations of Msg.Metadata. ok is
// false for any other layout (the one with a domain and account hash,
// say), which the caller reads with Msg.Metadata instead.
func ackSequences(reply string) (streamSeq, pending uint64, ok bool) {
	const prefix = "$JS.ACK."
	if len(reply) <= len(prefix) || reply[:len(prefix)] != prefix {
		return 0, 0, false
	}
	// The seven tokens after the prefix; the last one has no dot after it.
	var tok [7]string
	rest := reply[len(prefix):]
	for i := range len(tok) - 1 {
		dot := strings.IndexByte(rest, '.')
		if dot < 0 {
			return 0, 0, false
		}
		tok[i], rest = rest[:dot], rest[dot+1:]
	}
	if strings.IndexByte(rest, '.') >= 0 {
		return 0, 0, false
	}
	tok[6] = rest
	streamSeq, ok1 := parseUint(tok[3])
	pending, ok2 := parseUint(tok[6])
	if !ok1 || !ok2 {
		return 0, 0, false
	}
	return streamSeq, pending, true
}

// parseUint parses a decimal without sign, as JetStream writes sequences.
func parseUint(s string) (uint64, bool) {
	if s == "" || len(s) > 20 {
		return 0, false
	}
	var n uint64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (^uint64(0)-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

package messages

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// ErrTooLarge is returned for payloads above MaxMessageSize.
var ErrTooLarge = errors.New("message too large")

// ErrMalformed is returned for payloads that are not a msgpack map of the
// expected shape.
var ErrMalformed = errors.New("malformed message")

// Marshal encodes v (a Provision, Teardown or Event) as msgpack.
func Marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	return buf.Bytes(), nil
}

// isMap reports whether b starts a msgpack map (fixmap, map16 or map32).
func isMap(b []byte) bool {
	return len(b) > 0 && (b[0]&0xf0 == 0x80 || b[0] == 0xde || b[0] == 0xdf)
}

func unmarshal(data []byte, v any) (err error) {
	if len(data) > MaxMessageSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), MaxMessageSize)
	}
	if !isMap(data) {
		return fmt.Errorf("%w: not a msgpack map", ErrMalformed)
	}
	// The decoder panics on some hostile inputs (nil for a timestamp);
	// a payload from the network must never take the worker down.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: a field holds a value of the wrong type (nil for a timestamp?)", ErrMalformed)
		}
	}()
	dec := msgpack.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return nil
}

// DecodeProvision decodes a provision request; it does not validate it.
func DecodeProvision(data []byte) (Provision, error) {
	var p Provision
	err := unmarshal(data, &p)
	return p, err
}

// DecodeTeardown decodes a teardown request; it does not validate it.
func DecodeTeardown(data []byte) (Teardown, error) {
	var t Teardown
	err := unmarshal(data, &t)
	return t, err
}

// DecodeEvent decodes an event.
func DecodeEvent(data []byte) (Event, error) {
	var e Event
	err := unmarshal(data, &e)
	return e, err
}

// DecodeClaim decodes the value of a key in ClaimsBucket.
func DecodeClaim(data []byte) (Claim, error) {
	var c Claim
	err := unmarshal(data, &c)
	return c, err
}

// DecodeSealedPayload decodes what a SealedSecret's box holds.
func DecodeSealedPayload(data []byte) (SealedPayload, error) {
	var p SealedPayload
	err := unmarshal(data, &p)
	return p, err
}

// PeekJobID returns the job id of a payload that may not decode as a whole,
// so that a failure can still be reported for the right job. It returns ""
// when no valid job id can be read.
func PeekJobID(data []byte) string {
	if len(data) > MaxMessageSize {
		return ""
	}
	// A struct, not a map: a hostile map header must not size an
	// allocation.
	var m struct {
		JobID string `msgpack:"job_id"`
	}
	if err := unmarshal(data, &m); err != nil || !ValidJobID(m.JobID) {
		return ""
	}
	return m.JobID
}

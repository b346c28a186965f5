package messages

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to every decoder and validator of this
// package: none may panic, and whatever decodes and validates must
// survive a round trip.
func FuzzDecode(f *testing.F) {
	fixtures, _ := filepath.Glob(filepath.Join("testdata", "*.msgpack"))
	for _, path := range fixtures {
		if data, err := os.ReadFile(path); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte{0x80})
	f.Add([]byte{0x81, 0xac, 'r', 'e', 'q', 'u', 'e', 's', 't', 'e', 'd', '_', 'a', 't', 0xc0})
	f.Fuzz(func(t *testing.T, data []byte) {
		_ = PeekJobID(data)
		if p, err := DecodeProvision(data); err == nil && p.ValidateEnvelope() == nil {
			again, err := Marshal(&p)
			if err != nil {
				t.Fatal(err)
			}
			q, err := DecodeProvision(again)
			if err != nil || q.ValidateEnvelope() != nil || q.JobID != p.JobID || q.Image != p.Image {
				t.Fatalf("round trip changed a valid provision: %v", err)
			}
		}
		if td, err := DecodeTeardown(data); err == nil {
			_ = td.Validate()
		}
		if ev, err := DecodeEvent(data); err == nil {
			_ = ev.Validate()
		}
	})
}

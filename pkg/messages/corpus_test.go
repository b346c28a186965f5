package messages

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// The bad-input corpus: one file per hostile or broken request payload, as
// published, under testdata/bad/, and a manifest saying what the worker must
// make of each (docs/protocol.md 1, 3 and 5.2 G). TestBadCorpus regenerates
// it with -update and checks it at the decoder level and against
// Provision.ValidateEnvelope and Teardown.Validate; TestValidateBadCorpus
// of pkg/runners checks the whole validation of every provision, runner
// sections included, which this package cannot; the integration test
// TestBadInputCorpus publishes every file to a real worker.

const (
	corpusDir      = "testdata/bad"
	corpusManifest = "manifest.json"
	// corpusSecret is planted in the secret fields of the corpus; no error
	// message or event may repeat it.
	corpusSecret = "CORPUS-SECRET-4f1d2c"
	// corpusImage names no domain on any host; a provision that passes
	// validation by mistake then fails with image_not_found instead of
	// booting a machine.
	corpusImage = "corpus-no-such-image"
	// corpusInvalidImage is the image of the image_invalid case: the
	// integration test defines a domain of this name whose disk is no
	// storage volume.
	corpusInvalidImage = "corpus-image-invalid"
)

var corpusTime = time.Date(2026, 11, 27, 5, 0, 0, 0, time.UTC)

// maxDecodeAlloc bounds what decoding one corpus payload may allocate.
const maxDecodeAlloc = 32 << 20

// CorpusEntry is one line of the manifest.
type CorpusEntry struct {
	File string `json:"file"`
	// Subject is "provision" (publish to ProvisionSubject) or "teardown"
	// (publish to TeardownSubject of the worker's host).
	Subject string `json:"subject"`
	// Code is the error code the worker settles the message with (its term
	// reason) and, when FailedEvent is set, the code of the failed event.
	Code ErrorCode `json:"code"`
	// JobID is the job id the worker can read from the payload, "" if none.
	JobID string `json:"job_id,omitempty"`
	// FailedEvent is set when a failed event is expected: only for a
	// provision with a readable, valid job id (5.2 G).
	FailedEvent bool `json:"failed_event"`
	// Events are the states of every event expected for JobID, in order.
	Events []State `json:"events,omitempty"`
	// PublishRefused is set for payloads over MaxMessageSize: the request
	// stream's max_msg_size refuses them at publish time, so only the
	// decoder sees them.
	PublishRefused bool `json:"publish_refused,omitempty"`
	// Requires names what the host must have for Code to come out.
	Requires string `json:"requires,omitempty"`
	Note     string `json:"note"`
}

// CorpusManifest is testdata/bad/manifest.json.
type CorpusManifest struct {
	About   string        `json:"about"`
	Entries []CorpusEntry `json:"entries"`
}

// om is a msgpack map that keeps its keys in the order given and may repeat
// one, so that every payload is the same bytes on every run.
type om []any

func (m om) EncodeMsgpack(enc *msgpack.Encoder) error {
	if err := enc.EncodeMapLen(len(m) / 2); err != nil {
		return err
	}
	for i := 0; i+1 < len(m); i += 2 {
		if err := enc.Encode(m[i]); err != nil {
			return err
		}
		if err := enc.Encode(m[i+1]); err != nil {
			return err
		}
	}
	return nil
}

// with returns a copy of m with key set to v (appended if absent).
func (m om) with(key string, v any) om {
	c := slices.Clone(m)
	for i := 0; i+1 < len(c); i += 2 {
		if c[i] == key {
			c[i+1] = v
			return c
		}
	}
	return append(c, key, v)
}

// without returns a copy of m without key.
func (m om) without(key string) om {
	var c om
	for i := 0; i+1 < len(m); i += 2 {
		if m[i] != key {
			c = append(c, m[i], m[i+1])
		}
	}
	return c
}

// raw is an already encoded msgpack value.
type raw = msgpack.RawMessage

func encode(v any) []byte {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	enc.SetSortMapKeys(true)
	if err := enc.Encode(v); err != nil {
		panic(fmt.Sprintf("encode corpus value %#v: %v", v, err))
	}
	return buf.Bytes()
}

func forgejoRunner() om {
	return om{"kind", "forgejo", "forgejo", forgejoSection()}
}

func forgejoSection() om {
	return om{"url", "https://code.example.org/", "uuid", "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
		"token", corpusSecret, "labels", []string{"debian-12", "x86_64"}}
}

func githubRunner() om {
	return om{"kind", "github", "github", om{"jit_config", corpusSecret}}
}

func jenkinsSection() om {
	return om{"url", "https://jenkins.example.org/", "agent_name", "agent-1", "secret", corpusSecret}
}

func jenkinsRunner() om {
	return om{"kind", "jenkins", "jenkins", jenkinsSection()}
}

func noneRunner() om { return om{"kind", "none"} }

// prov is a provision that is valid but for its image, which no host has.
func prov(id string, runner om) om {
	return om{"v", 1, "job_id", id, "image", corpusImage, "runner", runner,
		"boot_timeout_s", 60, "max_lifetime_s", 600, "requested_at", corpusTime}
}

func teardown(id string) om {
	return om{"v", 1, "job_id", id, "reason", "corpus", "requested_at", corpusTime}
}

// withForgejo replaces a field of the forgejo section.
func withForgejo(key string, v any) om {
	return om{"kind", "forgejo", "forgejo", forgejoSection().with(key, v)}
}

// sealedEnvelope is a runner.sealed section with a box of n zero bytes.
func sealedEnvelope(keyID string, n int) om {
	return om{"key_id", keyID, "box", make([]byte, n)}
}

func withJenkins(key string, v any) om {
	return om{"kind", "jenkins", "jenkins", jenkinsSection().with(key, v)}
}

// timestamp96 encodes an instant as the 12-byte timestamp extension.
func timestamp96(sec int64, nsec uint32) raw {
	b := []byte{0xc7, 12, 0xff}
	b = binary.BigEndian.AppendUint32(b, nsec)
	return binary.BigEndian.AppendUint64(b, uint64(sec))
}

// padTo grows a provision with an unknown field until it encodes to
// exactly n bytes.
func padTo(m om, n int) []byte {
	pad := n - len(encode(m))
	for range 4 {
		out := encode(m.with("padding", strings.Repeat("p", pad)))
		if len(out) == n {
			return out
		}
		pad -= len(out) - n
	}
	panic(fmt.Sprintf("padTo %d: no padding fits", n))
}

// badCase is one corpus payload with what the worker must make of it.
type badCase struct {
	name     string
	teardown bool
	// data builds the payload; id is the case's own valid job id
	// (bad-NNN), which it may use or not.
	data func(id string) []byte
	code ErrorCode
	// readable says the worker can read the case's job id (bad-NNN) from
	// the payload; otherwise it can read none.
	readable bool
	requires string
	note     string
	// section says the problem is in the runner section, which
	// ValidateEnvelope does not look at: here it passes.
	section bool
}

// badCases lists the corpus in file order. Each case states its expected
// outcome by hand; TestBadCorpus checks the decoder agrees.
func badCases() []badCase {
	const (
		bad     = CodeBadMessage
		invalid = CodeInvalidRequest
		version = CodeUnsupportedVersion
	)
	p := func(name string, code ErrorCode, readable bool, note string, data func(id string) []byte) badCase {
		return badCase{name: name, data: data, code: code, readable: readable, note: note}
	}
	// r is a provision whose only problems are in its runner section.
	r := func(name, note string, data func(id string) []byte) badCase {
		return badCase{name: name, data: data, code: invalid, readable: true, note: note, section: true}
	}
	t := func(name string, code ErrorCode, note string, data func(id string) []byte) badCase {
		return badCase{name: name, teardown: true, data: data, code: code, note: note}
	}
	bytesOf := func(b []byte) func(string) []byte { return func(string) []byte { return b } }
	provWith := func(key string, v any) func(string) []byte {
		return func(id string) []byte { return encode(prov(id, forgejoRunner()).with(key, v)) }
	}
	provRunner := func(r om) func(string) []byte {
		return func(id string) []byte { return encode(prov(id, r)) }
	}
	provJobID := func(jobID string) func(string) []byte {
		return func(string) []byte { return encode(prov(jobID, noneRunner())) }
	}
	tdJobID := func(jobID any) func(string) []byte {
		return func(string) []byte { return encode(teardown("x").with("job_id", jobID)) }
	}
	tdWith := func(key string, v any) func(string) []byte {
		return func(id string) []byte { return encode(teardown(id).with(key, v)) }
	}
	truncated := func(cut func(n int) int) func(string) []byte {
		return func(id string) []byte {
			b := encode(prov(id, forgejoRunner()))
			return b[:cut(len(b))]
		}
	}
	rnd := rand.New(rand.NewPCG(20261127, 5))
	random := func(n int, first byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.UintN(256))
		}
		b[0] = first
		return b
	}
	// A map whose first entry is a valid job id, then a header claiming
	// far more entries or bytes than follow.
	jobThen := func(id string, rest ...byte) []byte {
		b := append([]byte{0x82}, encode("job_id")...)
		b = append(b, encode(id)...)
		b = append(b, encode("runner")...)
		return append(b, rest...)
	}

	cases := []badCase{
		// Bytes that are no msgpack map at all.
		p("empty", bad, false, "zero bytes", bytesOf([]byte{})),
		p("never-used-byte", bad, false, "0xc1 is never used in msgpack", bytesOf([]byte{0xc1})),
		p("plain-text", bad, false, "text, not msgpack", bytesOf([]byte("hello, world"))),
		p("json", bad, false, "the provision as JSON, not msgpack", func(id string) []byte {
			return []byte(`{"v":1,"job_id":"` + id + `","image":"debian-12","runner":{"kind":"none"},"requested_at":"2026-11-27T05:00:00Z"}`)
		}),
		p("nil", bad, false, "msgpack nil", bytesOf([]byte{0xc0})),
		p("true", bad, false, "msgpack true", bytesOf([]byte{0xc3})),
		p("integer", bad, false, "msgpack integer 1", bytesOf([]byte{0x01})),
		p("string", bad, false, "a msgpack string", func(id string) []byte { return encode(id) }),
		p("array-of-fields", bad, false, "the fields as an array in declaration order (msgpack struct-as-array)", func(id string) []byte {
			return encode([]any{1, id, corpusImage, noneRunner(), 60, 600, corpusTime})
		}),
		p("array-of-pairs", bad, false, "an array of key, value pairs", func(id string) []byte {
			return encode([]any{"v", 1, "job_id", id})
		}),
		p("random-256", bad, false, "seeded random bytes", bytesOf(random(256, 0xc1))),
		p("random-map-header", bad, false, "seeded random bytes after a fixmap header", bytesOf(random(512, 0x8f))),
		p("random-map16", bad, false, "seeded random bytes after a map16 header", bytesOf(random(1024, 0xde))),
		p("random-map32", bad, false, "seeded random bytes after a map32 header", bytesOf(random(4096, 0xdf))),
		p("random-fixstr-keys", bad, false, "seeded random bytes after a fixmap header and a fixstr key", bytesOf(append([]byte{0x81, 0xa1, 'v'}, random(64, 0xd9)...))),

		// Truncated.
		p("truncated-1", bad, false, "a valid-looking provision cut after its first byte", truncated(func(int) int { return 1 })),
		p("truncated-10", bad, false, "cut after 10 bytes", truncated(func(int) int { return 10 })),
		p("truncated-half", bad, false, "cut in the middle", truncated(func(n int) int { return n / 2 })),
		p("truncated-last-byte", bad, false, "cut one byte short: the map never ends, so no job id is trusted", truncated(func(n int) int { return n - 1 })),
		t("truncated-teardown", bad, "a teardown cut in the middle", func(id string) []byte {
			b := encode(teardown(id))
			return b[:len(b)/2]
		}),
		t("truncated-teardown-timestamp", bad, "a teardown cut inside its timestamp", func(id string) []byte {
			b := encode(teardown(id))
			return b[:len(b)-2]
		}),

		// Headers that claim more than follows.
		p("map32-billions", bad, false, "map32 header claiming 4294967295 entries, then one", func(id string) []byte {
			b := []byte{0xdf, 0xff, 0xff, 0xff, 0xff}
			return append(b, encode(prov(id, noneRunner()))[1:]...)
		}),
		p("map16-claims-65535", bad, false, "map16 header claiming 65535 entries, then seven", func(id string) []byte {
			b := []byte{0xde, 0xff, 0xff}
			return append(b, encode(prov(id, noneRunner()))[1:]...)
		}),
		p("runner-map32-billions", bad, false, "the runner section's map32 header claims 4294967295 entries", func(id string) []byte {
			return jobThen(id, 0xdf, 0xff, 0xff, 0xff, 0xff, 0xa4, 'k', 'i', 'n', 'd', 0xa4, 'n', 'o', 'n', 'e')
		}),
		p("labels-array32-billions", bad, false, "forgejo.labels claims 4294967295 entries", func(id string) []byte {
			b := encode(prov(id, withForgejo("labels", raw{0xdd, 0xff, 0xff, 0xff, 0xff, 0xa1, 'x'})))
			return b
		}),
		p("image-str32-4GiB", bad, false, "image claims a 4 GiB string", func(id string) []byte {
			b := append([]byte{0x82}, encode("job_id")...)
			b = append(b, encode(id)...)
			b = append(b, encode("image")...)
			return append(b, 0xdb, 0xff, 0xff, 0xff, 0xff, 'a', 'b')
		}),
		p("unknown-bin32-4GiB", bad, false, "an unknown field claims 4 GiB of binary", func(id string) []byte {
			b := append([]byte{0x82}, encode("job_id")...)
			b = append(b, encode(id)...)
			b = append(b, encode("blob")...)
			return append(b, 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00)
		}),
		p("unknown-ext32-4GiB", bad, false, "an unknown field claims a 4 GiB extension", func(id string) []byte {
			b := append([]byte{0x82}, encode("job_id")...)
			b = append(b, encode(id)...)
			b = append(b, encode("ext")...)
			return append(b, 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00)
		}),
		p("deep-nesting-unterminated", bad, false, "an unknown field of 20000 nested arrays that never ends", func(id string) []byte {
			b := append([]byte{0x82}, encode("job_id")...)
			b = append(b, encode(id)...)
			b = append(b, encode("nest")...)
			return append(b, bytes.Repeat([]byte{0x91}, 20000)...)
		}),
		p("deep-nesting-v2", version, true, "an unknown field of 20000 nested arrays (well-formed, ignored) and v=2", func(id string) []byte {
			nest := append(bytes.Repeat([]byte{0x91}, 20000), 0x01)
			return encode(prov(id, noneRunner()).with("v", 2).with("nest", raw(nest)))
		}),

		// Wrong types: undecodable, but the job id is readable.
		p("v-string", bad, true, `v is the string "1"`, provWith("v", "1")),
		p("v-float", bad, true, "v is the float 1.0", provWith("v", 1.0)),
		p("v-bool", bad, true, "v is true", provWith("v", true)),
		p("v-array", bad, true, "v is [1]", provWith("v", []int{1})),
		p("image-int", bad, true, "image is an integer", provWith("image", 42)),
		p("image-map", bad, true, "image is a map", provWith("image", om{"name", "debian-12"})),
		p("runner-array", bad, true, "runner is an array", provWith("runner", []any{"forgejo"})),
		p("runner-string", bad, true, `runner is the string "none"`, provWith("runner", "none")),
		p("runner-kind-int", bad, true, "runner.kind is an integer", provWith("runner", om{"kind", 1})),
		p("forgejo-section-array", bad, true, "runner.forgejo is an array", provRunner(om{"kind", "forgejo", "forgejo", []any{"https://code.example.org/"}})),
		p("labels-string", bad, true, "forgejo.labels is a string", provRunner(withForgejo("labels", "debian-12"))),
		p("labels-ints", bad, true, "forgejo.labels holds integers", provRunner(withForgejo("labels", []int{1, 2}))),
		p("token-int", bad, true, "forgejo.token is an integer", provRunner(withForgejo("token", 12345))),
		p("token-array", bad, true, "forgejo.token is an array holding the secret", provRunner(withForgejo("token", []string{corpusSecret}))),
		p("jit-config-map", bad, true, "github.jit_config is a map holding the secret", provRunner(om{"kind", "github", "github", om{"jit_config", om{"secret", corpusSecret}}})),
		p("boot-timeout-string", bad, true, `boot_timeout_s is the string "60"`, provWith("boot_timeout_s", "60")),
		p("boot-timeout-float", bad, true, "boot_timeout_s is 60.5", provWith("boot_timeout_s", 60.5)),
		p("max-lifetime-bool", bad, true, "max_lifetime_s is true", provWith("max_lifetime_s", true)),
		p("requested-at-nil", bad, true, "requested_at is nil (the decoder panics; the worker recovers)", provWith("requested_at", nil)),
		p("requested-at-string", bad, true, "requested_at is an RFC 3339 string", provWith("requested_at", "2026-11-27T05:00:00Z")),
		p("requested-at-int", bad, true, "requested_at is epoch seconds as an integer", provWith("requested_at", 1795755600)),
		p("requested-at-array", bad, true, "requested_at is an array", provWith("requested_at", []int{1795755600, 0})),
		p("requested-at-ext-type-5", bad, true, "requested_at is a fixext4 of type 5, not -1", provWith("requested_at", raw{0xd6, 0x05, 0x6b, 0x09, 0x0e, 0x50})),
		p("requested-at-ext-len-3", bad, true, "requested_at is a timestamp extension of 3 bytes", provWith("requested_at", raw{0xc7, 0x03, 0xff, 0x01, 0x02, 0x03})),
		p("int-keys", bad, false, "a map keyed by integers", func(id string) []byte {
			return encode(om{1, 1, 2, id})
		}),
		p("job-id-int", bad, false, "job_id is an integer", func(string) []byte { return encode(prov("x", noneRunner()).with("job_id", 42)) }),
		p("job-id-array", bad, false, "job_id is an array holding a valid id", func(id string) []byte {
			return encode(prov("x", noneRunner()).with("job_id", []string{id}))
		}),
		t("teardown-v-string", bad, `a teardown whose v is "1"`, tdWith("v", "1")),
		t("teardown-job-id-int", bad, "a teardown whose job_id is an integer", tdJobID(7)),
		t("teardown-requested-at-nil", bad, "a teardown whose requested_at is nil", tdWith("requested_at", nil)),
		t("teardown-reason-map", bad, "a teardown whose reason is a map", tdWith("reason", om{"why", "x"})),
		t("teardown-array", bad, "a teardown as an array", func(id string) []byte { return encode([]any{1, id, "corpus", corpusTime}) }),
		t("teardown-garbage", bad, "not msgpack", bytesOf([]byte{0x92, 0x01})),

		// Sizes: the limit is 65536 bytes; the request stream refuses more
		// at publish time.
		r("size-65536-exactly", "exactly 64 KiB (padded by an unknown field) is decoded; its token is one byte too long", func(id string) []byte {
			return padTo(prov(id, withForgejo("token", strings.Repeat("s", 16<<10+1))), MaxMessageSize)
		}),
		p("size-65537", bad, false, "one byte over 64 KiB: refused before decoding", func(id string) []byte {
			return padTo(prov(id, noneRunner()), MaxMessageSize+1)
		}),
		p("size-100KiB", bad, false, "100 KiB", func(id string) []byte { return padTo(prov(id, noneRunner()), 100<<10) }),
		t("teardown-size-65537", bad, "a teardown one byte over 64 KiB", func(id string) []byte {
			return padTo(teardown(id), MaxMessageSize+1)
		}),
		p("image-60KB", invalid, true, "a 60 KB image name", provWith("image", strings.Repeat("i", 60000))),
		p("job-id-60KB", invalid, false, "a 60 KB job id", provJobID(strings.Repeat("j", 60000))),
		r("labels-10000", "10000 labels", provRunner(withForgejo("labels", slices.Repeat([]string{"x"}, 10000)))),
		r("label-300-bytes", "a 300-byte label", provRunner(withForgejo("labels", []string{strings.Repeat("l", 300)}))),
		r("uuid-2000-bytes", "a 2000-byte uuid", provRunner(withForgejo("uuid", strings.Repeat("u", 2000)))),
		r("url-3000-bytes", "a 3000-byte URL", provRunner(withForgejo("url", "https://code.example.org/"+strings.Repeat("a", 3000)))),
		r("secret-16385-bytes", "a secret one byte over 16 KiB", provRunner(githubRunner().with("github", om{"jit_config", strings.Repeat("s", 16<<10+1)}))),

		// Job ids that must never reach a domain name, a file name or a
		// subject.
		p("job-id-slash", invalid, false, "job id a/b", provJobID("a/b")),
		p("job-id-dotdot", invalid, false, "job id ..", provJobID("..")),
		p("job-id-traversal", invalid, false, "job id ../../etc/passwd", provJobID("../../etc/passwd")),
		p("job-id-nul", invalid, false, "job id with NUL", provJobID("a\x00b")),
		p("job-id-xml", invalid, false, "job id <x/>", provJobID("<x/>")),
		p("job-id-xml-attr", invalid, false, `job id a'/><x`, provJobID(`a'/><x`)),
		p("job-id-entity", invalid, false, "job id &amp;", provJobID("&amp;")),
		p("job-id-cyrillic", invalid, false, "job id with a Cyrillic о", provJobID("jоb-1")),
		p("job-id-fullwidth", invalid, false, "job id in fullwidth letters", provJobID("ｊｏｂ")),
		p("job-id-zero-width", invalid, false, "job id with a zero-width space", provJobID("job\u200b1")),
		p("job-id-space", invalid, false, "job id with a space", provJobID("job 1")),
		p("job-id-leading-space", invalid, false, "job id with a leading space", provJobID(" job")),
		p("job-id-65", invalid, false, "a 65-character job id", provJobID(strings.Repeat("a", 65))),
		p("job-id-empty", invalid, false, "empty job id", provJobID("")),
		p("job-id-missing", invalid, false, "no job_id", func(string) []byte { return encode(prov("x", noneRunner()).without("job_id")) }),
		p("job-id-nil", invalid, false, "job_id nil", func(string) []byte { return encode(prov("x", noneRunner()).with("job_id", nil)) }),
		p("job-id-leading-dash", invalid, false, "job id -job", provJobID("-job")),
		p("job-id-leading-underscore", invalid, false, "job id _job", provJobID("_job")),
		p("job-id-dot", invalid, false, "job id job.1 (a subject token separator)", provJobID("job.1")),
		p("job-id-star", invalid, false, "job id * (a subject wildcard)", provJobID("*")),
		p("job-id-gt", invalid, false, "job id > (a subject wildcard)", provJobID(">")),
		p("job-id-newline", invalid, false, "job id with a newline", provJobID("job\n")),
		p("job-id-invalid-utf8", invalid, false, "job id of invalid UTF-8", provJobID("\xff\xfe")),
		p("job-id-bin", invalid, false, "job id ../x as msgpack bin", func(string) []byte {
			return encode(prov("x", noneRunner()).with("job_id", []byte("../x")))
		}),
		p("job-id-duplicate-key", version, true, "job_id twice, ../x then a valid id (the last wins), and v=2", func(id string) []byte {
			m := prov(id, noneRunner()).with("v", 2)
			return encode(append(om{"job_id", "../x"}, m...))
		}),
		t("teardown-job-id-slash", invalid, "teardown of job a/b", tdJobID("a/b")),
		t("teardown-job-id-dotdot", invalid, "teardown of job ..", tdJobID("..")),
		t("teardown-job-id-nul", invalid, "teardown of job a\\x00b", tdJobID("a\x00b")),
		t("teardown-job-id-xml", invalid, "teardown of job a'/><x", tdJobID(`a'/><x`)),
		t("teardown-job-id-cyrillic", invalid, "teardown of a job id with a Cyrillic о", tdJobID("jоb-1")),
		t("teardown-job-id-65", invalid, "teardown of a 65-character job id", tdJobID(strings.Repeat("a", 65))),
		t("teardown-job-id-empty", invalid, "teardown of the empty job id", tdJobID("")),
		t("teardown-job-id-star", invalid, "teardown of job *", tdJobID("*")),
		t("teardown-job-id-gt", invalid, "teardown of job >", tdJobID(">")),
		t("teardown-job-id-missing", invalid, "teardown without job_id", func(string) []byte { return encode(teardown("x").without("job_id")) }),
		t("teardown-v-missing", version, "teardown without v", func(id string) []byte { return encode(teardown(id).without("v")) }),
		t("teardown-v-2", version, "teardown with v=2", tdWith("v", 2)),
		t("teardown-reason-control", invalid, "teardown reason with a newline", tdWith("reason", "done\nnow")),
		t("teardown-reason-300-bytes", invalid, "teardown reason of 300 bytes", tdWith("reason", strings.Repeat("r", 300))),

		// Images.
		p("image-managed", invalid, true, "image stretchy-x: the managed prefix", provWith("image", "stretchy-x")),
		p("image-managed-clone", invalid, true, "image named like a clone of the test image", provWith("image", "stretchy-tiny-linux")),
		p("image-xml-attr", invalid, true, `image a'/><x`, provWith("image", `a'/><x`)),
		p("image-xml-element", invalid, true, "image <domain>", provWith("image", "<domain>")),
		p("image-traversal", invalid, true, "image ../tiny-linux", provWith("image", "../tiny-linux")),
		p("image-space", invalid, true, "image with a space", provWith("image", "tiny linux")),
		p("image-empty", invalid, true, "empty image", provWith("image", "")),
		p("image-missing", invalid, true, "no image", func(id string) []byte { return encode(prov(id, forgejoRunner()).without("image")) }),
		p("image-129", invalid, true, "a 129-character image name", provWith("image", strings.Repeat("i", 129))),
		p("image-nul", invalid, true, "image with NUL", provWith("image", "img\x00")),
		p("image-leading-dash", invalid, true, "image -img (an option to a tool)", provWith("image", "-img")),
		p("image-cyrillic", invalid, true, "image with a Cyrillic і", provWith("image", "tіny-linux")),

		// Runner sections.
		r("kind-unknown", "runner kind buildkite", provRunner(om{"kind", "buildkite"})),
		r("kind-missing", "runner without kind", provRunner(om{"forgejo", forgejoSection()})),
		r("kind-uppercase", "runner kind Forgejo", provRunner(om{"kind", "Forgejo", "forgejo", forgejoSection()})),
		r("runner-nil", "runner nil", provWith("runner", nil)),
		r("runner-missing", "no runner", func(id string) []byte { return encode(prov(id, noneRunner()).without("runner")) }),
		r("none-with-section", "kind none with a forgejo section", provRunner(om{"kind", "none", "forgejo", forgejoSection()})),
		r("forgejo-section-missing", "kind forgejo without its section", provRunner(om{"kind", "forgejo"})),
		r("github-section-missing", "kind github with a jenkins section instead", provRunner(om{"kind", "github", "jenkins", jenkinsSection()})),
		r("jenkins-section-missing", "kind jenkins without its section", provRunner(om{"kind", "jenkins"})),
		r("two-sections", "kind forgejo with forgejo and github sections", provRunner(om{"kind", "forgejo", "forgejo", forgejoSection(), "github", om{"jit_config", corpusSecret}})),
		r("three-sections", "kind github with all three sections", provRunner(om{"kind", "github", "forgejo", forgejoSection(), "github", om{"jit_config", corpusSecret}, "jenkins", jenkinsSection()})),
		r("url-credentials", "forgejo.url with user:secret@", provRunner(withForgejo("url", "https://user:"+corpusSecret+"@code.example.org/"))),
		r("url-token-user", "jenkins.url with secret@", provRunner(withJenkins("url", "https://"+corpusSecret+"@jenkins.example.org/"))),
		r("url-newline", "forgejo.url with a newline and a header", provRunner(withForgejo("url", "https://code.example.org/\nHost: evil.example"))),
		r("url-javascript", "forgejo.url javascript:", provRunner(withForgejo("url", "javascript:alert(1)"))),
		r("url-file", "jenkins.url file:///etc/passwd", provRunner(withJenkins("url", "file:///etc/passwd"))),
		r("url-no-host", "jenkins.url http:// without a host", provRunner(withJenkins("url", "http://"))),
		r("url-ftp", "forgejo.url ftp://", provRunner(withForgejo("url", "ftp://code.example.org/"))),
		r("url-relative", "forgejo.url /relative", provRunner(withForgejo("url", "/relative/path"))),
		r("url-space", "forgejo.url with a space", provRunner(withForgejo("url", "https://code.example.org/a b"))),
		r("url-missing", "jenkins without url", provRunner(om{"kind", "jenkins", "jenkins", jenkinsSection().without("url")})),
		r("labels-empty", "no labels", provRunner(withForgejo("labels", []string{}))),
		r("labels-65", "65 labels", provRunner(withForgejo("labels", slices.Repeat([]string{"l"}, 65)))),
		r("label-tab", "a label with a tab", provRunner(withForgejo("labels", []string{"a\tb"}))),
		r("label-padded", "a label with a leading space", provRunner(withForgejo("labels", []string{" debian"}))),
		r("label-empty", "an empty label", provRunner(withForgejo("labels", []string{""}))),
		r("token-missing", "forgejo without token", provRunner(om{"kind", "forgejo", "forgejo", forgejoSection().without("token")})),
		r("token-newline", "a token with a newline", provRunner(withForgejo("token", corpusSecret+"\n"))),
		r("uuid-missing", "forgejo without uuid", provRunner(om{"kind", "forgejo", "forgejo", forgejoSection().without("uuid")})),
		r("handle-control", "a handle with an escape character", provRunner(withForgejo("handle", "h\x1b[2J"))),
		r("jit-config-empty", "an empty github.jit_config", provRunner(om{"kind", "github", "github", om{"jit_config", ""}})),
		r("jit-config-nul", "a jit_config with NUL", provRunner(om{"kind", "github", "github", om{"jit_config", corpusSecret + "\x00"}})),
		r("agent-name-at", "jenkins.agent_name @/etc/passwd (an argument file for agent.jar)", provRunner(withJenkins("agent_name", "@/etc/passwd"))),
		r("work-dir-at", "jenkins.work_dir @args", provRunner(withJenkins("work_dir", "@args"))),
		r("agent-name-nul", "jenkins.agent_name with NUL", provRunner(withJenkins("agent_name", "a\x00b"))),
		r("jenkins-secret-missing", "jenkins without secret", provRunner(om{"kind", "jenkins", "jenkins", jenkinsSection().without("secret")})),

		// Durations and times.
		p("boot-timeout-negative", invalid, true, "boot_timeout_s -1", provWith("boot_timeout_s", -1)),
		p("boot-timeout-3601", invalid, true, "boot_timeout_s 3601", provWith("boot_timeout_s", 3601)),
		p("boot-timeout-int64-max", invalid, true, "boot_timeout_s 2^63-1", provWith("boot_timeout_s", int64(math.MaxInt64))),
		p("boot-timeout-int64-min", invalid, true, "boot_timeout_s -2^63", provWith("boot_timeout_s", int64(math.MinInt64))),
		p("max-lifetime-negative", invalid, true, "max_lifetime_s -1", provWith("max_lifetime_s", -1)),
		p("max-lifetime-604801", invalid, true, "max_lifetime_s 604801", provWith("max_lifetime_s", 604801)),
		p("max-lifetime-uint64-max", invalid, true, "max_lifetime_s 2^64-1 (reads as -1)", provWith("max_lifetime_s", uint64(math.MaxUint64))),
		p("requested-at-missing", invalid, true, "no requested_at", func(id string) []byte {
			return encode(prov(id, forgejoRunner()).without("requested_at"))
		}),
		p("requested-at-year-1", invalid, true, "requested_at 0001-01-01T00:00:00Z, Go's zero time, as timestamp96", provWith("requested_at", timestamp96(-62135596800, 0))),

		// Versions.
		p("v-0", version, true, "v=0", provWith("v", 0)),
		p("v-2", version, true, "v=2", provWith("v", 2)),
		p("v-negative", version, true, "v=-1", provWith("v", -1)),
		p("v-missing", version, true, "no v", func(id string) []byte { return encode(prov(id, forgejoRunner()).without("v")) }),
		p("v-huge", version, true, "v=2^40", provWith("v", int64(1)<<40)),

		// Many problems at once.
		p("everything-wrong-bad-id", invalid, false, "every field broken, the job id too", func(string) []byte {
			return encode(om{"v", 1, "job_id", "../x", "image", "stretchy-x", "runner", om{"kind", "forgejo", "forgejo",
				forgejoSection().with("url", "https://u:"+corpusSecret+"@x/").with("labels", []string{})}, "boot_timeout_s", -5, "max_lifetime_s", 1 << 40})
		}),
		p("everything-wrong", invalid, true, "every field broken but the job id: the failed event lists all", func(id string) []byte {
			return encode(om{"v", 1, "job_id", id, "image", "stretchy-x", "runner", om{"kind", "forgejo", "forgejo",
				forgejoSection().with("url", "https://u:"+corpusSecret+"@x/").with("labels", []string{})}, "boot_timeout_s", -5, "max_lifetime_s", 1 << 40})
		}),

		// Valid requests for images the host cannot clone.
		p("image-not-found", CodeImageNotFound, true, "a valid provision (kind none) for an image no host has", provRunner(noneRunner())),
		p("image-not-found-forgejo", CodeImageNotFound, true, "a valid Forgejo provision for an image no host has", provRunner(forgejoRunner())),
		{name: "image-invalid", data: func(id string) []byte {
			return encode(prov(id, jenkinsRunner()).with("image", corpusInvalidImage))
		}, code: CodeImageInvalid, readable: true,
			requires: "an image domain " + corpusInvalidImage + " whose disk does not exist (the integration test defines it)",
			note:     "a valid Jenkins provision for an image that cannot be cloned"},

		// Sizes and holds (docs/protocol.md 3.2): added after the cases
		// above so that their files keep their numbers.
		p("vcpus-negative", invalid, true, "vcpus -1", provWith("vcpus", -1)),
		p("vcpus-1025", invalid, true, "vcpus 1025, above the wire's bound", provWith("vcpus", 1025)),
		p("vcpus-string", bad, true, `vcpus is the string "2"`, provWith("vcpus", "2")),
		p("vcpus-float", bad, true, "vcpus is 2.0", provWith("vcpus", 2.0)),
		p("memory-mib-negative", invalid, true, "memory_mib -256", provWith("memory_mib", -256)),
		p("memory-mib-31", invalid, true, "memory_mib 31, below the wire's minimum", provWith("memory_mib", 31)),
		p("memory-mib-4194305", invalid, true, "memory_mib one MiB above 4 TiB", provWith("memory_mib", 4<<20+1)),
		p("memory-mib-uint64-max", invalid, true, "memory_mib 2^64-1 (reads as -1)", provWith("memory_mib", uint64(math.MaxUint64))),
		p("scratch-disk-gib-negative", invalid, true, "scratch_disk_gib -1", provWith("scratch_disk_gib", -1)),
		p("scratch-disk-gib-65537", invalid, true, "scratch_disk_gib one GiB above 64 TiB", provWith("scratch_disk_gib", 64<<10+1)),
		p("scratch-disk-gib-bool", bad, true, "scratch_disk_gib is true", provWith("scratch_disk_gib", true)),
		p("hold-on-failure-negative", invalid, true, "hold_on_failure_s -1", provWith("hold_on_failure_s", -1)),
		p("hold-on-failure-86401", invalid, true, "hold_on_failure_s one second above a day", provWith("hold_on_failure_s", 86401)),
		p("hold-on-failure-string", bad, true, `hold_on_failure_s is the string "30"`, provWith("hold_on_failure_s", "30")),
		p("sizes-all-wrong", invalid, true, "vcpus, memory_mib, scratch_disk_gib and hold_on_failure_s all out of range: the failed event lists all four", func(id string) []byte {
			return encode(prov(id, noneRunner()).with("vcpus", 5000).with("memory_mib", 1).with("scratch_disk_gib", -3).with("hold_on_failure_s", 1<<40))
		}),
		p("sized-image-not-found", CodeImageNotFound, true, "a valid sized provision (2 vCPUs, 256 MiB, a 1 GiB scratch disk, a 30 s hold) for an image no host has", func(id string) []byte {
			return encode(prov(id, noneRunner()).with("vcpus", 2).with("memory_mib", 256).with("scratch_disk_gib", 1).with("hold_on_failure_s", 30))
		}),

		// What Forgejo Runner refuses at once, exiting 1 (docs/protocol.md
		// 3.3), added last so that the files above keep their numbers.
		r("uuid-not-a-uuid", "forgejo.uuid that is not a UUID", provRunner(withForgejo("uuid", "0e6f5f3c-uuid"))),
		r("uuid-without-hyphens", "forgejo.uuid as 32 hexadecimal digits without hyphens", provRunner(withForgejo("uuid", "0e6f5f3c3b7a4c2e9d7a1c2b3a4d5e6f"))),
		r("url-query", "forgejo.url with a query", provRunner(withForgejo("url", "https://code.example.org/?lang=en"))),
		r("url-fragment", "forgejo.url with a fragment", provRunner(withForgejo("url", "https://code.example.org/#top"))),

		// Sealed secrets (docs/protocol.md 3.13): the envelope is
		// checked before any key is looked for.
		r("sealed-and-plain", "runner.sealed with the secret in runner.forgejo.token as well",
			provRunner(withForgejo("token", corpusSecret).with("sealed", sealedEnvelope("7c70d623df12581c", 80)))),
		r("sealed-bad-key-id", "runner.sealed.key_id that is not 16 hex digits",
			provRunner(withForgejo("token", "").with("sealed", sealedEnvelope("KEY-1", 80)))),
		r("sealed-short-box", "runner.sealed.box shorter than a sealed box can be",
			provRunner(withForgejo("token", "").with("sealed", sealedEnvelope("7c70d623df12581c", 20)))),
		r("sealed-kind-none", "runner.sealed for kind none, which has no secret",
			provRunner(om{"kind", "none", "sealed", sealedEnvelope("7c70d623df12581c", 80)})),
	}
	return cases
}

// corpus builds the manifest and the files from badCases.
func corpus() (CorpusManifest, map[string][]byte) {
	files := make(map[string][]byte)
	man := CorpusManifest{About: "Bad request payloads for the libvirt worker, one file each (raw bytes as published). " +
		"Generated by go test ./pkg/messages -run TestBadCorpus -update; see pkg/messages/corpus_test.go. " +
		"subject provision means stretchy.LIBVIRT.req.provision, teardown the teardown subject of the worker's host. " +
		"Every message is terminated with code as its reason; a failed event follows only for a provision with a readable job id (docs/protocol.md 5.2 G). " +
		"publish_refused payloads exceed the request stream's max_msg_size (64 KiB) and are refused at publish time."}
	for i, c := range badCases() {
		n := i + 1
		id := fmt.Sprintf("bad-%03d", n)
		e := CorpusEntry{
			File: fmt.Sprintf("%03d-%s.msgpack", n, c.name), Subject: "provision", Code: c.code,
			Requires: c.requires, Note: c.note,
		}
		data := c.data(id)
		if c.teardown {
			e.Subject = "teardown"
		}
		if c.readable {
			e.JobID = id
		}
		e.FailedEvent = !c.teardown && e.JobID != ""
		switch {
		case !e.FailedEvent:
		case c.code == CodeImageNotFound || c.code == CodeImageInvalid:
			e.Events = []State{StateAccepted, StateCloning, StateFailed}
		default:
			e.Events = []State{StateFailed}
		}
		e.PublishRefused = len(data) > MaxMessageSize
		files[e.File] = data
		man.Entries = append(man.Entries, e)
	}
	return man, files
}

// classify is what the worker makes of a payload before it touches the
// host (internal/worker provision and teardown), but for the runner
// section of a provision: the error code, or "" for a valid request, and
// the job id it can report a failure for.
func classify(subject string, data []byte) (code ErrorCode, jobID string, problem error) {
	versionOr := func(err error) ErrorCode {
		if errors.Is(err, ErrUnsupportedVersion) {
			return CodeUnsupportedVersion
		}
		return CodeInvalidRequest
	}
	if subject == "teardown" {
		td, err := DecodeTeardown(data)
		if err != nil {
			return CodeBadMessage, "", err
		}
		if err := td.Validate(); err != nil {
			return versionOr(err), "", err
		}
		return "", td.JobID, nil
	}
	p, err := DecodeProvision(data)
	if err != nil {
		return CodeBadMessage, PeekJobID(data), err
	}
	if ValidJobID(p.JobID) {
		jobID = p.JobID
	}
	if err := p.ValidateEnvelope(); err != nil {
		return versionOr(err), jobID, err
	}
	return "", jobID, nil
}

// TestBadCorpus keeps testdata/bad reproducible (run with -update after
// changing badCases) and checks that the decoder and validators make of
// every file what its manifest entry says, but that a provision whose
// problems are all in its runner section passes ValidateEnvelope: pkg/runners
// checks those (TestValidateBadCorpus).
func TestBadCorpus(t *testing.T) {
	man, files := corpus()
	manPath := filepath.Join(corpusDir, corpusManifest)
	if *update {
		if err := os.RemoveAll(corpusDir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(corpusDir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(corpusDir, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		js, err := json.MarshalIndent(man, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(manPath, append(js, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	js, err := os.ReadFile(manPath)
	if err != nil {
		t.Fatalf("read the manifest (run go test -run TestBadCorpus -update once): %v", err)
	}
	var onDisk CorpusManifest
	if err := json.Unmarshal(js, &onDisk); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(onDisk, man) {
		t.Fatalf("%s drifted from badCases; run go test -run TestBadCorpus -update", manPath)
	}
	if len(man.Entries) < 100 {
		t.Fatalf("only %d bad inputs", len(man.Entries))
	}
	dir, err := os.ReadDir(corpusDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(dir) != len(man.Entries)+1 {
		t.Errorf("%s holds %d files, the manifest lists %d", corpusDir, len(dir)-1, len(man.Entries))
	}

	ids := map[string]string{}
	codes := map[ErrorCode]int{}
	var peak uint64
	cases := badCases()
	for i, e := range onDisk.Entries {
		t.Run(strings.TrimSuffix(e.File, ".msgpack"), func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(corpusDir, e.File))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data, files[e.File]) {
				t.Fatalf("payload drifted from badCases; run go test -run TestBadCorpus -update")
			}
			if e.JobID != "" {
				if other, ok := ids[e.JobID]; ok {
					t.Errorf("job id %s is also used by %s; the worker would treat the second as a repeat", e.JobID, other)
				}
				ids[e.JobID] = e.File
			}
			codes[e.Code]++

			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			code, jobID, problem := classify(e.Subject, data)
			runtime.ReadMemStats(&m1)
			// The decoder caps what a length header may allocate (1 Mi
			// slice elements, 1 MiB of bytes), not what the payload can
			// back: a 243-byte array32 header makes it allocate ~16 MiB.
			// Past the cap a hostile header would cost gigabytes.
			alloc := m1.TotalAlloc - m0.TotalAlloc
			if alloc > maxDecodeAlloc {
				t.Errorf("decoding %d bytes allocated %d MiB", len(data), alloc>>20)
			}
			peak = max(peak, alloc)

			want := e.Code
			switch {
			case want == CodeImageNotFound || want == CodeImageInvalid:
				want = "" // valid: only the host can refuse it
			case cases[i].section:
				want = "" // pkg/runners refuses it
			}
			if code != want {
				t.Errorf("classified %q (%v), manifest says %q", code, problem, e.Code)
			}
			if e.Subject == "provision" && jobID != e.JobID {
				t.Errorf("readable job id %q, manifest says %q", jobID, e.JobID)
			}
			if e.FailedEvent != (e.Subject == "provision" && e.JobID != "") {
				t.Errorf("failed_event %v contradicts 5.2 G", e.FailedEvent)
			}
			if e.PublishRefused != (len(data) > MaxMessageSize) {
				t.Errorf("publish_refused %v for %d bytes", e.PublishRefused, len(data))
			}
			if e.PublishRefused && !errors.Is(problem, ErrTooLarge) {
				t.Errorf("a payload of %d bytes must be refused before decoding, got %v", len(data), problem)
			}
			if problem != nil && strings.Contains(problem.Error(), corpusSecret) {
				t.Errorf("the error repeats a secret: %v", problem)
			}
		})
	}
	t.Logf("%d bad inputs: %v; most allocated by one decode: %d KiB", len(man.Entries), codes, peak>>10)
}

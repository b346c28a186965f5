package messages

import (
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestImageToken(t *testing.T) {
	tests := []struct {
		image, token string
	}{
		{"tiny-linux", "tiny-linux"},
		{"ubuntu-24.04", "ubuntu-24_2e04"},
		{"win11+gpu", "win11_2bgpu"},
		{"macos:14", "macos_3a14"},
		{"a.b+c:d-e", "a_2eb_2bc_3ad-e"},
		{"Debian12", "Debian12"},
		{"under_score", "under_5fscore"},
	}
	for _, tt := range tests {
		t.Run(tt.image, func(t *testing.T) {
			if got := ImageToken(tt.image); got != tt.token {
				t.Fatalf("ImageToken(%q) = %q, want %q", tt.image, got, tt.token)
			}
			back, err := ParseImageToken(tt.token)
			if err != nil || back != tt.image {
				t.Fatalf("ParseImageToken(%q) = %q, %v", tt.token, back, err)
			}
			if s := ImageProvisionSubject(tt.image); s != "stretchy.LIBVIRT.req.image."+tt.token+".provision" {
				t.Fatalf("subject %q", s)
			}
		})
	}
}

func TestParseImageTokenRefuses(t *testing.T) {
	for _, tok := range []string{"", "a.b", "a_2", "a_zz", "a_2E", "a_61", "a b", "a*", ">", "_", "a_2d"} {
		t.Run(tok, func(t *testing.T) {
			if got, err := ParseImageToken(tok); !errors.Is(err, ErrBadToken) {
				t.Fatalf("ParseImageToken(%q) = %q, %v; want ErrBadToken", tok, got, err)
			}
		})
	}
}

// TestImageTokenRoundTrips checks random names, valid image names and
// arbitrary bytes alike: every token is one subject token of safe bytes,
// decodes to its name, and different names get different tokens.
func TestImageTokenRoundTrips(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const alphabet = "abcXYZ019.-+:_ *>/\x00\xff"
	seen := map[string]string{}
	for range 20000 {
		b := make([]byte, 1+r.IntN(140))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		name := string(b)
		tok := ImageToken(name)
		if strings.ContainsAny(tok, ".*> \t\r\n") {
			t.Fatalf("token %q of %q is not one subject token", tok, name)
		}
		back, err := ParseImageToken(tok)
		if err != nil || back != name {
			t.Fatalf("round trip of %q: %q, %v", name, back, err)
		}
		if other, ok := seen[tok]; ok && other != name {
			t.Fatalf("%q and %q share token %q", name, other, tok)
		}
		seen[tok] = name
		if c := ImageConsumer(name); len(c) > MaxConsumerName || strings.ContainsAny(c, ".*> \t\r\n/\\") {
			t.Fatalf("consumer name %q of %q", c, name)
		}
	}
}

func TestImageConsumer(t *testing.T) {
	if got := ImageConsumer("ubuntu-24.04"); got != "image_ubuntu-24_2e04" {
		t.Fatalf("short name: %q", got)
	}
	// The longest valid name of dots takes 382 bytes as a token.
	long := "a" + strings.Repeat(".", 127)
	if !ValidImage(long) {
		t.Fatal("test name should be valid")
	}
	got := ImageConsumer(long)
	if !strings.HasPrefix(got, "imagehash_") || len(got) != len("imagehash_")+32 {
		t.Fatalf("long name: %q", got)
	}
	if ImageConsumer(long[:127]+"+") == got {
		t.Fatal("two long names share a consumer")
	}
	// Where the token fits, it names the consumer, up to the limit.
	fits := strings.Repeat("a", 128)
	if got := ImageConsumer(fits); got != "image_"+fits {
		t.Fatalf("128 letters: %q", got)
	}
}

func TestValidImage(t *testing.T) {
	for name, want := range map[string]bool{
		"tiny-linux": true, "ubuntu-24.04": true, "win+gpu:1": true,
		"under_score": true, "stretchy-x": false, "": false, "has space": false, ".dot": false,
	} {
		if got := ValidImage(name); got != want {
			t.Errorf("ValidImage(%q) = %v, want %v", name, got, want)
		}
	}
}

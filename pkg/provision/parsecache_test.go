package provision

import (
	"errors"
	"fmt"
	"testing"
)

func TestParseCache(t *testing.T) {
	var c parseCache[int]
	parses := 0
	parse := func(doc string) (int, error) {
		parses++
		if doc == "bad" {
			return 0, errors.New("bad document")
		}
		return len(doc), nil
	}
	for range 3 {
		if v, err := c.get("<domain/>", parse); err != nil || v != 9 {
			t.Fatalf("get = %d, %v", v, err)
		}
	}
	if parses != 1 {
		t.Fatalf("%d parses of one document, want 1", parses)
	}
	for range 2 {
		if _, err := c.get("bad", parse); err == nil {
			t.Fatal("no error for a bad document")
		}
	}
	if parses != 3 {
		t.Fatalf("%d parses, want a bad document parsed each time (3)", parses)
	}

	// A document asked for within a generation's time stays; one not
	// asked for is dropped after two.
	parses = 0
	for i := range 2 * parseCacheSize {
		if i%100 == 0 {
			_, _ = c.get("<domain/>", parse)
		}
		_, _ = c.get(fmt.Sprintf("doc %d", i), parse)
	}
	if parses != 2*parseCacheSize {
		t.Fatalf("%d parses, want only the new documents parsed (%d)", parses, 2*parseCacheSize)
	}
	parses = 0
	_, _ = c.get("doc 0", parse)
	if parses != 1 {
		t.Fatal("a document not asked for in two generations is still kept")
	}
	if n := len(c.cur) + len(c.old); n > 2*parseCacheSize {
		t.Fatalf("%d documents kept, want at most %d", n, 2*parseCacheSize)
	}
}

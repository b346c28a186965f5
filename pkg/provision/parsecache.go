package provision

import (
	"sync"

	"libvirt.org/go/libvirtxml"
)

// parseCacheSize is how many documents one generation of a parseCache
// holds before it becomes the old one: enough for the definitions (live
// and persistent) and volumes of a few hundred domains.
const parseCacheSize = 2048

// parseCache remembers what was read from XML documents, by their text.
// Clone and Remove look at every other domain and volume of the host (for
// free MAC addresses, and for storage still in use), whose documents
// rarely change between two calls; comparing a document with one already
// parsed costs far less than parsing it again, so a call costs libvirt's
// answers, not their parsing, and it stays flat as the host fills. Two
// generations bound it: a document not asked for in a generation's time is
// dropped with the old one. Safe for concurrent use; values are never
// changed once stored.
type parseCache[V any] struct {
	mu       sync.Mutex
	cur, old map[string]V
}

// get returns what parse returns for doc, parsing doc only when neither
// generation has it. A parse error is not remembered.
func (c *parseCache[V]) get(doc string, parse func(string) (V, error)) (V, error) {
	c.mu.Lock()
	v, ok := c.cur[doc]
	if !ok {
		if v, ok = c.old[doc]; ok {
			c.put(doc, v)
		}
	}
	c.mu.Unlock()
	if ok {
		return v, nil
	}
	v, err := parse(doc)
	if err != nil {
		return v, err
	}
	c.mu.Lock()
	c.put(doc, v)
	c.mu.Unlock()
	return v, nil
}

// put stores v for doc in the current generation; c.mu is held.
func (c *parseCache[V]) put(doc string, v V) {
	if c.cur == nil || len(c.cur) >= parseCacheSize {
		c.old, c.cur = c.cur, make(map[string]V)
	}
	c.cur[doc] = v
}

// domainFacts is what Clone and Remove need of another domain's
// definition.
type domainFacts struct {
	name string
	macs []string
	// nvram is the domain's NVRAM file, "" for none.
	nvram string
	// sources are its disks' sources and those of their backing chains.
	sources []*libvirtxml.DomainDiskSource
}

func parseDomainFacts(doc string) (domainFacts, error) {
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return domainFacts{}, err
	}
	return factsOf(&def), nil
}

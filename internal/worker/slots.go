package worker

import (
	"context"
	"sync"
	"sync/atomic"
)

// Priorities of work waiting for an operation slot. Lower values are served
// first.
type priority int

const (
	// teardownFirst is for teardowns, the worker's own and requested ones:
	// they free a machine, and a host at capacity starts nothing else until
	// one ends.
	teardownFirst priority = iota
	// requestNext is for provisions.
	requestNext
	numPriorities
)

// Slots are the host's operation slots: they bound the operations in
// flight (provisions until their runner runs, teardowns) to a fixed
// number. A slot is taken only for work in hand (a pulled message, a
// teardown a machine decided on), never for a pull that is still waiting
// for a message: otherwise an idle pull would keep the machines' own
// teardowns waiting, forever at parallelism 1. A freed slot goes straight
// to the oldest waiter of the highest priority, teardowns first. The worker
// takes slots for the requests it pulls; the lifecycle takes them, through
// Acquire, for the teardowns machines begin by themselves.
type Slots struct {
	mu      sync.Mutex
	total   int
	free    int
	waiters [numPriorities][]chan struct{}
	// changed is closed and replaced whenever free or the waiters change,
	// to wake waitIdle.
	changed chan struct{}

	inFlight, maxInFlight atomic.Int64
}

// NewSlots returns n slots.
func NewSlots(n int) *Slots {
	return &Slots{total: n, free: n, changed: make(chan struct{})}
}

// Acquire waits for a slot for a teardown, ahead of provisions, until ctx
// ends; release frees it. It implements lifecycle.Slots.
func (s *Slots) Acquire(ctx context.Context) (release func(), err error) {
	if err := s.acquire(ctx, teardownFirst); err != nil {
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(s.release) }, nil
}

// TryAcquire takes a slot for a warm pool's refill, only when nobody
// waits for one and, with more than one slot, a second one stays free for
// the next request; it implements lifecycle.Slots. A refill holds its
// slot only for its machine's clone and boot.
func (s *Slots) TryAcquire() (release func(), ok bool) {
	s.mu.Lock()
	spare := 1
	if s.total == 1 {
		spare = 0
	}
	if s.free <= spare || s.queuedLocked(numPriorities-1) {
		s.mu.Unlock()
		return nil, false
	}
	s.free--
	s.signalLocked()
	s.mu.Unlock()
	s.took()
	var once sync.Once
	return func() { once.Do(s.release) }, true
}

// InFlight returns the operations holding a slot now and the most that
// ever did at once.
func (s *Slots) InFlight() (now, most int64) {
	return s.inFlight.Load(), s.maxInFlight.Load()
}

// took counts a slot taken.
func (s *Slots) took() {
	n := s.inFlight.Add(1)
	for {
		m := s.maxInFlight.Load()
		if n <= m || s.maxInFlight.CompareAndSwap(m, n) {
			return
		}
	}
}

// signalLocked wakes everybody waiting for a change.
func (s *Slots) signalLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// queuedLocked reports whether anyone of priority p or higher waits.
func (s *Slots) queuedLocked(p priority) bool {
	for q := priority(0); q <= p; q++ {
		if len(s.waiters[q]) > 0 {
			return true
		}
	}
	return false
}

// acquire takes a slot for work of priority p, waiting until one is free
// and every waiter of the same or a higher priority before it was served.
// It fails only when ctx ends first.
func (s *Slots) acquire(ctx context.Context, p priority) error {
	s.mu.Lock()
	if s.free > 0 && !s.queuedLocked(p) {
		s.free--
		s.signalLocked()
		s.mu.Unlock()
		s.took()
		return nil
	}
	ch := make(chan struct{})
	s.waiters[p] = append(s.waiters[p], ch)
	s.signalLocked()
	s.mu.Unlock()

	select {
	case <-ch:
		s.took()
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, w := range s.waiters[p] {
		if w == ch {
			s.waiters[p] = append(s.waiters[p][:i], s.waiters[p][i+1:]...)
			s.signalLocked()
			return ctx.Err()
		}
	}
	// The slot was handed over just as ctx ended: pass it on.
	s.handOnLocked()
	return ctx.Err()
}

// release frees a slot taken by acquire, handing it to the first waiter.
func (s *Slots) release() {
	s.inFlight.Add(-1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handOnLocked()
}

// handOnLocked gives a freed slot to the first waiter, or frees it.
func (s *Slots) handOnLocked() {
	for p := range s.waiters {
		if len(s.waiters[p]) > 0 {
			ch := s.waiters[p][0]
			s.waiters[p] = s.waiters[p][1:]
			close(ch)
			s.signalLocked()
			return
		}
	}
	s.free++
	s.signalLocked()
}

// waitIdle returns once a slot is free that nobody waits for, so that work
// pulled now can start at once; it fails only when ctx ends. It takes
// nothing: the pull that follows takes its slot with acquire once it has a
// message, and waits there only if other work came first.
func (s *Slots) waitIdle(ctx context.Context) error {
	for {
		s.mu.Lock()
		if s.free > 0 && !s.queuedLocked(numPriorities-1) {
			s.mu.Unlock()
			return nil
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

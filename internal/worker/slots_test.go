package worker

import (
	"context"
	"testing"
	"time"
)

// TestSlotsServeTeardownsFirst: a freed slot goes to the oldest teardown
// waiting before any provision, and waitIdle holds off new pulls while
// anyone waits.
func TestSlotsServeTeardownsFirst(t *testing.T) {
	s := NewSlots(1)
	ctx := context.Background()
	if err := s.acquire(ctx, requestNext); err != nil {
		t.Fatal(err)
	}
	order := make(chan string, 3)
	started := func(name string, p priority) {
		go func() {
			if err := s.acquire(ctx, p); err != nil {
				t.Error(err)
				return
			}
			order <- name
		}()
	}
	started("provision", requestNext)
	waitQueued(t, s, requestNext, 1)
	started("teardown-1", teardownFirst)
	waitQueued(t, s, teardownFirst, 1)
	started("teardown-2", teardownFirst)
	waitQueued(t, s, teardownFirst, 2)

	idle := make(chan struct{})
	go func() {
		_ = s.waitIdle(ctx)
		close(idle)
	}()
	for _, want := range []string{"teardown-1", "teardown-2", "provision"} {
		s.release()
		if got := <-order; got != want {
			t.Fatalf("slot went to %s, want %s", got, want)
		}
		select {
		case <-idle:
			t.Fatal("waitIdle returned while every slot was taken")
		default:
		}
	}
	s.release()
	<-idle
}

// TestSlotsAcquireGivesUpWithItsContext: a waiter whose context ends
// leaves the queue, and a slot handed to it as it gave up is passed on.
func TestSlotsAcquireGivesUpWithItsContext(t *testing.T) {
	s := NewSlots(1)
	if err := s.acquire(context.Background(), requestNext); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.acquire(ctx, teardownFirst) }()
	waitQueued(t, s, teardownFirst, 1)
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("acquire succeeded after its context ended")
	}
	waitQueued(t, s, teardownFirst, 0)
	s.release()
	if err := s.acquire(context.Background(), requestNext); err != nil {
		t.Fatal(err)
	}
}

// waitQueued waits until n waiters of priority p are queued.
func waitQueued(t *testing.T, s *Slots, p priority, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		got := len(s.waiters[p])
		s.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters of priority %d, want %d", got, p, n)
		}
		time.Sleep(time.Millisecond)
	}
}

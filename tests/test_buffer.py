"""The bounded buffer: bounds hold, order holds, accounting balances."""

from __future__ import annotations

import unittest

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relayd.outbox.buffer import ENTRY_OVERHEAD, NotStored, RingBuffer, Waiter


def flat(runs):
    """Runs as per-message ``(target, item, waiter)`` entries, in order (what the model keeps)."""
    return [(target, item, waiter) for target, items, waiter, _ in runs for item in items]


class BufferMachine(RuleBasedStateMachine):
    """Random offers, takes, releases, requeues and cancellations against a model."""

    def __init__(self):
        super().__init__()
        self.buffer = RingBuffer(max_messages=20, max_bytes=20 * (ENTRY_OVERHEAD + 8))
        self.model = []  # queued entries, in order
        self.in_flight = []  # batches taken, not yet released or requeued
        self.counter = 0
        self.waiters = []
        self.stored = {}  # waiter -> messages settled as stored

    @rule(count=st.integers(1, 12), size=st.integers(0, 16), key=st.sampled_from([b"a", b"b"]), stored=st.booleans())
    def offer(self, count, size, key, stored):
        """Offers are all-or-nothing and refused exactly when over a bound."""
        items = []
        for _ in range(count):
            self.counter += 1
            items.append(b"%d" % self.counter + b"x" * size)
        waiter = Waiter(count) if stored else None
        if waiter is not None:
            waiter.deferred.addErrback(lambda f: None)  # the fail rule fails some
        fits = self.buffer.has_room(count, sum(map(len, items)))
        accepted = self.buffer.offer(key, items, waiter)
        assert accepted == fits
        if accepted:
            self.model.extend((key, item, waiter) for item in items)
            if waiter is not None:
                self.waiters.append(waiter)

    @rule(n=st.integers(1, 24), max_bytes=st.sampled_from([10**9, 1, 40, 150]))
    def take(self, n, max_bytes):
        """Take returns the oldest live entries in order, dropping cancelled ones it passes.

        An entry is taken while the bytes taken before it are under
        `max_bytes` (so at least one), whether whole runs fit or one is cut;
        each run's size is its items' bytes.
        """
        batch = self.buffer.take(n, max_bytes)
        for _, items, _, size in batch:
            assert items and size == sum(map(len, items))
        expected = []
        size = 0
        while self.model and len(expected) < n and size < max_bytes:
            entry = self.model.pop(0)
            if entry[2] is not None and entry[2].cancelled:
                continue
            expected.append(entry)
            size += len(entry[1])
        assert flat(batch) == expected
        if batch:
            self.in_flight.append(batch)

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10))
    def release(self, i):
        """A stored batch leaves the accounting."""
        batch = self.in_flight.pop(i % len(self.in_flight))
        self.buffer.settle_stored(batch)
        for entry in flat(batch):
            if entry[2] is not None:
                self.stored[entry[2]] = self.stored.get(entry[2], 0) + 1

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10))
    def fail(self, i):
        """A batch nothing can store leaves the accounting and fails its waiters."""
        batch = self.in_flight.pop(i % len(self.in_flight))
        self.buffer.settle_failed(batch, NotStored("test", retry_after=1))
        for entry in flat(batch):
            if entry[2] is not None:
                assert entry[2].cancelled
                assert entry[2].deferred.called

    @precondition(lambda self: self.in_flight)
    @rule()
    def requeue_last(self):
        """A failed batch goes back to the front, in order."""
        batch = self.in_flight.pop()
        self.buffer.requeue(batch)
        self.model = flat(batch) + self.model

    @precondition(lambda self: self.waiters)
    @rule(i=st.integers(0, 10))
    def cancel(self, i):
        """A cancelled waiter's queued entries are never taken again."""
        self.waiters[i % len(self.waiters)].cancelled = True

    @invariant()
    def waiters_fire_when_all_stored(self):
        """A waiter counts every stored message; a live one fires exactly when all are stored."""
        for waiter in self.waiters:
            assert waiter.remaining == waiter.count - self.stored.get(waiter, 0)
            if not waiter.cancelled:
                assert waiter.deferred.called == (waiter.remaining == 0), (waiter.remaining, waiter.deferred.called)

    @invariant()
    def bounded(self):
        """Never more than the bounds, counting in-flight entries."""
        assert self.buffer.messages <= self.buffer.max_messages
        assert self.buffer.bytes <= self.buffer.max_bytes

    @invariant()
    def taken_counts_entries_in_hand(self):
        """A waiter's `taken` is the number of its entries taken and not yet settled or requeued."""
        for waiter in self.waiters:
            in_hand = sum(1 for b in self.in_flight for e in flat(b) if e[2] is waiter)
            assert waiter.taken == in_hand, (waiter.taken, in_hand)

    @invariant()
    def accounting_matches(self):
        """messages/bytes equal queued (incl. cancelled, until skipped) plus in flight."""
        queued = flat(self.buffer._queue)
        flying = [e for b in self.in_flight for e in flat(b)]
        everything = queued + flying
        assert self.buffer.queued == len(queued)
        assert self.buffer.messages == len(everything)
        assert self.buffer.bytes == sum(len(e[1]) + ENTRY_OVERHEAD for e in everything)


class BufferStateTests(BufferMachine.TestCase):
    """Run the state machine."""


class WaiterTests(unittest.TestCase):
    """A waiter fires once, when its last message is stored."""

    def test_fires_after_all(self):
        """Two messages: nothing after one, fired after two."""
        w = Waiter(2)
        fired = []
        w.deferred.addCallback(fired.append)
        w.stored()
        self.assertEqual(fired, [])
        w.stored()
        self.assertEqual(fired, [None])

    def test_on_settled_is_called_once_and_its_error_stays_inside(self):
        """The plain callback gets the outcome once; if it raises, the error is logged, not
        raised into the forwarder's settlement, and a Deferred asked for later still fires."""
        from twisted.logger import globalLogPublisher

        seen, logged = [], []

        def broken(waiter, error):
            seen.append((waiter, error))
            raise RuntimeError("bug in the answer")

        def observer(event):
            if event.get("log_failure") is not None:
                logged.append(event)

        w = Waiter(1)
        w.on_settled = broken
        globalLogPublisher.addObserver(observer)
        try:
            w.stored()  # must not raise
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertEqual(seen, [(w, None)])
        self.assertEqual(len(logged), 1)
        fired = []
        w.deferred.addCallback(fired.append)  # made after the outcome: fires at once
        self.assertEqual(fired, [None])
        w.fail(RuntimeError("late"))  # already answered: no second call
        self.assertEqual(len(seen), 1)

    def test_cancelled_never_fires(self):
        """A cancelled waiter stays silent when its messages land later."""
        w = Waiter(1)
        w.cancelled = True
        w.stored()
        self.assertFalse(w.deferred.called)

    def test_client_gone_before_any_write_ends_the_request(self):
        """A client that leaves before any of its messages was written: the waiter fails with
        CancelledError (the request's callback runs: ingest stops counting it in flight) and its
        entries are dropped; once something was written, the waiter keeps waiting for the outcome."""
        from twisted.internet.defer import CancelledError

        untouched = Waiter(1)
        failures = []
        untouched.deferred.addErrback(failures.append)
        untouched.client_gone()
        self.assertTrue(untouched.cancelled)
        self.assertEqual([f.check(CancelledError) for f in failures], [CancelledError])
        exposed = Waiter(1)
        exposed.exposed = True
        exposed.client_gone()
        self.assertFalse(exposed.deferred.called)
        self.assertFalse(exposed.cancelled)

    def test_client_gone(self):
        """A waiter whose Deferred was cancelled (client left) tolerates a late store."""
        w = Waiter(1)
        w.deferred.addErrback(lambda f: None)
        w.deferred.cancel()
        w.stored()  # must not raise AlreadyCalledError


class DuplicateOutcomeTests(unittest.TestCase):
    """An idempotent target's per-message outcomes reach the waiter whose message they are about."""

    def test_outcomes_follow_the_runs_in_order(self):
        """Runs taken together (one run cut in two, too) get the outcomes at their own offsets."""
        buffer = RingBuffer(max_messages=100, max_bytes=10**6)
        waiters = [Waiter(1), Waiter(2), Waiter(1), Waiter(1)]
        for n, waiter in enumerate(waiters):
            buffer.offer(b"t", [b"w%d-m%d" % (n, i) for i in range(waiter.count)], waiter)
        first = buffer.take(2, 10**6)  # waiter 0's run and the first message of waiter 1's
        rest = buffer.take(100, 10**6)
        self.assertEqual([len(run[1]) for run in first + rest], [1, 1, 1, 1, 1])
        buffer.settle_stored(first, [None, None])
        self.assertFalse(waiters[1].deferred.called)  # one of its two messages is still out
        buffer.settle_stored(rest, [b"earlier-1", None, b"earlier-3"])
        self.assertEqual([w.duplicate_of for w in waiters], [None, b"earlier-1", None, b"earlier-3"])
        self.assertTrue(all(w.deferred.called for w in waiters))
        self.assertEqual((buffer.messages, buffer.bytes, buffer.queued), (0, 0, 0))

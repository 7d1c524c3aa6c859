"""Token buckets per route and per client."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.ingest.problems import TooManyRequests
from relayd.ingest.ratelimit import MAX_CLIENTS, RateLimiter


class RateLimiterTests(SynchronousTestCase):
    """Bursts are refused with 429 and the right headers; paced traffic is not."""

    def test_burst_then_refill(self):
        """20/s with burst 20: 20 pass at once, the 21st is 429 with Retry-After 1."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (20.0, 1.0), 20, None, None)
        for _ in range(20):
            limiter.take(b"c", 1)
        e = self.assertRaises(TooManyRequests, limiter.take, b"c", 1)
        self.assertEqual(e.retry_after, 1)
        headers = dict(e.headers)
        self.assertEqual(headers[b"RateLimit-Policy"], b'"route";q=20;w=1')
        self.assertTrue(headers[b"RateLimit"].startswith(b'"route";r=0;t=1'))
        clock.advance(0.5)
        for _ in range(10):
            limiter.take(b"c", 1)
        self.assertRaises(TooManyRequests, limiter.take, b"c", 1)

    @given(st.floats(0.051, 1.0))
    def test_paced_client_never_limited(self, interval):
        """A client under the rate never sees a 429."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (20.0, 1.0), 1, None, None)
        for _ in range(100):
            limiter.take(b"c", 1)
            clock.advance(interval)

    def test_refusal_takes_nothing(self):
        """A refused batch does not drain the bucket."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (10.0, 1.0), 10, None, None)
        self.assertRaises(TooManyRequests, limiter.take, b"c", 11)
        limiter.take(b"c", 10)

    def test_batch_over_burst(self):
        """A batch larger than the burst can never pass: 429, retry later advice."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (10.0, 1.0), 10, None, None)
        e = self.assertRaises(TooManyRequests, limiter.take, b"c", 11)
        self.assertIn("burst", e.detail)

    def test_clients_are_separate(self):
        """One client's flood does not limit another."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, None, None, (5.0, 1.0), 5)
        for _ in range(5):
            limiter.take(b"flood", 1)
        self.assertRaises(TooManyRequests, limiter.take, b"flood", 1)
        limiter.take(b"quiet", 1)

    def test_client_table_is_bounded(self):
        """Distinct clients beyond MAX_CLIENTS evict the least recent (memory bound)."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, None, None, (1.0, 1.0), 1)
        for i in range(MAX_CLIENTS + 10):
            limiter.take(b"%d" % i, 1)
        self.assertEqual(len(limiter._clients), MAX_CLIENTS)

    def test_worker_share(self):
        """With two workers each process allows half the rate and burst."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (20.0, 1.0), 20, None, None, share=0.5)
        for _ in range(10):
            limiter.take(b"c", 1)
        self.assertRaises(TooManyRequests, limiter.take, b"c", 1)


class RefundTests(SynchronousTestCase):
    """A request refused after the rate limit (e.g. 503 overloaded) costs no tokens."""

    def test_refund_restores_both_buckets(self):
        """take + refund leaves route and client buckets as they were (capped at the burst)."""
        clock = Clock()
        limiter = RateLimiter(clock.seconds, (5.0, 1.0), 5, (5.0, 1.0), 5)
        limiter.take(b"c", 5)
        limiter.refund(b"c", 5)
        limiter.take(b"c", 5)
        self.assertRaises(TooManyRequests, limiter.take, b"c", 1)
        limiter.refund(b"c", 100)
        limiter.take(b"c", 5)
        self.assertRaises(TooManyRequests, limiter.take, b"c", 1)

"""HTTP-layer limits: deadlines, header caps, connection caps (real bytes, fake clock)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from relayd.config import LimitsConfig
from relayd.ingest.http_layer import IngestSite
from tests.test_ingest import IngestFixture

HEAD = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n"


class LimitFixture(IngestFixture):
    def site(self, **limits):
        self.make()
        return IngestSite(self.app, self.metrics, 60.0, self.clock, LimitsConfig(**limits))

    def connect(self, site, host="10.0.0.1", port=1234):
        channel = site.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport


class DeadlineTests(SynchronousTestCase, LimitFixture):
    """Slow clients are cut off even if they send a byte now and then."""

    def test_dribbled_head_is_cut_at_the_deadline(self):
        """One byte per second resets twisted's idle timer but not the head deadline: 408 at 10 s."""
        site = self.site(header_timeout=10.0)
        channel, transport = self.connect(site)
        for byte in HEAD[:9]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_slow_body_is_cut(self):
        """A complete head but a body that never finishes: 408 after body_timeout."""
        site = self.site(body_timeout=5.0)
        channel, transport = self.connect(site)
        channel.dataReceived(HEAD + b'{"a"')
        self.clock.advance(5.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertEqual(self.buffer.messages, 0)

    def test_keepalive_requests_each_get_a_fresh_deadline(self):
        """Deadlines are per request: a long-lived, well-behaved connection is never cut."""
        site = self.site(header_timeout=2.0, body_timeout=2.0)
        channel, transport = self.connect(site)
        for _ in range(5):
            channel.dataReceived(HEAD + b'{"a":1}\n')
            self.clock.advance(1.5)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 5)
        self.assertFalse(transport.disconnecting)

    def test_sweeper_visits_only_connections_with_a_deadline(self):
        """Idle and answered connections leave the sweep's set; one mid-head is in it until cut.

        The sweep used to visit every connection: with 10,000 SSE subscribers
        that was a stall of milliseconds four times a second.
        """
        site = self.site(header_timeout=2.0, body_timeout=2.0)
        idle = [self.connect(site, port=2000 + i)[0] for i in range(3)]
        answered, answered_transport = self.connect(site, port=3000)
        answered.dataReceived(HEAD + b'{"a":1}\n')
        slow, slow_transport = self.connect(site, port=3001)
        slow.dataReceived(HEAD[:10])
        self.assertEqual(site.armed, {slow})
        self.assertTrue(set(idle) | {answered} <= site.channels)
        self.clock.advance(2.5)
        self.assertTrue(slow_transport.value().startswith(b"HTTP/1.1 408 "), slow_transport.value())
        self.assertEqual(site.armed, set())
        self.assertFalse(answered_transport.disconnecting)


class HeaderLimitTests(SynchronousTestCase, LimitFixture):
    """Too many or too large headers get a 431 problem document."""

    def test_too_many_headers(self):
        """More header fields than max_headers: 431 problem+json."""
        site = self.site(max_headers=5)
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /events HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(10)) + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())
        self.assertIn(b"application/problem+json", transport.value())

    def test_head_too_large(self):
        """A head over max_header_bytes: 431."""
        site = self.site(max_header_bytes=256)
        channel, transport = self.connect(site)
        channel.dataReceived(b"POST /events HTTP/1.1\r\nX-Big: " + b"a" * 300 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())

    def test_malformed_request_line(self):
        """Garbage instead of a request line: 400 problem+json, not a bare 400."""
        site = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(b"NONSENSE\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        self.assertIn(b"application/problem+json", transport.value())


class ConnectionCapTests(SynchronousTestCase, LimitFixture):
    """Connections beyond the caps are answered with 503 and closed."""

    def test_per_peer_cap(self):
        """The third connection from one address is refused; another address is not."""
        site = self.site(max_connections_per_peer=2)
        self.connect(site)
        self.connect(site)
        _, refused = self.connect(site)
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "), refused.value())
        self.assertIn(b"\r\nRetry-After: 1\r\n", refused.value())
        self.assertTrue(refused.disconnecting)
        _, other = self.connect(site, host="10.0.0.2")
        self.assertEqual(other.value(), b"")

    def test_total_cap_and_release(self):
        """Over max_connections is refused; a closed connection frees its slot."""
        site = self.site(max_connections=1)
        channel, _ = self.connect(site)
        _, refused = self.connect(site, host="10.0.0.9")
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "))
        channel.connectionLost(None)
        _, again = self.connect(site, host="10.0.0.9")
        self.assertEqual(again.value(), b"")

"""relayd/wire.py against real sockets: direct writes, answers held to the turn's end, and the lifted send limit."""

from __future__ import annotations

import socket
from typing import Any, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial import unittest

from relayd.wire import TurnSends, direct_writer, lift_send_limit


def connection(case: unittest.TestCase) -> Tuple[Any, socket.socket, MemoryReactor]:
    """A twisted tcp.Connection over one end of a socket pair (a MemoryReactor records writers); the other end."""
    ours, peer = socket.socketpair()
    case.addCleanup(ours.close)
    case.addCleanup(peer.close)
    reactor = MemoryReactor()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = True
    return conn, peer, reactor


def drain(peer: socket.socket) -> bytes:
    """Everything the peer end can read now."""
    peer.setblocking(False)
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def enabled() -> TurnSends:
    sends = TurnSends()
    sends.enabled = True
    return sends


class TurnSendsTests(unittest.TestCase):
    def test_held_until_flush_then_sent_without_registering(self) -> None:
        """Nothing leaves before the turn ends; then it is sent at once, no writer registered either time."""
        conn, peer, reactor = connection(self)
        sends = enabled()
        write = sends.writer(conn)
        write(b"HTTP/1.1 202 Accepted\r\n\r\n")
        self.assertEqual(drain(peer), b"")
        self.assertNotIn(conn, reactor.writers)
        sends.flush()
        self.assertEqual(drain(peer), b"HTTP/1.1 202 Accepted\r\n\r\n")
        self.assertNotIn(conn, reactor.writers)
        self.assertEqual(conn._tempDataLen, 0)

    def test_a_later_twisted_write_goes_after_the_held_answer(self) -> None:
        """What Twisted writes on the connection after a held answer (a 400 for a bad pipelined request) follows it."""
        conn, peer, reactor = connection(self)
        sends = enabled()
        sends.writer(conn)(b"first")
        conn.write(b"second")  # Twisted's own path: buffered, registered
        sends.flush()
        received = drain(peer)
        while conn in reactor.writers:
            conn.doWrite()  # what the reactor does when the socket is writable
            received += drain(peer)
        self.assertEqual(received, b"firstsecond")

    def test_lose_connection_sends_the_held_answer_first(self) -> None:
        """A response with Connection: close: loseConnection after the held write still sends it, then closes."""
        conn, peer, reactor = connection(self)
        sends = enabled()
        sends.writer(conn)(b"answer")
        conn.loseConnection()
        sends.flush()
        self.assertIn(conn, reactor.writers)
        conn.doWrite()  # sends the buffer; then the reactor would close the connection
        self.assertEqual(drain(peer), b"answer")

    def test_what_the_kernel_refuses_waits_for_the_reactor(self) -> None:
        """Past the kernel buffer, the rest goes to Twisted's path; later writes queue behind it."""
        conn, peer, reactor = connection(self)
        sends = enabled()
        write = sends.writer(conn)
        big = bytes(range(256)) * 8192  # 2 MiB: more than a socket pair's buffer
        write(big)
        sends.flush()
        self.assertIn(conn, reactor.writers)
        write(b"tail")  # pending data: Twisted's buffer, not held
        received = drain(peer)
        while len(received) < len(big) + 4:
            conn.doWrite()
            received += drain(peer)
        self.assertEqual(received, big + b"tail")

    def test_a_lost_connection_is_skipped(self) -> None:
        """The client left before the turn ended: nothing is sent, nothing raises."""
        conn, peer, reactor = connection(self)
        sends = enabled()
        sends.writer(conn)(b"answer")
        conn.connected = False
        sends.flush()
        self.assertNotIn(conn, reactor.writers)

    def test_not_enabled_or_not_tcp_sends_at_once(self) -> None:
        """Before the reactor flushes turns (a test clock, select), and for test doubles or TLS: no holding."""
        conn, peer, _ = connection(self)
        TurnSends().writer(conn)(b"now")
        self.assertEqual(drain(peer), b"now")
        transport = StringTransport()
        self.assertEqual(enabled().writer(transport), transport.write)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["held", "twisted"]), st.binary(min_size=1, max_size=64)),
                st.tuples(st.just("held"), st.just(b"B" * (3 << 20))),  # past the kernel buffer
                st.tuples(st.sampled_from(["flush", "writable"]), st.just(b"")),
            ),
            max_size=12,
        )
    )
    def test_any_interleaving_keeps_order(self, ops: List[Tuple[str, bytes]]) -> None:
        """Held answers, Twisted's writes, turn ends and writability in any order: the peer reads them in write order."""
        ours, peer = socket.socketpair()
        try:
            reactor = MemoryReactor()
            conn = tcp.Connection(ours, Protocol(), reactor)
            conn.connected = True
            sends = enabled()
            held = sends.writer(conn)
            expected = []
            received = []
            for op, data in ops:
                if op == "held":
                    held(data)
                    expected.append(data)
                elif op == "twisted":
                    conn.write(data)
                    expected.append(data)
                elif op == "flush":
                    sends.flush()
                elif conn in reactor.writers:
                    conn.doWrite()
                received.append(drain(peer))
            sends.flush()
            want = b"".join(expected)
            got = b"".join(received) + drain(peer)
            while len(got) < len(want) and conn in reactor.writers:
                conn.doWrite()
                got += drain(peer)
            self.assertEqual(got, want)
        finally:
            ours.close()
            peer.close()


class SendLimitTests(unittest.TestCase):
    """`lift_send_limit`: one writable event sends more than Twisted's 128 KiB, order and bytes intact."""

    def test_one_send_carries_more_than_128_kib(self) -> None:
        conn, peer, reactor = connection(self)
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.assertTrue(lift_send_limit(conn))
        big = bytes(range(256)) * 2048  # 512 KiB, as a 1000-message LPUSH is ~330 KB
        conn.write(big)
        conn.doWrite()  # one writable event
        first = drain(peer)
        self.assertGreater(len(first), 128 * 1024)
        received = first
        while conn in reactor.writers and len(received) < len(big):
            conn.doWrite()
            received += drain(peer)
        self.assertEqual(received, big)

    def test_twisted_default_is_128_kib(self) -> None:
        """What the lift changes: without it, one writable event sends at most 128 KiB."""
        conn, peer, _ = connection(self)
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        conn.write(bytes(512 * 1024))
        conn.doWrite()
        self.assertEqual(len(drain(peer)), 128 * 1024)

    def test_not_tcp(self) -> None:
        """A test double (or TLS) is left alone."""
        self.assertFalse(lift_send_limit(StringTransport()))


class DirectWriteTests(unittest.TestCase):
    """`direct_writer` against a real socket: sent at once when nothing is pending, else Twisted's buffer, in order."""

    def test_sent_at_once_without_registering_for_writes(self) -> None:
        """An idle connection: the bytes are in the peer's socket before any reactor turn, no writer registered."""
        conn, peer, reactor = connection(self)
        write = direct_writer(conn)
        write(b"id: 1-0\ndata: x\n\n")
        self.assertEqual(drain(peer), b"id: 1-0\ndata: x\n\n")
        self.assertNotIn(conn, reactor.writers)

    def test_what_the_kernel_refuses_is_buffered_and_order_kept(self) -> None:
        """Past the kernel buffer the rest goes to Twisted's buffer; later writes queue behind it, never overtake."""
        conn, peer, reactor = connection(self)
        write = direct_writer(conn)
        big = bytes(range(256)) * 8192  # 2 MiB: more than a socket pair's buffer
        write(big)
        self.assertIn(conn, reactor.writers)  # the rest waits for writability
        write(b"tail")
        received = drain(peer)
        while len(received) < len(big) + 4:
            conn.doWrite()  # what the reactor does when the socket is writable
            received += drain(peer)
        self.assertEqual(received, big + b"tail")

    def test_other_transports_use_their_own_write(self) -> None:
        """A transport that is not plain TCP (a test double, TLS) is written through its write()."""
        transport = StringTransport()
        self.assertEqual(direct_writer(transport), transport.write)

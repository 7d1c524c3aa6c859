"""Each Twisted private API relayd relies on, checked against the installed Twisted.

If one of these fails after a Twisted upgrade, the message names the
private and relayd/compat.py is the one file to adapt.

test-case-name: tests.test_compat
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import unittest

from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel

from relayd import compat


def _owner(dotted: str) -> object:
    """The module or class a dotted name refers to."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


class PrivateNamesTests(unittest.TestCase):
    """Every private name listed in `compat.PRIVATE_NAMES` still exists."""

    def test_all_exist(self):
        """Missing privates are named in the failure message."""
        missing = []
        for owner, name in compat.PRIVATE_NAMES:
            obj = _owner(owner)
            if name in ("_path", "_rawHeaders", "_poller", "_selectables"):  # instance attributes: checked behaviourally below
                continue
            if not hasattr(obj, name):
                missing.append(f"{owner}.{name}")
        self.assertEqual(missing, [], "Twisted privates gone; adapt relayd/compat.py")


class HeaderMapTests(unittest.TestCase):
    """`header_map` is the parsed headers by canonical name, as `getRawHeaders` reads them."""

    def test_canonical_names(self):
        """Headers added in any case are found under their canonical name, values in order."""
        from twisted.web.http_headers import Headers

        headers = Headers()
        headers.addRawHeader(b"content-type", b"application/json")
        headers.addRawHeader(b"IDEMPOTENCY-KEY", b"a")
        headers.addRawHeader(b"idempotency-key", b"b")
        raw = compat.header_map(headers)
        self.assertEqual(raw.get(b"Content-Type"), [b"application/json"])
        self.assertEqual(raw.get(b"Idempotency-Key"), [b"a", b"b"])
        self.assertEqual(raw.get(b"Idempotency-Key"), headers.getRawHeaders(b"idempotency-key"))
        self.assertIsNone(raw.get(b"Relayd-Ack"))


class LeanDispatchTests(unittest.TestCase):
    """`lean_dispatch`: the epoll loop still delivers data, and a protocol's error still disconnects it."""

    def _run(self, server_protocol, turn_end=None):
        """Run a fresh (not installed) epoll reactor with lean dispatch: one client sends b"ping"."""
        from twisted.internet.epollreactor import EPollReactor
        from twisted.internet.protocol import ClientFactory

        reactor = EPollReactor()
        self.assertTrue(compat.lean_dispatch(reactor, turn_end))
        seen = {"client_lost": False}
        factory = Factory.forProtocol(server_protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                seen["reply"] = data
                self.transport.loseConnection()

            def connectionLost(self, reason):
                seen["client_lost"] = True
                reactor.stop()

        client_factory = ClientFactory.forProtocol(Client)
        reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        reactor.callLater(20, reactor.stop)  # a hang fails below, not forever
        reactor.run(installSignalHandlers=False)
        port.stopListening()
        return seen

    def test_round_trip(self):
        """Bytes go both ways through the lean loop."""

        class Echo(Protocol):
            def dataReceived(self, data):
                self.transport.write(data)

        seen = self._run(Echo)
        self.assertEqual(seen.get("reply"), b"ping")
        self.assertTrue(seen["client_lost"])

    def test_turn_end_sends_held_answers(self):
        """With a turn-end hook, an answer held by `relayd.wire.TurnSends` reaches the client after the turn."""
        from relayd.wire import TurnSends

        sends = TurnSends()
        sends.enabled = True
        calls = []

        def turn_end():
            calls.append(len(sends._held))
            sends.flush()

        class HeldEcho(Protocol):
            def connectionMade(self):
                self.send = sends.writer(self.transport)

            def dataReceived(self, data):
                self.send(data)

        seen = self._run(HeldEcho, turn_end)
        self.assertEqual(seen.get("reply"), b"ping")
        self.assertIn(1, calls)  # the hook found the held answer after the turn that read the request

    def test_protocol_error_disconnects(self):
        """An exception in dataReceived is logged and drops that connection, as with Twisted's own loop."""
        from twisted.logger import globalLogPublisher

        errors = []

        def observer(event):
            if event.get("isError") or event.get("log_failure") is not None:
                errors.append(event)

        class Broken(Protocol):
            def dataReceived(self, data):
                raise RuntimeError("boom")

        globalLogPublisher.addObserver(observer)
        try:
            seen = self._run(Broken)
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertTrue(seen["client_lost"])
        self.assertNotIn("reply", seen)
        self.assertTrue(errors)

    def test_other_reactors_untouched(self):
        """A select reactor (or a test clock) is left as it is."""
        reactor = SelectReactor()
        self.assertFalse(compat.lean_dispatch(reactor))
        self.assertNotIn("doIteration", vars(reactor))


class ParseEndpointTests(unittest.TestCase):
    """`parse_endpoint` reads endpoint strings as `serverFromString` does."""

    def test_positional_keyword_and_escapes(self):
        """Positional and keyword arguments; ``\\:`` is an escaped colon."""
        self.assertEqual(
            compat.parse_endpoint(r"tcp6:8080:interface=\:\:1:backlog=5"),
            (["tcp6", "8080"], {"interface": "::1", "backlog": "5"}),
        )
        self.assertEqual(compat.parse_endpoint("systemd:domain=INET:index=0"), (["systemd"], {"domain": "INET", "index": "0"}))


class SystemdDescriptorsTests(unittest.TestCase):
    """`inherited_descriptors` sees what Twisted parsed from LISTEN_FDS at import."""

    def test_reads_listen_fds(self):
        """A process started with LISTEN_FDS=2 for its own pid sees fds 3 and 4 (and their names)."""
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        code = (
            "import os, sys;"
            f"os.dup2({r1}, 3); os.dup2({r2}, 4);"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='a:b');"
            "from relayd import compat;"  # Twisted parses the environment here
            "print(compat.inherited_descriptors(), sorted(compat.inherited_named_descriptors().items()))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, pass_fds=(r1, r2), timeout=60)
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        self.assertEqual(out.stdout.strip(), "[3, 4] [('a', 3), ('b', 4)]", out.stderr)

    def test_none_here(self):
        """Without socket activation the list is empty (what `systemd_fd` reports as an error)."""
        self.assertIsInstance(compat.inherited_descriptors(), list)
        self.assertIsInstance(endpoints._SystemdParser._sddaemon.inheritedDescriptors(), list)


class CloseOnlyTests(unittest.TestCase):
    """`close_only_on_stop`: a stopped port leaves other holders of its socket listening."""

    def _stop_and_probe(self, close_only: bool) -> bool:
        reactor = SelectReactor()  # a private instance, never run or installed
        self.addCleanup(reactor.disconnectAll)
        factory = Factory.forProtocol(Protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        other = socket.socket(fileno=os.dup(port.fileno()))  # another process's copy
        self.addCleanup(other.close)
        if close_only:
            compat.close_only_on_stop(port)
        port.stopListening()
        reactor.runUntilCurrent()  # the deferred connectionLost
        self.assertFalse(port.connected)
        try:
            socket.create_connection(other.getsockname(), timeout=5).close()
        except OSError:
            return False
        return True

    def test_other_holder_keeps_listening(self):
        """With it, the shared socket still accepts after this port stopped."""
        self.assertTrue(self._stop_and_probe(close_only=True))

    def test_without_it_twisted_shuts_the_socket_down(self):
        """Without it, Twisted's shutdown() stops the socket for every holder: why compat exists."""
        self.assertFalse(self._stop_and_probe(close_only=False))


class ExitSignalTests(unittest.TestCase):
    """`exit_status_zero` clears the signal twistd re-raises on exit."""

    def test_clears_the_captured_signal(self):
        """SIGTERM is captured on the reactor; after the call twistd sees none."""
        from twisted.application import app
        from twisted.internet.interfaces import _ISupportsExitSignalCapturing

        reactor = SelectReactor()
        self.addCleanup(reactor.disconnectAll)
        self.assertTrue(_ISupportsExitSignalCapturing.providedBy(reactor))
        reactor.sigTerm(15)
        self.assertEqual(reactor._exitSignal, 15)
        compat.exit_status_zero(reactor)
        self.assertIsNone(reactor._exitSignal)
        self.assertIn("reactor._exitSignal", open(app.__file__.replace(".pyc", ".py")).read())


class _Recording(compat.HookedHTTPChannel):
    def __init__(self) -> None:
        super().__init__()
        self.events: list = []

    def bad_request(self) -> None:
        self.events.append(("bad", self.received_header_size, self.received_header_count))
        super().bad_request()

    def allHeadersReceived(self) -> None:
        self.events.append(("path", self.request_path))
        super().allHeadersReceived()


class ChannelTests(unittest.TestCase):
    """`HookedHTTPChannel` sees Twisted's bad-request hook, header counters and path."""

    def _channel(self) -> tuple:
        channel = _Recording()
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def test_path_before_the_request_exists(self):
        """The request line's path is known when the headers end."""
        channel, _ = self._channel()
        channel.dataReceived(b"POST /leads?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(channel.events[0], ("path", b"/leads?x=1"))

    def test_too_many_headers(self):
        """Over maxHeaders: the hook is called with the count past the limit; Twisted's 400 is the default."""
        channel, transport = self._channel()
        channel.maxHeaders = 3
        channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n")
        self.assertEqual(len(channel.events), 1)
        kind, size, count = channel.events[0]
        self.assertEqual(kind, "bad")
        self.assertGreater(count, channel.maxHeaders)
        self.assertGreater(size, 0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))

    def test_headers_too_large(self):
        """Over totalHeadersSize: the hook sees the byte count past the limit."""
        channel, _ = self._channel()
        channel.totalHeadersSize = 64
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-A: " + b"a" * 100 + b"\r\n\r\n")
        kind, size, _count = channel.events[0]
        self.assertEqual(kind, "bad")
        self.assertGreater(size, 64)

    def test_hook_is_twisteds(self):
        """HTTPChannel still routes bad requests through the hook compat overrides."""
        self.assertTrue(callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None)))

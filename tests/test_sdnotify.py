"""systemd integration without systemd as PID 1.

* The notify protocol: a test-side ``NOTIFY_SOCKET`` datagram socket
  receives what relayd sends (``READY=1`` only once the port answers,
  ``WATCHDOG=1`` pings, ``STOPPING=1``), for one process and for the
  supervisor of two workers.
* Socket activation with ``systemd-socket-activate`` (fd 3 from
  ``LISTEN_FDS``), for workers = 1 and 2.
* ``systemd-analyze verify`` of the unit files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.task import Clock

from relayd.process.sdnotify import Notifier, child_environment
from tests.harness import REPO_ROOT, RedisServer, RelaydProcess, free_port, port_accepts, wait_for


class NotifySocket:
    """A ``NOTIFY_SOCKET`` datagram socket in a temp dir; collects messages."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.dir = tempfile.mkdtemp(prefix="relayd-notify-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        test.addCleanup(self.sock.close)
        self.messages: List[Dict[str, str]] = []

    def poll(self) -> List[Dict[str, str]]:
        """Read every pending datagram; return all messages so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            fields["_at"] = str(time.monotonic())
            self.messages.append(fields)

    def wait(self, key: str, timeout: float = 30.0) -> Dict[str, str]:
        """The first message that has `key`."""

        def found() -> Optional[Dict[str, str]]:
            return next((m for m in self.poll() if key in m), None)

        return wait_for(found, timeout, f"a {key} notification")


class EnvRelayd(RelaydProcess):
    """RelaydProcess with extra environment variables and a command prefix."""

    def __init__(self, test: unittest.TestCase, env: Dict[str, str], prefix: Sequence[str] = (), **kw: Any) -> None:
        self.extra_env = env
        self.prefix = list(prefix)
        super().__init__(test, **kw)

    @property
    def argv(self) -> List[str]:
        return self.prefix + super().argv

    def start(self, wait_ready: bool = True) -> None:
        saved = dict(os.environ)
        os.environ.update(self.extra_env)
        try:
            super().start(wait_ready=wait_ready)
        finally:
            os.environ.clear()
            os.environ.update(saved)


class NotifierUnitTests(unittest.TestCase):
    """`Notifier` against a real datagram socket and a fake clock."""

    def test_inert_without_socket(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        n = Notifier(environ={})
        self.assertFalse(n.enabled)
        self.assertFalse(n.ready())

    def test_ready_and_watchdog(self) -> None:
        """READY=1 with STATUS; WATCHDOG=1 every half WATCHDOG_USEC while healthy."""
        ns = NotifySocket(self)
        n = Notifier(environ={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "2000000"}, pid=1)
        self.addCleanup(n.close)
        self.assertTrue(n.ready("2 workers"))
        self.assertEqual(ns.wait("READY")["STATUS"], "2 workers")
        self.assertEqual(n.watchdog_interval, 1.0)
        clock = Clock()
        healthy = [True]
        n.start_watchdog(clock, lambda: healthy[0])
        clock.advance(1.0)
        healthy[0] = False
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(sum(1 for m in ns.poll() if "WATCHDOG" in m), 2)  # now=True + one tick

    def test_watchdog_pid_mismatch(self) -> None:
        """WATCHDOG_PID naming another process disables the watchdog."""
        n = Notifier(environ={"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}, pid=2)
        self.assertIsNone(n.watchdog_interval)

    def test_abstract_socket(self) -> None:
        """``@name`` addresses the abstract namespace."""
        name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind("\0" + name)
        n = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        self.addCleanup(n.close)
        self.assertTrue(n.stopping())
        self.assertEqual(s.recv(100), b"STOPPING=1")

    def test_child_environment_strips_systemd_variables(self) -> None:
        """Workers never see NOTIFY_SOCKET / LISTEN_FDS (only the main pid notifies)."""
        env = child_environment({"NOTIFY_SOCKET": "x", "LISTEN_FDS": "1", "PATH": "/bin"})
        self.assertEqual(env, {"PATH": "/bin"})


class NotifyIntegrationTests(unittest.TestCase):
    """The daemon's notifications, seen from a test-side NOTIFY_SOCKET."""

    def run_daemon(self, workers: int) -> None:
        redis = RedisServer(self)
        ns = NotifySocket(self)
        relayd = EnvRelayd(
            self,
            {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"},
            routes=[{"path": "/n", "list": "n"}],
            redis_url=redis.url,
            server={"workers": workers},
            wait_ready=False,
        )
        ready = ns.wait("READY")
        # At READY=1 the port must answer: a POST succeeds right away.
        self.assertTrue(port_accepts(relayd.ingest_port))
        resp = relayd.post("/n", b'{"after": "ready"}', timeout=10.0)
        self.assertEqual(resp[0], 200, resp)
        status = relayd.get_admin("/readyz")
        self.assertEqual(status[0], 200, status)
        before = [m for m in ns.poll() if m["_at"] < ready["_at"]]
        self.assertFalse(any("READY" in m for m in before))
        ns.wait("WATCHDOG")
        wait_for(lambda: sum(1 for m in ns.poll() if "WATCHDOG" in m) >= 2, 30.0, "a second watchdog ping")
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())
        ns.wait("STOPPING")

    def test_single_process(self) -> None:
        """workers = 1: READY=1 after the port answers, watchdog pings, STOPPING=1 on SIGTERM."""
        self.run_daemon(1)

    def test_supervisor(self) -> None:
        """workers = 2: READY=1 from the supervisor once both workers listen; watchdog; STOPPING=1."""
        self.run_daemon(2)


@unittest.skipUnless(shutil.which("systemd-socket-activate"), "systemd-socket-activate not installed")
class SocketActivationTests(unittest.TestCase):
    """``listen = "systemd:domain=INET:index=0"`` with the socket from systemd-socket-activate."""

    def run_activated(self, workers: int) -> None:
        redis = RedisServer(self)
        port = free_port()
        relayd = EnvRelayd(
            self,
            {},
            prefix=[
                "systemd-socket-activate",
                "-l",
                f"127.0.0.1:{port}",
                # Twisted ignores activated fds without LISTEN_FDNAMES
                # (systemd >= 227 always sets it; this tool only when asked).
                "--fdname=ingest",
                f"--setenv=PYTHONPATH={REPO_ROOT}",
                "--setenv=PYTHONUNBUFFERED=1",
            ],
            routes=[{"path": "/sa", "list": "sa"}],
            redis_url=redis.url,
            server={"workers": workers, "listen": "systemd:domain=INET:index=0"},
            wait_ready=False,
            ingest_port=port,
        )
        # systemd-socket-activate execs relayd on the first connection.
        wait_for(lambda: port_accepts(port), 10.0, "systemd-socket-activate to listen")
        relayd.wait_ready()
        for i in range(20):
            resp = relayd.post("/sa", b'{"i": %d}' % i, keep_alive=False)
            self.assertEqual(resp[0], 200, resp)
        wait_for(lambda: redis.llen("sa") == 20, 10.0, "20 messages in Redis")
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())

    def test_single_process(self) -> None:
        """workers = 1 serves on the activated socket."""
        self.run_activated(1)

    def test_two_workers_share_the_activated_socket(self) -> None:
        """workers = 2: both workers accept from the one activated socket."""
        self.run_activated(2)


@unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze not installed")
class UnitFileTests(unittest.TestCase):
    """The shipped unit files pass ``systemd-analyze verify``."""

    def test_verify(self) -> None:
        """relayd.service and relayd.socket verify cleanly (ExecStart pointed at this checkout's twistd)."""
        tmp = tempfile.mkdtemp(prefix="relayd-unit-")
        self.addCleanup(shutil.rmtree, tmp, True)
        twistd = os.path.join(os.path.dirname(os.sys.executable), "twistd")
        for name in ("relayd.service", "relayd.socket"):
            with open(os.path.join(REPO_ROOT, "etc", "systemd", name)) as f:
                text = f.read().replace("/opt/relayd/.venv/bin/twistd", twistd)
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", os.path.join(tmp, "relayd.service"), os.path.join(tmp, "relayd.socket")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stderr.strip(), "", result.stderr)

"""Real-process fixtures for black-box tests: redis-server, relayd, an oracle.

Nothing here is a mock.  `RedisServer` runs the real ``redis-server`` binary
on a free port; `RelaydProcess` runs ``twistd -n relayd`` from this checkout
with a generated TOML config; `RespClient` is a tiny binary-safe RESP2 client
so the tests depend on no Redis library; `Oracle` is the fault-test checker
of the conventions (an id counts as acknowledged only after a 2xx).

Every wait is a poll of a condition against a bounded deadline (`wait_for`),
never a fixed sleep.  Fixtures take a ``unittest.TestCase`` and register their
own cleanup with ``addCleanup``, so no process outlives its test even when the
test fails half-way.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import (
    Any,
)

#: The checkout this file lives in (``tests/..``): relayd and its plugin.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Seconds redis-server gets to answer PING after start (it needs ~10 ms; a loaded box is slower).
REDIS_START_TIMEOUT = 30.0
#: Seconds relayd gets to report ready: Python + Twisted imports take ~1 s on
#: a quiet machine; shared CI cores can be several times slower.
RELAYD_START_TIMEOUT = 30.0
#: Starts with freshly chosen ports when a daemon finds its port taken (auto-chosen ports only).
PORT_ATTEMPTS = 3
#: Seconds a process gets to exit after SIGTERM before the fixture SIGKILLs it.
STOP_TIMEOUT = 30.0
#: Per-request socket timeout of the HTTP client, seconds.
HTTP_TIMEOUT = 30.0
#: ``RELAYD_TEST_KEEP=1`` keeps relayd's and redis-server's temp dirs (config,
#: logs, spool) after each test, to read what a daemon did in a failed run.
KEEP_TEMP = os.environ.get("RELAYD_TEST_KEEP") == "1"

Headers = dict[str, str]
Response = tuple[int, Headers, bytes]


class TimeoutExpired(AssertionError):
    """A polled condition did not become true before its deadline."""


class _PortTaken(AssertionError):
    """A daemon could not bind a port `free_port` chose: another process took it meanwhile."""


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.01,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until it returns a truthy value; return that value.

    Exceptions from `condition` count as "not yet".  Raises `TimeoutExpired`
    naming `what` (and the last exception, if any) after `timeout` seconds,
    followed by ``explain()`` when given (e.g. relayd's metrics and log tail,
    so a failure in CI says what the daemon was doing).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - "not yet" for any reason
            last_error = e
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            if explain is not None:
                try:
                    suffix += f"\n{explain()}"
                except Exception as e:  # noqa: BLE001 - the explanation must not hide the timeout
                    suffix += f"\n(explain failed: {e!r})"
            raise TimeoutExpired(f"timed out after {timeout:.1f}s waiting for {what}{suffix}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def remove_later(test: unittest.TestCase, path: str) -> None:
    """Delete the temp dir `path` at the test's cleanup (kept, and named on stderr, with RELAYD_TEST_KEEP=1)."""
    if KEEP_TEMP:
        test.addCleanup(lambda: print(f"\n[kept {path} for {test.id()}]", file=sys.stderr))
    else:
        test.addCleanup(shutil.rmtree, path, True)


class _PortLedger:
    """The ports `free_port` handed out in this test run, so none is handed out twice.

    Linux picks a port for ``bind(port 0)`` at a random offset each time, so
    two calls can return the same just-released port (about 1 in 14,000 per
    pair); a relayd whose admin port equals its Redis's port (or another
    test's daemon still running) fails to start, or worse, the harness talks
    to the wrong process.  With a few ports per test over hundreds of tests,
    that was a percent-level chance per CI run.
    """

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.lock = threading.Lock()


_PORTS = _PortLedger()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and was not handed out before in this run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _PORTS.lock:
            if port not in _PORTS.used:
                _PORTS.used.add(port)
                return port


def _redis_answers(url: str) -> bool:
    """True if the Redis at ``redis://host:port/...`` answers PING now (not down, not SIGSTOPped)."""
    parsed = urllib.parse.urlsplit(url)
    try:
        with RespClient(parsed.hostname or "127.0.0.1", parsed.port or 6379, timeout=1.0) as c:
            return c.command("PING") == "PONG"
    except (OSError, RedisError, ConnectionError):
        return False


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP `port` (any address), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # local_address is ADDR:PORT in hex; state 0A is LISTEN
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            pass
    return inodes


def process_listens(pid: int, port: int) -> bool:
    """True if process `pid` holds a socket listening on TCP `port` (Linux /proc).

    `port_accepts` or an HTTP answer only proves that *something* listens
    there; on a shared machine that can be another test's daemon.
    """
    inodes = listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on `host:port` right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# RESP client
# --------------------------------------------------------------------------


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RespClient:
    """A minimal synchronous, binary-safe RESP2 client: `command(*args)`.

    Replies map to Python as: simple string -> ``str``, error -> raised
    `RedisError`, integer -> ``int``, bulk string -> ``bytes`` (``None`` for
    nil), array -> ``list`` (``None`` for a nil array).
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._sock.makefile("rb")

    @staticmethod
    def _encode(arg: Any) -> bytes:
        if isinstance(arg, bytes):
            return arg
        if isinstance(arg, str):
            return arg.encode("utf-8")
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return repr(arg).encode()
        raise TypeError(f"cannot send {type(arg).__name__} to Redis")

    def send(self, *args: Any) -> None:
        """Write one command without reading its reply (for pipelining)."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = self._encode(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))

    def read_reply(self) -> Any:
        """Read one reply."""
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("Redis closed the connection mid-reply")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            items = []
            for _ in range(n):
                try:
                    items.append(self.read_reply())
                except RedisError as e:  # an error inside EXEC's array
                    items.append(e)
            return items
        raise ConnectionError(f"unexpected RESP reply: {line!r}")

    def command(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        self.send(*args)
        return self.read_reply()

    def close(self) -> None:
        """Close the connection."""
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> RespClient:  # noqa: PYI034 - 3.9 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1, without persistence, in a temp dir."""

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"

    def __init__(self, test: unittest.TestCase, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)  # e.g. cluster mode (tests/cluster_harness.py), AOF
        self.dir = tempfile.mkdtemp(prefix="relayd-redis-")
        self.proc: subprocess.Popen | None = None
        self._paused = False
        remove_later(test, self.dir)
        test.addCleanup(self._cleanup)
        for attempt in range(PORT_ATTEMPTS if port is None else 1):
            try:
                self.start()
                return
            except _PortTaken:
                if port is not None or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()  # another process took ours between free_port and bind

    @property
    def url(self) -> str:
        """The ``redis://`` URL relayd's config takes."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING (the constructor already did: this is for after `stop`)."""
        if self.proc is not None and self.proc.poll() is None:
            # A second redis-server on our port would exit at once while PING was answered by the
            # first, which no cleanup then stopped (a leaked process per call).
            raise AssertionError(f"redis-server on port {self.port} is already running")
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *self.extra_args,
            ],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._paused = False

        proc = self.proc

        def pong() -> bool:
            if proc.poll() is not None:
                return True  # exited: judged below
            with self.client(timeout=1.0) as c:
                # Our server, not another one on this port (which would answer PING as well).
                return f"process_id:{proc.pid}\r\n" in c.command("INFO", "server").decode()

        try:
            wait_for(pong, REDIS_START_TIMEOUT, f"redis-server on port {self.port} to answer PING")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_text()[-2000:]}") from None
        if proc.poll() is not None:
            self._log.close()
            if "Address already in use" in self.log_text():
                raise _PortTaken(self.port)
            raise AssertionError(f"redis-server exited {proc.returncode}:\n{self.log_text()[-2000:]}")

    def client(self, timeout: float = 10.0) -> RespClient:
        """A new connection to this server (close it, or use ``with``)."""
        return RespClient("127.0.0.1", self.port, timeout=timeout)

    def command(self, *args: Any) -> Any:
        """One command on a fresh connection."""
        with self.client() as c:
            return c.command(*args)

    def llen(self, key: str) -> int:
        """``LLEN key``."""
        return int(self.command("LLEN", key))

    def items(self, list_key: str) -> list[bytes]:
        """The list's items oldest first (RPOP order), without removing them."""
        return list(reversed(self.command("LRANGE", list_key, 0, -1)))

    def drain(self, list_key: str) -> list[bytes]:
        """Atomically take every item of the list; oldest first (RPOP order)."""
        with self.client() as c:
            c.send("MULTI")
            c.send("LRANGE", list_key, 0, -1)
            c.send("DEL", list_key)
            c.send("EXEC")
            for _ in range(3):  # +OK, +QUEUED, +QUEUED
                c.read_reply()
            newest_first, _deleted = c.read_reply()
        return list(reversed(newest_first))

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> int:
        """SIGTERM (after SIGCONT if paused); wait; return the exit code."""
        if self.proc is None:
            return 0
        if self._paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self._paused = False
        self._log.close()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port; data is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.start()

    def log_text(self) -> str:
        """The server's log."""
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL works on a stopped process too
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


# --------------------------------------------------------------------------
# relayd
# --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(
    tables: Mapping[str, Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]],
    counters: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Render ``{table: {key: value}}`` plus ``[[route]]`` (and ``[[counter]]``) entries as TOML.

    A table whose value is a list of tables (``tomllib``'s reading of
    ``[[counter]]``) is written back as an array of tables.
    """
    lines: list[str] = []
    for name, table in tables.items():
        if isinstance(table, list):
            for entry in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in entry.items())
                lines.append("")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    for route in routes:
        lines.append("[[route]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in route.items())
        lines.append("")
    for counter in counters:
        lines.append("[[counter]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in counter.items())
        lines.append("")
    return "\n".join(lines)


def twistd_command() -> list[str]:
    """The argv prefix that runs twistd from the same interpreter as the tests."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class RelaydProcess:
    """``twistd -n relayd --config <tmp>/relayd.conf`` as a child process.

    `routes` are ``[[route]]`` tables; `server`, `spool`, `redis`, `buffer`
    add or override keys of those tables; `extra_args` follow ``--config``.
    `counters` are ``[[counter]]`` tables.
    `config_text`, when given, is written verbatim instead (bad-config tests).  Ports are chosen free on
    127.0.0.1 unless given.  With ``wait_ready=True`` the constructor returns
    once ``GET /readyz`` on the admin port answers 200.
    """

    def __init__(
        self,
        test: unittest.TestCase,
        routes: Sequence[Mapping[str, Any]] = (),
        redis_url: str | None = "redis://127.0.0.1:6379/0",
        spool_dir: str | None = None,
        server: Mapping[str, Any] | None = None,
        spool: Mapping[str, Any] | None = None,
        redis: Mapping[str, Any] | None = None,
        buffer: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | None = None,
        config_text: str | None = None,
        files: Mapping[str, Any] | None = None,
        wait_ready: bool = True,
        ingest_port: int | None = None,
        admin_port: int | None = None,
        extra_args: Sequence[str] = (),
        counters: Sequence[Mapping[str, Any]] = (),
        extra_toml: str = "",
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="relayd-")
        self.counters = list(counters)
        remove_later(test, self.dir)
        test.addCleanup(self._cleanup)
        self.ingest_port = ingest_port or free_port()
        self.admin_port = admin_port or free_port()
        self.proc: subprocess.Popen | None = None
        self._conn: http.client.HTTPConnection | None = None
        self.extra_args = list(extra_args)
        for name, content in (files or {}).items():
            self.write_file(name, content)
        if config_text is None:
            tables: dict[str, dict[str, Any]] = {
                "server": {
                    "listen": f"tcp:{self.ingest_port}:interface=127.0.0.1",
                    "admin": f"tcp:{self.admin_port}:interface=127.0.0.1",
                    "workers": 1,
                    **(server or {}),
                },
                # redis_url=None: no url (a cluster's seeds come in `redis`)
                "redis": {**({"url": redis_url} if redis_url else {}), **(redis or {})},
                "spool": {"dir": spool_dir or os.path.join(self.dir, "spool"), "fsync": "batch", **(spool or {})},
            }
            if buffer:
                tables["buffer"] = dict(buffer)
            if limits:
                tables["limits"] = dict(limits)
            self.tables = tables
            config_text = to_toml(tables, routes, self.counters) + extra_toml
        self.extra_toml = extra_toml
        self.config_path = self.write_file("relayd.conf", config_text)
        # Ports this harness chose (and wrote into a config it generated) can be chosen again.
        listen, admin = f"tcp:{self.ingest_port}:interface=127.0.0.1", f"tcp:{self.admin_port}:interface=127.0.0.1"
        server_table = self.tables["server"] if hasattr(self, "tables") else {}  # only a generated config
        movable = (
            wait_ready
            and ingest_port is None
            and admin_port is None
            and server_table.get("listen") == listen
            and server_table.get("admin") == admin
        )
        for attempt in range(PORT_ATTEMPTS if movable else 1):
            try:
                self.start(wait_ready=wait_ready)
                if wait_ready and redis_url and _redis_answers(redis_url):
                    self.wait_redis()
                return
            except _PortTaken:
                if not movable or attempt == PORT_ATTEMPTS - 1:
                    raise
            # Another process took a port between free_port() and relayd's bind: new ports, same test.
            self._close_files()
            for name in ("stdout.log", "stderr.log"):
                path = os.path.join(self.dir, name)
                if os.path.exists(path):
                    os.rename(path, f"{path}.port-taken-{attempt}")
            self.ingest_port, self.admin_port = free_port(), free_port()
            self.tables["server"]["listen"] = f"tcp:{self.ingest_port}:interface=127.0.0.1"
            self.tables["server"]["admin"] = f"tcp:{self.admin_port}:interface=127.0.0.1"
            self.write_file("relayd.conf", to_toml(self.tables, routes, self.counters) + extra_toml)

    def write_file(self, name: str, content: Any) -> str:
        """Write a file into the temp dir (dicts/lists as JSON); return its path."""
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not isinstance(content, (str, bytes)):
            content = json.dumps(content, indent=2)
        if isinstance(content, str):
            content = content.encode("utf-8")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def rewrite_config(self, routes: Sequence[Mapping[str, Any]], extra_toml: str | None = None) -> None:
        """Rewrite the config file with the same tables and new routes (for SIGHUP)."""
        if extra_toml is not None:
            self.extra_toml = extra_toml
        self.write_file("relayd.conf", to_toml(self.tables, routes, self.counters) + getattr(self, "extra_toml", ""))

    @property
    def argv(self) -> list[str]:
        """The command line relayd runs with."""
        return twistd_command() + ["-n", "--pidfile=", "relayd", "--config", self.config_path, *self.extra_args]

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start(self, wait_ready: bool = True) -> None:
        """Start the daemon; optionally wait for ``/readyz`` to answer 200."""
        self._drop_connection()
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self._stdout = open(os.path.join(self.dir, "stdout.log"), "ab")  # noqa: SIM115 - lives as long as the child
        self._stderr = open(os.path.join(self.dir, "stderr.log"), "ab")  # noqa: SIM115 - lives as long as the child
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = RELAYD_START_TIMEOUT) -> None:
        """Wait for ``GET /readyz`` == 200; raise with the log's tail if not."""

        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                return True  # exited: judged below
            # This relayd's answer: on a shared machine another daemon can sit on a port we chose.
            return self.get_admin("/readyz", timeout=5.0)[0] == 200 and process_listens(proc.pid, self.admin_port)

        try:
            wait_for(ready, timeout, f"relayd (admin port {self.admin_port}) to answer /readyz 200")
        except TimeoutExpired as e:
            raise AssertionError(f"{e}; log tail:\n{self.log_tail()}") from None
        if proc.poll() is not None:
            message = f"relayd exited with {proc.returncode} before ready; log tail:\n{self.log_tail()}"
            if "Address already in use" in self.log_text():
                raise _PortTaken(message)
            raise AssertionError(message)

    def wait_redis(self, timeout: float = RELAYD_START_TIMEOUT) -> None:
        """Wait until relayd's Redis connection is up (``relayd_redis_up 1``; the minimum over workers).

        /readyz means "can store", which the spool alone satisfies: right
        after it, a stored POST may be answered from the spool and reach
        Redis only when the connection comes up, and subscriptions and reply
        routes answer 503.  The constructor calls this when the test's Redis
        answers PING, so a test starts with messages flowing straight to Redis.
        """

        def up() -> bool:
            status, _headers, body = self.get_admin("/metrics", timeout=5.0)
            return status == 200 and any(line == "relayd_redis_up 1.0" for line in body.decode().splitlines())

        wait_for(up, timeout, "relayd's Redis connection (relayd_redis_up 1)", explain=lambda: self.log_tail())

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.ingest_port, timeout=timeout)
        self._conn.timeout = timeout
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = HTTP_TIMEOUT,
        keep_alive: bool = True,
    ) -> Response:
        """One HTTP request to the ingest port; ``(status, headers, body)``.

        Header names in the result are lower-case.  The connection is reused
        while the server keeps it open; a request is never retried (a POST
        that may have reached the server must not be sent twice unnoticed).
        """
        conn = (
            self._connection(timeout)
            if keep_alive
            else http.client.HTTPConnection("127.0.0.1", self.ingest_port, timeout=timeout)
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
            result = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            if resp.will_close or not keep_alive:
                conn.close()
                if keep_alive:
                    self._conn = None
            return result
        except BaseException:
            conn.close()
            if keep_alive:
                self._conn = None
            raise

    def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
        """``POST path`` with `body` (``Content-Type: application/json`` unless given)."""
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return self.request("POST", path, body, h, **kw)

    def get_admin(self, path: str, timeout: float = HTTP_TIMEOUT) -> Response:
        """``GET path`` on the admin port (a fresh connection each time)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def signal(self, signum: int) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; return its exit code (fail on timeout)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"relayd still running {timeout:.0f}s later; log tail:\n{self.log_tail()}") from None
        finally:
            self._close_files()

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, return the exit code."""
        self._drop_connection()
        if self.alive():
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self._drop_connection()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self._close_files()

    def restart(self, wait_ready: bool = True) -> int:
        """SIGTERM, then start again with the same config and ports."""
        code = self.terminate()
        self.start(wait_ready=wait_ready)
        return code

    def _close_files(self) -> None:
        for f in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if f is not None and not f.closed:
                f.close()

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stdout_text(self) -> str:
        """What the daemon wrote to stdout (twistd -n logs there)."""
        return self._read("stdout.log")

    def stderr_text(self) -> str:
        """What the daemon wrote to stderr."""
        return self._read("stderr.log")

    def log_text(self) -> str:
        """stdout, stderr and twistd.log (if any) together."""
        return "".join(
            f"--- {name} ---\n{self._read(name)}"
            for name in ("stdout.log", "stderr.log", "twistd.log")
            if os.path.exists(os.path.join(self.dir, name))
        )

    def log_tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of `log_text`."""
        return self.log_text()[-chars:]

    def _cleanup(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self._close_files()
        self.assert_no_unhandled_errors()

    #: Set to True by a test that provokes a traceback on purpose.
    allow_tracebacks = False

    def assert_no_unhandled_errors(self) -> None:
        """Fail the test if relayd logged an unhandled Deferred error or any traceback.

        Runs at cleanup for every daemon a test started: an error nobody
        handled is a bug even when the test's own assertions passed.
        """
        if self.allow_tracebacks:
            return
        text = self.log_text()
        for marker in ("Unhandled error in Deferred", "Traceback (most recent call last)"):
            at = text.find(marker)
            if at != -1:
                raise AssertionError(f"relayd logged {marker!r}:\n{text[max(0, at - 500) : at + 3000]}")


# --------------------------------------------------------------------------
# JSON responses and the fault-test oracle
# --------------------------------------------------------------------------


def json_body(response: Response) -> Any:
    """Parse a response body as JSON (fails the test with the body if not)."""
    status, _headers, body = response
    try:
        return json.loads(body)
    except ValueError:
        raise AssertionError(f"status {status}: body is not JSON: {body[:500]!r}") from None


def decode_item(item: bytes) -> tuple[dict[str, Any] | None, Any]:
    """Split a Redis item into ``(envelope or None, body value)``.

    An envelope is a JSON object with ``id`` and ``body``; anything else is a
    raw body (``format = "body"``), parsed as JSON when it is JSON.
    """
    try:
        value = json.loads(item)
    except ValueError:
        return None, item
    if isinstance(value, dict) and "id" in value and "body" in value:
        return value, value["body"]
    return None, value


class OracleReport:
    """What `Oracle.check` found: counts, and the problems as text."""

    def __init__(self) -> None:
        self.items = 0
        self.unique = 0
        self.duplicates = 0
        self.missing: list[str] = []
        self.unknown: list[str] = []
        self.mismatched: list[str] = []
        self.undecodable: list[bytes] = []

    def problems(self) -> list[str]:
        """Human-readable list of violations (empty when all is well)."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} acknowledged message(s) missing from Redis, e.g. {self.missing[:5]}")
        if self.unknown:
            out.append(f"{len(self.unknown)} item(s) in Redis that were never sent, e.g. {self.unknown[:5]}")
        if self.mismatched:
            out.append(f"{len(self.mismatched)} payload/id mismatch(es), e.g. {self.mismatched[:5]}")
        if self.undecodable:
            out.append(f"{len(self.undecodable)} undecodable item(s), e.g. {self.undecodable[:3]!r}")
        return out


class Oracle:
    """Client-side truth for fault tests.

    Every message carries a client id (``cid``) in its JSON body.  `send`
    records a message as sent before the request goes out; `acknowledge`
    records it (with relayd's id) only after a 2xx.  `check` drains the Redis
    list and asserts: every acknowledged message is there, nothing is there
    that was never sent, payloads are byte-for-byte what was sent, envelope
    ids equal the acknowledged ids; it returns the report (duplicates counted
    by ``cid``; at-least-once allows some).
    """

    def __init__(self, route: str = "") -> None:
        self.route = route
        self.run = uuid.uuid4().hex[:8]
        self.sent: dict[str, Any] = {}
        self.acked: dict[str, str] = {}  # cid -> relayd id
        self.errors: list[str] = []  # transport errors of `post`
        self.rejected: list[tuple[str, int, bytes]] = []  # (cid, status, body) of non-2xx answers to `post`
        self._n = 0
        self._lock = threading.Lock()

    def new_message(self, **extra: Any) -> tuple[str, Any]:
        """A fresh unique message body (a JSON object) and its cid (thread-safe)."""
        with self._lock:
            self._n += 1
            n = self._n
        cid = f"{self.run}-{n:07d}"
        return cid, {"cid": cid, "n": n, **extra}

    def send(self, cid: str, body: Any) -> None:
        """Record that `body` is about to be sent."""
        self.sent[cid] = body

    def acknowledge(self, cid: str, message_id: str) -> None:
        """Record a 2xx for `cid` carrying relayd's `message_id`."""
        assert cid in self.sent, f"acknowledging {cid} that was never sent"
        self.acked[cid] = message_id

    def post(
        self,
        relayd: RelaydProcess,
        path: str,
        *,
        keep_alive: bool = True,
        timeout: float = HTTP_TIMEOUT,
        **extra: Any,
    ) -> Response | None:
        """Send one new message; acknowledge it on 2xx.

        Returns the response, or None on a transport error (recorded in
        `errors`; the message may or may not have arrived).  Non-2xx
        statuses are recorded in `rejected`.
        """
        cid, body = self.new_message(**extra)
        self.send(cid, body)
        try:
            resp = relayd.post(path, json.dumps(body).encode(), keep_alive=keep_alive, timeout=timeout)
        except (OSError, http.client.HTTPException) as e:
            self.errors.append(f"{cid}: {e!r}")
            return None
        if 200 <= resp[0] < 300:
            self.acknowledge(cid, json_body(resp)["id"])
        else:
            self.rejected.append((cid, resp[0], resp[2][:300]))
        return resp

    def cids_in(self, redis: RedisServer, list_key: str) -> set[str]:
        """The cids currently in the list (without draining it)."""
        out = set()
        for item in redis.items(list_key):
            _envelope, body = decode_item(item)
            if isinstance(body, dict) and isinstance(body.get("cid"), str):
                out.add(body["cid"])
        return out

    def all_acknowledged_in(self, redis: RedisServer, list_key: str) -> bool:
        """True once every acknowledged message is in the list (for polling)."""
        return set(self.acked) <= self.cids_in(redis, list_key)

    def check(self, redis: RedisServer, list_key: str) -> OracleReport:
        """Drain `list_key` and compare with what was sent and acknowledged."""
        report = OracleReport()
        seen: dict[str, int] = {}
        for item in redis.drain(list_key):
            report.items += 1
            envelope, body = decode_item(item)
            cid = body.get("cid") if isinstance(body, dict) else None
            if not isinstance(cid, str):
                report.undecodable.append(item)
                continue
            seen[cid] = seen.get(cid, 0) + 1
            if cid not in self.sent:
                report.unknown.append(cid)
                continue
            if body != self.sent[cid]:
                report.mismatched.append(f"{cid}: sent {self.sent[cid]!r}, got {body!r}")
            if envelope is not None and cid in self.acked and envelope["id"] != self.acked[cid]:
                report.mismatched.append(f"{cid}: acknowledged id {self.acked[cid]}, envelope id {envelope['id']}")
            if envelope is not None and self.route and envelope.get("route") != self.route:
                report.mismatched.append(f"{cid}: route {envelope.get('route')!r}, expected {self.route!r}")
        report.unique = len(seen)
        report.duplicates = sum(n - 1 for n in seen.values())
        report.missing = sorted(cid for cid in self.acked if cid not in seen)
        return report

    def assert_ok(
        self, test: unittest.TestCase, redis: RedisServer, list_key: str, max_duplicates: int = 0
    ) -> OracleReport:
        """`check`, then fail `test` on any violation or too many duplicates."""
        report = self.check(redis, list_key)
        problems = report.problems()
        if report.duplicates > max_duplicates:
            problems.append(f"{report.duplicates} duplicate(s), at most {max_duplicates} allowed")
        if problems:
            test.fail(
                f"oracle: {len(self.sent)} sent, {len(self.acked)} acknowledged, {report.items} in Redis; "
                + "; ".join(problems)
            )
        return report


def ndjson(values: Iterable[Any]) -> bytes:
    """Encode values as NDJSON (one JSON value per line, trailing newline)."""
    return b"".join(json.dumps(v).encode() + b"\n" for v in values)

"""Fixtures of the delivery tests: the upstream process and ``[[deliver]]`` TOML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Any, Dict, List, Mapping, Optional

from tests.harness import RedisServer, RelaydProcess, _toml_value, free_port, port_accepts, wait_for

UPSTREAM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deliver_upstream.py")


class UpstreamProcess:
    """tests/deliver_upstream.py on a free port; its log parsed on demand."""

    def __init__(self, test: unittest.TestCase, port: Optional[int] = None, start: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="upstream-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        test.addCleanup(self.stop)
        self.port = port or free_port()
        self.log_path = os.path.join(self.dir, "requests.jsonl")
        self.proc: Optional[subprocess.Popen] = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        """The URL relayd delivers to."""
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        """Run the server; return once it accepts connections."""
        self.proc = subprocess.Popen([sys.executable, UPSTREAM_SCRIPT, str(self.port), self.log_path])
        wait_for(lambda: port_accepts(self.port), 20, "the upstream to listen")

    def stop(self) -> None:
        """Kill the server (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def entries(self) -> List[Dict[str, Any]]:
        """Every logged line so far."""
        try:
            with open(self.log_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def requests(self) -> List[Dict[str, Any]]:
        """The logged requests, in arrival order."""
        return [e for e in self.entries() if "event" not in e]

    def max_open_connections(self) -> int:
        """The most connections that were open at once."""
        return max([e["open"] for e in self.entries() if e.get("event") == "conn"] or [0])

    def delivered_ids(self) -> set:
        """Idempotency keys that got a 200."""
        return {r["headers"]["idempotency-key"] for r in self.requests() if r["status"] == 200}


def deliver_toml(**deliver: Any) -> str:
    """One ``[[deliver]]`` table (``headers`` as an inline table)."""
    lines = ["", "[[deliver]]"]
    for key, value in deliver.items():
        if isinstance(value, Mapping):
            inner = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


ROUTE = {"path": "/in", "list": "leads"}


def start_relayd(test: unittest.TestCase, redis: RedisServer, toml: str, **kw: Any) -> RelaydProcess:
    """relayd with one ingest route (/in -> leads) and the given ``[[deliver]]`` tables."""
    return RelaydProcess(test, routes=[ROUTE], redis_url=redis.url, extra_toml=toml, **kw)


def envelope(mid: str, body: Any, ts: float = 1.0) -> bytes:
    """A relayd envelope as the ingest side pushes it."""
    return json.dumps(
        {"id": mid, "ts": ts, "route": "/in", "content_type": "application/json", "body": body}
    ).encode()


__all__ = [
    "UpstreamProcess", "deliver_toml", "start_relayd", "envelope", "wait_for", "free_port", "RedisServer", "ROUTE",
]


def admin_request(port: int, method: str, path: str) -> tuple:
    """One request to an admin port: ``(status, lower-case headers, body)``."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()

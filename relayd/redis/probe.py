"""The start-up check of `[redis] cluster`: does any seed answer as a cluster?

Run once by `relayd.tap.makeService` before any port is bound, with plain
blocking sockets (the reactor is not running yet).  A seed list where no
node is a cluster node (a typo'd port, a stand-alone Redis) is a config
error: the daemon exits 2 with one line, instead of starting, spilling
everything to disk and looking healthy.  A cluster that answers but is in
``fail`` state is *not* an error: relayd starts and spills, as for any
Redis outage.
"""

from __future__ import annotations

import socket
from typing import List, Optional, Tuple

from relayd.config import RedisConfig

PROBE_TIMEOUT = 2.0  # seconds per seed: a start-up check, not a wait for a slow cluster


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _read_reply(f) -> Tuple[bool, bytes]:  # type: ignore[no-untyped-def]
    """(ok, text) of one simple, error or bulk reply (all CLUSTER INFO and AUTH give)."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"-":
        return False, rest
    if kind == b"$":
        n = int(rest)
        return True, (f.read(n + 2)[:-2] if n >= 0 else b"")
    return True, rest


def probe_seed(host: str, port: int, config: RedisConfig, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None when the node at host:port is a cluster node, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as f:
            if config.password is not None:
                auth = [config.username.encode(), config.password.encode()] if config.username else [config.password.encode()]
                sock.sendall(_command(b"AUTH", *auth))
                ok, text = _read_reply(f)
                if not ok:
                    return f"AUTH failed: {text.decode('utf-8', 'replace')}"
            sock.sendall(_command(b"CLUSTER", b"INFO"))
            ok, text = _read_reply(f)
    except OSError as e:
        return f"cannot connect ({e.strerror or e})"
    if not ok:
        return f"not a cluster node ({text.decode('utf-8', 'replace')})"
    return None


def probe_cluster(config: RedisConfig, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None when some seed answers as a cluster node; else one line naming each seed's answer."""
    reasons: List[str] = []
    for host, port in config.cluster:
        reason = probe_seed(host, port, config, timeout)
        if reason is None:
            return None
        reasons.append(f"{host}:{port}: {reason}")
    return "redis.cluster: no seed answers as a Redis Cluster node: " + "; ".join(reasons)

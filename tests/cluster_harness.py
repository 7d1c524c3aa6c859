"""A real local Redis Cluster for tests: N primaries + N replicas on free ports.

Built from Debian's ``redis-server`` and ``redis-cli`` (already what
`tests/harness.RedisServer` runs): each node is a `RedisServer` with
``--cluster-enabled yes``; ``redis-cli --cluster create ... --cluster-replicas``
assigns slots and replicas; the fixture returns once every live node says
``cluster_state:ok`` and agrees on the owner of every slot.

`RedisCluster` also looks like a `RedisServer` where the oracle needs it
(`items`, `drain`, `llen` of a list go to the list's current primary), so
`tests.harness.Oracle.check(cluster, key)` works unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import unittest
from typing import Any

from tests.harness import RedisError, RedisServer, RespClient, free_port, wait_for

CLUSTER_START_TIMEOUT = 60.0  # create + join on a loaded 2-core box
# Small node timeout: a dead primary is declared failed and its replica
# promoted within ~2-3 s (production default: 15 s).
NODE_TIMEOUT_MS = 1000
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCluster:
    """`primaries` primaries, each with `replicas` replicas, all on 127.0.0.1."""

    def __init__(self, test: unittest.TestCase, primaries: int = 3, replicas: int = 1, full_coverage: bool = True) -> None:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "yes" if full_coverage else "no",
            # A replica's first sync would wait 5 s for more replicas to share
            # it; a failover before that finds a replica with no data.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        # An explicit bus port: the default (port + 10000) needs ports <= 55535
        # and may be taken; free_port gives both from the whole range.
        self.nodes = [
            RedisServer(test, extra_args=[*args, "--cluster-port", str(free_port())])
            for _ in range(primaries * (1 + replicas))
        ]
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, timeout=CLUSTER_START_TIMEOUT, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create failed:\n{out.stdout.decode()}\n{out.stderr.decode()}")
        self.wait_ok(expected_primaries=primaries)

    # -- topology --------------------------------------------------------

    @property
    def seeds(self) -> list[str]:
        """``redis://`` URLs of every node (relayd's `[redis] cluster`)."""
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    def live(self) -> list[RedisServer]:
        """Nodes whose process runs and is not paused (SIGSTOP): the ones that answer."""
        return [
            n for n in self.nodes
            if n.proc is not None and n.proc.poll() is None and not getattr(n, "_paused", False)
        ]  # fmt: skip

    def node_at(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        return next(n for n in self.nodes if n.port == port)

    def slot_owners(self, via: RedisServer | None = None) -> dict[int, int]:
        """``{first slot of a range: primary port}`` as one live node sees it."""
        node = via or self.live()[0]
        return {int(r[0]): int(r[2][1]) for r in node.command("CLUSTER", "SLOTS")}

    def ranges(self, via: RedisServer | None = None) -> list[tuple[int, int, int]]:
        """``[(first, last, primary port)]`` as one live node sees it."""
        node = via or self.live()[0]
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in node.command("CLUSTER", "SLOTS"))

    def primaries(self) -> list[RedisServer]:
        """The nodes that own slots now."""
        return [self.node_at(p) for p in sorted({port for _, _, port in self.ranges()})]

    def slot_of(self, key: str) -> int:
        """``CLUSTER KEYSLOT key``."""
        return int(self.live()[0].command("CLUSTER", "KEYSLOT", key))

    def primary_for(self, key: str) -> RedisServer:
        """The node that owns `key`'s slot now."""
        slot = self.slot_of(key)
        for first, last, port in self.ranges():
            if first <= slot <= last:
                return self.node_at(port)
        raise AssertionError(f"no primary owns slot {slot}")

    def node_id(self, node: RedisServer) -> str:
        """The node's cluster id."""
        return _text(node.command("CLUSTER", "MYID"))

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A live replica of `primary`."""
        pid = self.node_id(primary)
        for line in _text(primary.command("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if fields[3] == pid and "slave" in fields[2] and "fail" not in fields[2]:
                return self.node_at(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        raise AssertionError(f"no live replica of {primary.port}")

    def wait_ok(self, expected_primaries: int, timeout: float = CLUSTER_START_TIMEOUT) -> None:
        """Until every live node says cluster_state:ok, all agree on `expected_primaries` owners,
        and every live replica has its link to its primary up (else it could not fail over)."""

        def ok() -> bool:
            views = []
            for node in self.live():
                try:
                    info = _text(node.command("CLUSTER", "INFO"))
                    if "cluster_state:ok" not in info:
                        return False
                    replication = _text(node.command("INFO", "replication"))
                    if "role:slave" in replication and "master_link_status:up" not in replication:
                        return False
                    views.append(self.ranges(node))
                except (OSError, RedisError):
                    return False
            return all(v == views[0] for v in views) and len({p for _, _, p in views[0]}) == expected_primaries

        wait_for(ok, timeout, "the cluster to be ok with every node agreeing on the slot map", interval=0.1)

    # -- what the oracle needs --------------------------------------------

    def command_for(self, key: str, *args: Any) -> Any:
        """One command on `key`'s primary (follows one MOVED, for a map that just changed)."""
        try:
            return self.primary_for(key).command(*args)
        except RedisError as e:
            if not str(e).startswith("MOVED"):
                raise
            port = int(str(e).split()[2].rsplit(":", 1)[1])
            return self.node_at(port).command(*args)

    def llen(self, key: str) -> int:
        """``LLEN key`` on its primary."""
        return int(self.command_for(key, "LLEN", key))

    def items(self, key: str) -> list[bytes]:
        """The list's items oldest first, without removing them."""
        return list(reversed(self.command_for(key, "LRANGE", key, 0, -1)))

    def drain(self, key: str) -> list[bytes]:
        """Take every item of the list; oldest first."""
        node = self.primary_for(key)
        with RespClient("127.0.0.1", node.port) as c:
            c.send("MULTI")
            c.send("LRANGE", key, 0, -1)
            c.send("DEL", key)
            c.send("EXEC")
            for _ in range(3):
                c.read_reply()
            newest_first, _deleted = c.read_reply()
        return list(reversed(newest_first))


def keys_on_each_primary(cluster: RedisCluster, prefix: str = "list") -> list[str]:
    """One list name per primary (``prefix-N``), so a test covers every node."""
    ranges = cluster.ranges()
    wanted = {port for _, _, port in ranges}
    found: dict[int, str] = {}
    from relayd.redis.keys import key_slot

    for i in range(10_000):
        name = f"{prefix}-{i}"
        slot = key_slot(name.encode())
        port = next(p for first, last, p in ranges if first <= slot <= last)
        found.setdefault(port, name)
        if len(found) == len(wanted):
            break
    return [found[p] for p in sorted(found)]

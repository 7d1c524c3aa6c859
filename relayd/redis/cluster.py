"""A Redis Cluster client with the surface of `relayd.redis.client.RedisClient`.

Why here and not a library: txredisapi has no cluster support, and no
maintained Twisted cluster client exists (checked PyPI: txredisapi,
txredis, txredisapi3 and a few dummies; none routes by slot).  The
parts that are hard to get right per connection (reconnect with backoff,
AUTH + PING handshake, reply timeouts, binary-safe bytes) already live in
`RedisClient`; this module adds only the cluster's routing on top of one
`RedisClient` per primary:

- **Topology.**  ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` on servers older
  than 7.0) from any connected node gives the slot map
  (`relayd.redis.slotmap`).  It is re-read at start, after a ``MOVED``,
  when a node's connection drops, and on a timer: every
  `REFRESH_INTERVAL` seconds while all slots are writable, every
  `FAST_REFRESH_INTERVAL` while some are not (a failover shows up within
  about that long after Redis promotes the replica).  Refreshes are
  coalesced (one at a time, at most one per `MIN_REFRESH_INTERVAL`).
- **Routing.**  Each command goes to the primary of its key's slot
  (`relayd.redis.routing.command_key`, `relayd.redis.keys.key_slot`).
  Commands to different primaries run concurrently on their own
  connections; commands to one primary keep their order on its one
  connection.  A slot whose primary is not connected fails at once with
  `ConnectionError` (the caller spills or retries), never waits.
- **Redirects.**  ``MOVED``: the slot's new owner is recorded at once, a
  full refresh follows, and the command is re-sent there.  ``ASK``:
  ``ASKING`` and the command go to the target once, the map is unchanged.
  At most `MAX_REDIRECTS` redirects per command; a target that is not
  connected yet gets `connect_timeout` to become ready.
- **Readiness.**  `ready` is true when every slot has a connected primary
  (what "Redis can take writes" means for the callers that predate the
  cluster); `ready_for(key)` answers per slot (the forwarder and the replay
  route around a failed primary with it); `any_ready()` says whether any
  primary is connected; `unwritable_slots()` lists the ranges `/readyz`
  reports.

A command that timed out or whose connection dropped may still have run
(as on one Redis): callers that retry deliver at least once.

Blocking reads (``BLMOVE``, ``BRPOP``, ``XREAD BLOCK``) get their own
``ClusterClient(reactor, attrs.evolve(config, reply_timeout=...))``, as
they get their own `RedisClient` on one Redis: that gives them one
connection per primary of their own, routed by the key they block on.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generator, List, Optional, Tuple, Union

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config import RedisConfig
from relayd.redis.client import ConnectionError, RedisClient, ResponseError
from relayd.redis.keys import key_slot
from relayd.redis.routing import Address, Redirect, command_key, parse_redirect
from relayd.redis.slotmap import SlotMap, SlotRange, parse_cluster_shards, parse_cluster_slots

# Re-read the map this often when all is well: catches slots moved by an
# operator even if no command of ours hit them (those would answer MOVED).
REFRESH_INTERVAL = 10.0
# ... and this often while some slot has no connected primary: Redis
# promotes a replica cluster-node-timeout (default 15 s) after a primary
# dies; we follow within this much of that.
FAST_REFRESH_INTERVAL = 0.5
# Coalescing: a burst of MOVED replies (a reshard moves many slots) costs
# one CLUSTER SHARDS per this interval, not one per command.
MIN_REFRESH_INTERVAL = 0.1
# Redirects followed per command: one MOVED plus one ASK is the normal worst
# case during a reshard; more means the map is changing under us.
MAX_REDIRECTS = 5
# Slot cache entries (key -> slot); keys come from routes, so few in practice.
SLOT_CACHE_MAX = 65536

NodeFactory = Callable[[Address], RedisClient]


class ClusterClient(Service):
    """Routes each command to the primary of its key's slot; follows MOVED/ASK."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: RedisConfig,
        observe_latency: Optional[Callable[[str], Callable[[float], None]]] = None,
        node_factory: Optional[NodeFactory] = None,
    ) -> None:
        """`observe_latency(node)` returns a callable taking one round-trip time (a histogram's ``observe``)."""
        self._reactor = reactor
        self._config = config
        self._seeds: List[Address] = list(config.cluster) or [(config.host, config.port)]
        self._node_factory = node_factory or self._default_node
        self._observe_latency = observe_latency
        self._nodes: Dict[Address, RedisClient] = {}
        self._observers: Dict[Address, Optional[Callable[[float], None]]] = {}
        self._map = SlotMap()
        self._owners = self._map.owners  # the hot path indexes this list directly
        self._primaries: List[Address] = []
        self._covered = False
        self._ready_listeners: List[Callable[[], None]] = []
        self._waiters: Dict[Address, List[Deferred[RedisClient]]] = {}
        self._slot_cache: Dict[bytes, int] = {}
        self._refreshing = False
        self._refresh_again = False
        self._last_refresh = float("-inf")
        self._delayed_refresh: Optional[IDelayedCall] = None
        self._tick_call: Optional[IDelayedCall] = None
        self._refresh_failures = 0

    # -- nodes -----------------------------------------------------------

    def _default_node(self, address: Address) -> RedisClient:
        return RedisClient(self._reactor, attrs.evolve(self._config, host=address[0], port=address[1], db=0))

    def _node(self, address: Address) -> RedisClient:
        """The client of `address`, created (and started) on first use."""
        node = self._nodes.get(address)
        if node is None:
            node = self._node_factory(address)
            node.on_ready(lambda: self._node_ready(address))
            node.on_lost(lambda: self._node_lost(address))
            self._nodes[address] = node
            self._observers[address] = (
                self._observe_latency(f"{address[0]}:{address[1]}") if self._observe_latency is not None else None
            )
            if self.running:
                node.startService()
        return node

    def _node_ready(self, address: Address) -> None:
        for waiter in self._waiters.pop(address, []):
            waiter.callback(self._nodes[address])
        if not self._covered:
            self._request_refresh()
        self._notify_ready()

    def _node_lost(self, address: Address) -> None:
        # The primary may have died: its replica gets promoted, a new map says so.
        self._request_refresh()
        self._schedule_tick()

    def _when_ready(self, address: Address) -> Deferred[RedisClient]:
        """A Deferred firing with the node's client once connected (fails after connect_timeout)."""
        node = self._node(address)
        if node.ready:
            return succeed(node)
        d: Deferred[RedisClient] = Deferred()
        self._waiters.setdefault(address, []).append(d)

        def expire() -> None:
            waiting = self._waiters.get(address, [])
            if d in waiting:
                waiting.remove(d)
                d.errback(ConnectionError(f"redis node {address[0]}:{address[1]} not connected"))

        call = self._reactor.callLater(self._config.connect_timeout, expire)

        def cancel_expiry(result: Union[RedisClient, Failure]) -> Union[RedisClient, Failure]:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancel_expiry)
        return d

    # -- state -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while every slot has a connected primary."""
        if not self._covered:
            return False
        nodes = self._nodes
        for address in self._primaries:
            node = nodes.get(address)
            if node is None or not node.ready:
                return False
        return True

    def ready_for(self, key: bytes) -> bool:
        """True while the primary of `key`'s slot is connected."""
        address = self._owners[self._slot(key)]
        if address is None:
            return False
        node = self._nodes.get(address)
        return node is not None and node.ready

    def any_ready(self) -> bool:
        """True while some primary is connected: some keys can be written (the replay runs)."""
        nodes = self._nodes
        for address in self._primaries:
            node = nodes.get(address)
            if node is not None and node.ready:
                return True
        return False

    def unwritable_slots(self) -> List[Tuple[int, int]]:
        """Slot ranges (first, last) with no connected primary, for `/readyz`."""
        out: List[Tuple[int, int]] = []
        for first, last, address in self._map.ranges():
            node = self._nodes.get(address) if address is not None else None
            if node is None or not node.ready:
                if out and out[-1][1] == first - 1:
                    out[-1] = (out[-1][0], last)
                else:
                    out.append((first, last))
        return out

    def describe(self) -> Dict[str, Any]:
        """The map and connections as JSON-ready values (for `/readyz`)."""
        return {
            "primaries": {f"{a[0]}:{a[1]}": bool(self._nodes.get(a) and self._nodes[a].ready) for a in self._primaries},
            "unwritable_slots": [list(r) for r in self.unwritable_slots()],
        }

    def on_ready(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever a node connects or the map changes while all slots are writable."""
        self._ready_listeners.append(listener)

    def _notify_ready(self) -> None:
        if self.ready:
            for listener in list(self._ready_listeners):
                listener()

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        """Connect to the seeds; the map (and the other primaries) follow."""
        super().startService()
        for address in self._seeds:
            self._node(address)
        for node in list(self._nodes.values()):
            if not node.running:
                node.startService()
        self._schedule_tick()

    def stopService(self) -> Deferred[Any]:
        """Close every connection and stop refreshing (idempotent)."""
        if not self.running:
            return succeed(None)
        super().stopService()
        for call in (self._tick_call, self._delayed_refresh):
            if call is not None and call.active():
                call.cancel()
        self._tick_call = self._delayed_refresh = None
        waiters, self._waiters = self._waiters, {}
        for address, ds in waiters.items():
            for d in ds:
                d.errback(ConnectionError(f"redis node {address[0]}:{address[1]}: client stopping"))
        return gatherResults([node.stopService() for node in self._nodes.values()], consumeErrors=True)

    def _schedule_tick(self) -> None:
        if not self.running:
            return
        interval = REFRESH_INTERVAL if self.ready else FAST_REFRESH_INTERVAL
        if self._tick_call is not None and self._tick_call.active():
            if self._tick_call.getTime() <= self._reactor.seconds() + interval:
                return
            self._tick_call.cancel()
        self._tick_call = self._reactor.callLater(interval, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        self._request_refresh()
        self._schedule_tick()

    # -- topology --------------------------------------------------------

    def _request_refresh(self) -> None:
        """Re-read the map soon: now, or after MIN_REFRESH_INTERVAL since the last one."""
        if not self.running:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        wait = self._last_refresh + MIN_REFRESH_INTERVAL - self._reactor.seconds()
        if wait > 0:
            if self._delayed_refresh is None or not self._delayed_refresh.active():
                self._delayed_refresh = self._reactor.callLater(wait, self._request_refresh)
            return
        self._refresh()

    def _candidates(self) -> List[Tuple[Address, RedisClient]]:
        """Connected nodes to ask for the map: primaries first, then seeds, rotating."""
        order = self._primaries + [a for a in self._nodes if a not in self._primaries]
        shift = self._refresh_failures % len(order) if order else 0
        order = order[shift:] + order[:shift]
        return [(a, self._nodes[a]) for a in order if a in self._nodes and self._nodes[a].ready]

    @inlineCallbacks
    def _refresh(self) -> Generator[Deferred[Any], Any, None]:
        self._refreshing = True
        self._last_refresh = self._reactor.seconds()
        try:
            for address, node in self._candidates():
                try:
                    ranges = yield self._read_topology(node, address)
                except Exception as e:
                    self._refresh_failures += 1
                    if self._refresh_failures == 1:
                        self._log.warn(
                            "cluster map from {node} failed: {error}", node=f"{address[0]}:{address[1]}", error=e
                        )
                    continue
                if not self.running:
                    return
                self._refresh_failures = 0
                self._apply(ranges)
                break
        finally:
            self._refreshing = False
            if self._refresh_again:
                self._refresh_again = False
                self._request_refresh()

    @inlineCallbacks
    def _read_topology(self, node: RedisClient, address: Address) -> Generator[Deferred[Any], Any, List[SlotRange]]:
        try:
            reply = yield node.execute(b"CLUSTER", b"SHARDS")
        except ResponseError as e:
            if "cluster support disabled" in str(e).lower():
                raise
            reply = yield node.execute(b"CLUSTER", b"SLOTS")  # Redis < 7.0
            return parse_cluster_slots(reply, address[0])
        return parse_cluster_shards(reply, address[0])

    def _apply(self, ranges: List[SlotRange]) -> None:
        new = SlotMap(ranges)
        changed = new != self._map
        if changed:
            self._map = new
            self._owners = new.owners
            self._primaries = new.primaries()
            self._covered = new.covered()
            self._log.info(
                "cluster map: {primaries} primaries ({nodes}), {unowned} slots without a primary",
                primaries=len(self._primaries),
                nodes=", ".join(f"{a[0]}:{a[1]}" for a in self._primaries),
                unowned=new.owners.count(None),
            )
            keep = set(self._primaries) | set(self._seeds) | set(self._waiters)
            for address in list(self._nodes):
                if address not in keep:  # a former primary (now a replica, or gone)
                    node = self._nodes.pop(address)
                    self._observers.pop(address, None)
                    node.stopService()
            for address in self._primaries:
                self._node(address)
        self._schedule_tick()
        if changed:
            self._notify_ready()

    # -- commands --------------------------------------------------------

    def _slot(self, key: bytes) -> int:
        slot = self._slot_cache.get(key)
        if slot is None:
            if len(self._slot_cache) >= SLOT_CACHE_MAX:
                self._slot_cache.clear()
            slot = self._slot_cache[key] = key_slot(key)
        return slot

    def execute(self, *args: Any) -> Deferred[Any]:
        """Run one command on the primary of its key's slot (any node if it names no key)."""
        key = command_key(args)
        if key is None:
            for node in self._nodes.values():
                if node.ready:
                    return node.execute(*args)
            return fail(ConnectionError("redis cluster: no node connected"))
        return self._route(key, args)

    def lpush(self, key: bytes, values: List[bytes]) -> Deferred[Any]:
        """``LPUSH key v1 .. vN`` on the key's primary (the key is known: no parsing)."""
        return self._route(key, (b"LPUSH", key, *values))

    def _route(self, key: bytes, args: Any) -> Deferred[Any]:
        slot = self._slot(key)
        address = self._owners[slot]
        if address is None:
            self._request_refresh()
            return fail(ConnectionError(f"redis cluster: no primary known for slot {slot}"))
        primary = self._nodes.get(address)
        if primary is None or not primary.ready:
            self._request_refresh()
            return fail(ConnectionError(f"redis cluster: primary {address[0]}:{address[1]} of slot {slot} not connected"))
        return self._send(primary, address, slot, args, MAX_REDIRECTS, False)

    def _send(self, node: RedisClient, address: Address, slot: int, args: Any, left: int, asking: bool) -> Deferred[Any]:
        started = self._reactor.seconds()
        if asking:
            node.execute(b"ASKING").addErrback(lambda _: None)  # its failure shows in the command's reply
        return node.execute(*args).addCallbacks(
            self._observed,
            self._failed,
            callbackArgs=(self._observers.get(address), started),
            errbackArgs=(address, slot, args, left),
        )

    def _observed(self, reply: Any, observe: Optional[Callable[[float], None]], started: float) -> Any:
        if observe is not None:
            observe(self._reactor.seconds() - started)
        return reply

    def _failed(self, failure: Failure, address: Address, slot: int, args: Any, left: int) -> Any:
        if not failure.check(ResponseError):
            self._request_refresh()  # timeout or lost connection: maybe a failover
            return failure
        redirect = parse_redirect(str(failure.value), address[0])
        if redirect is None:
            if str(failure.value).startswith(("CLUSTERDOWN", "TRYAGAIN")):
                self._request_refresh()
            return failure
        if left <= 0:
            self._log.warn("redis cluster: too many redirects for slot {slot}; last {error}", slot=slot, error=failure.value)
            return failure
        return self._follow(redirect, args, left - 1)

    def _follow(self, redirect: Redirect, args: Any, left: int) -> Deferred[Any]:
        if redirect.kind == "MOVED":
            self._map.set_owner(redirect.slot, redirect.address)
            self._request_refresh()
        target = redirect.address
        asking = redirect.kind == "ASK"
        return self._when_ready(target).addCallback(
            lambda node: self._send(node, target, redirect.slot, args, left, asking)
        )

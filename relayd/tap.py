"""The twistd plugin's entry: ``twistd [-n] relayd --config PATH``.

`makeService` is the composition root: the only place that touches the
global reactor, reads the config file, and wires the parts together.  A bad
config ends the process here, before any port is bound, with one line on
stderr and exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any, Dict, List, Optional, Tuple

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from relayd.compat import exit_status_zero, lean_dispatch
from relayd.config import Config, ConfigError, ConfigOverrides, LoadedConfig, RedisConfig, load_config, resolve_workers
from relayd.counters.service import CounterService
from relayd.deliver.admin import DeliverAdmin
from relayd.deliver.manager import DeliverManager
from relayd.fanout.subscribe import Subscriptions
from relayd.ids import IdGenerator
from relayd.ingest.app import IngestApp, IngestRoute
from relayd.ingest.http_layer import IngestSite
from relayd.ingest.service import IngestService
from relayd.ingest.validation import compile_schema_file
from relayd.listener import ListenerService
from relayd.ops.admin import AdminApp, AdminSite
from relayd.ops.gctune import GcService
from relayd.ops.looplag import LoopLagMonitor
from relayd.ops.metrics import Metrics
from relayd.outbox.adoption import OrphanAdopter
from relayd.outbox.buffer import RingBuffer
from relayd.outbox.forwarder import Forwarder
from relayd.outbox.spooler import Spooler
from relayd.outbox.writer import RedisWriter
from relayd.process.sdnotify import NotifyService
from relayd.process.supervisor import make_supervisor
from relayd.redis.cluster import ClusterClient
from relayd.redis.factory import make_redis_client as redis_client_for
from relayd.redis.probe import probe_cluster
from relayd.reply.inbox import ReplyInbox
from relayd.wire import TurnSends

#: /readyz says "can store" when a message of this size could be stored now:
#: a spool with less room than one ordinary message is as good as full.
READY_MESSAGE_BYTES = 1024


class Options(usage.Options):
    """Command line of the twistd plugin."""

    synopsis = "--config PATH [--listen ENDPOINT] [--admin ENDPOINT]"
    optParameters = [
        ["config", "c", "etc/relayd.conf", "Path to the TOML config file."],
        ["listen", None, None, "Override [server] listen (a Twisted endpoint string)."],
        ["admin", None, None, "Override [server] admin (a Twisted endpoint string)."],
        ["workers", None, None, 'Override [server] workers (an integer or "auto").'],
    ]


class RelayService(MultiService):
    """The daemon's service tree, stopped one child at a time in reverse order.

    `MultiService` stops children concurrently; relayd needs a strict order
    for a lossless stop: admin, then ingest (no new messages, in-flight
    requests answered), then the forwarder (buffer pushed out), then Redis.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorCore, sends: Optional[TurnSends] = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._sends = sends
        self.metrics: Optional[Metrics] = None  # set by build_service (workers report it)
        self.worker_index: Optional[int] = None
        self.clean = False

    async def _stop_in_order(self) -> None:
        clean = True
        for child in reversed(list(self)):
            try:
                result = await child.stopService()
            except Exception:
                self._log.failure("error stopping {service}", service=child)
                clean = False
            else:
                clean = clean and result is not False
        self.clean = clean
        if clean:
            # twistd re-raises the stop signal on exit (status 143 for
            # SIGTERM); the contract promises 0 after a lossless stop.
            exit_status_zero(self._reactor)
        self._log.info("relayd stopped (clean={clean})", clean=clean)

    def startService(self) -> None:
        """Start the children on a lean poll loop (`relayd.compat.lean_dispatch`).

        Ingest's answers are held to the end of each reactor turn only when
        that loop flushes them (`relayd.wire.TurnSends`).
        """
        sends = self._sends
        if sends is None:
            lean_dispatch(self._reactor)
        elif lean_dispatch(self._reactor, sends.flush):
            sends.enabled = True
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop children sequentially; fires when all have drained."""
        self.running = 0
        return Deferred.fromCoroutine(self._stop_in_order())



def build_routes(
    config: Config, validators: Dict[str, Any], metrics: Metrics, reactor: IReactorTime
) -> List[IngestRoute]:
    """The ingest routes of a config; rate limits get this process's share."""
    share = 1.0 / max(1, resolve_workers(config.server.workers))
    metrics.describe_routes((r.path, r.list, r.ack) for r in config.routes)
    return [IngestRoute(r, validators.get(r.path), metrics.route(r.path), reactor, share) for r in config.routes]


def make_redis_client(reactor: Any, config: RedisConfig, metrics: Optional[Metrics] = None) -> Any:
    """This process's Redis client (one Redis or a cluster: `relayd.redis.factory`)."""
    return redis_client_for(reactor, config, metrics.redis_node if metrics is not None else None)


def build_service(
    config: Config,
    validators: Dict[str, Any],
    reactor: IReactorTime,
    spool_path: Optional[str] = None,
    listen_endpoint: Any = None,
    admin_endpoint: Any = None,
    worker_index: Optional[int] = None,
) -> RelayService:
    """Wire one relayd process from a validated config (no I/O until started).

    A worker process of a multi-worker daemon (relayd/process/worker.py) passes its
    spool directory, the endpoints of its inherited sockets and its index;
    one process alone uses ``<spool dir>/worker-0`` and the config's endpoints.
    """
    metrics = Metrics()
    buffer = RingBuffer(config.buffer.max_messages, config.buffer.max_bytes)
    metrics.watch(metrics.buffer_messages, lambda: buffer.messages)
    metrics.watch(metrics.buffer_bytes, lambda: buffer.bytes)
    redis = make_redis_client(reactor, config.redis, metrics)
    metrics.watch(metrics.redis_up, lambda: 1.0 if redis.ready else 0.0)
    writer = RedisWriter(reactor, redis, metrics)
    spooler = Spooler(
        reactor,
        spool_path or os.path.join(config.spool.dir, "worker-0"),
        config.spool.max_bytes,
        config.spool.fsync,
        metrics,
    )
    forwarder = Forwarder(
        reactor,
        buffer,
        redis,
        writer,
        spooler,
        metrics,
        batch_messages=config.redis.batch_messages,
        batch_bytes=config.redis.batch_bytes,
        max_in_flight=config.redis.max_in_flight,
        shutdown_timeout=config.server.shutdown_timeout,
    )
    shutdown_timeout = config.server.shutdown_timeout
    routes = build_routes(config, validators, metrics, reactor)
    # Request/reply routes get this process's private reply list and its reader.
    inbox = ReplyInbox(reactor, config.redis, metrics) if any(r.reply_timeout for r in config.routes) else None
    app = IngestApp(
        reactor,
        routes,
        buffer,
        forwarder.can_store,
        IdGenerator(reactor.seconds),
        metrics,
        config.buffer.ack_timeout,
        inbox,
    )
    # Stream routes get this process's subscriptions: hub, XREAD reader, heartbeats.
    fanout = None
    if any(r.stream is not None for r in config.routes):
        fanout = Subscriptions(reactor, config.redis, redis, metrics)
        app.fanout = fanout
    sends = TurnSends()  # the ingest answers of a reactor turn, sent when it ends (RelayService enables it)
    site = IngestSite(app, metrics, config.server.idle_timeout, reactor, config.limits, sends)
    ingest = IngestService(
        listen_endpoint or serverFromString(reactor, config.server.listen), site, app, shutdown_timeout, reactor
    )
    listening = {"ingest": False}
    ingest.listening.addCallback(lambda _: listening.update(ingest=True))

    def readiness() -> Dict[str, bool]:
        # Ready = listening, spool recovered, and somewhere to store messages.
        return {
            "ingest_listening": listening["ingest"],
            "spool_recovered": spooler.spool is not None,
            "can_store": forwarder.can_store(1, max(READY_MESSAGE_BYTES, spooler.refused_size)),
        }

    deliver = DeliverManager(reactor, config.delivers, redis, config.redis, metrics, config.server.shutdown_timeout)
    metrics.watch(metrics.ready, lambda: 1.0 if all(readiness().values()) else 0.0)
    metrics.watch(metrics.spool_disk_bytes, lambda: spooler.spool.disk_bytes if spooler.spool is not None else 0)
    metrics.spool_max_bytes.set(config.spool.max_bytes)
    details = None
    if isinstance(redis, ClusterClient):
        cluster = redis
        details = lambda: {"redis_cluster": cluster.describe()}  # noqa: E731
    admin_site = AdminSite(AdminApp(metrics, readiness, details, deliver=DeliverAdmin(deliver, redis)), reactor)
    admin = ListenerService(admin_endpoint or serverFromString(reactor, config.server.admin), admin_site, "admin")
    adopter = OrphanAdopter(
        reactor,
        config.spool.dir,
        lambda: spooler.spool.path if spooler.spool is not None else None,
        redis,
        writer,
        metrics,
        config.spool.max_bytes,
        config.spool.fsync,
    )

    root = RelayService(IReactorCore(reactor), sends)
    root.metrics = metrics
    root.worker_index = worker_index
    counters: List[Tuple[str, Any]] = []
    if config.counters:  # their own Redis connection inside
        counters.append(("counters", CounterService(reactor, config.counters, config.redis, metrics, worker_index)))
    # Stopped in reverse: looplag, admin, ingest (waits for replies), replies, forwarder, adopter, spooler, deliver,
    # counters, Redis.
    children: List[Tuple[str, Any]] = [
        ("redis", redis),
        *counters,
        ("deliver", deliver),  # its own blocking connections; settles through `redis`, so stops before it
        ("spooler", spooler),
        ("adopter", adopter),
        ("forwarder", forwarder),
    ]
    if inbox is not None:
        children.append(("replies", inbox))
    for name, child in (
        *children,
        ("ingest", ingest),
        # Stopped before ingest: subscriptions end cleanly (a final chunk,
        # browsers reconnect elsewhere) instead of being cut with the sockets.
        *((("fanout", fanout),) if fanout is not None else ()),
        ("admin", admin),
        ("notify", NotifyService(reactor, ingest.listening, "ready")),
        ("looplag", LoopLagMonitor(reactor, metrics.reactor_lag)),
        ("gc", GcService(reactor, metrics)),
    ):
        child.setName(name)
        child.setServiceParent(root)
    return root


def overrides_of(options: Options) -> ConfigOverrides:
    """The command line's ``[server]`` overrides."""
    return ConfigOverrides(listen=options["listen"], admin=options["admin"], workers=options["workers"])


def makeService(options: Options, reactor: Optional[IReactorTime] = None) -> MultiService:
    """twistd entry point: load and validate the config, then build the tree."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    overrides = overrides_of(options)

    def load() -> LoadedConfig:
        return load_config(options["config"], compile_schema_file, overrides)

    try:
        loaded = load()
        if loaded.config.redis.cluster:
            problem = probe_cluster(loaded.config.redis)
            if problem is not None:
                raise ConfigError(problem)
    except ConfigError as e:
        sys.stderr.write(f"relayd: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    config, validators = loaded.config, loaded.validators
    log = Logger(namespace="relayd")
    if resolve_workers(config.server.workers) > 1:
        return make_supervisor(reactor, loaded, load)

    service = build_service(config, validators, reactor)
    current = {"config": config}

    def reload() -> None:
        """SIGHUP in a single process: swap routes in place, the socket stays open."""
        try:
            reloaded = load()
        except ConfigError as e:
            log.error("SIGHUP: new config rejected, the old one stays: {error}", error=str(e))
            return
        ingest = service.getServiceNamed("ingest")
        # New routes read their tokens and secret files afresh.
        assert service.metrics is not None
        new = reloaded.config
        ingest.app.replace_routes(build_routes(new, reloaded.validators, service.metrics, reactor))
        service.getServiceNamed("deliver").reconfigure(new.delivers)
        tables = ("server", "redis", "buffer", "spool", "limits", "counters")
        pending = [name for name in tables if getattr(new, name) != getattr(current["config"], name)]
        if pending:
            log.warn(
                "SIGHUP: routes and tokens reloaded; changes to [{tables}] take effect at the next restart",
                tables=", ".join(pending),
            )
        else:
            log.info(
                "SIGHUP: routes, tokens and delivers reloaded ({count} routes, {delivers} delivers)",
                count=len(new.routes), delivers=len(new.delivers),
            )
        current["config"] = attrs.evolve(current["config"], routes=new.routes, delivers=new.delivers)

    threads = IReactorFromThreads(reactor)

    def on_sighup(signum: int, frame: Optional[FrameType]) -> None:
        threads.callFromThread(reload)

    signal.signal(signal.SIGHUP, on_sighup)
    return service

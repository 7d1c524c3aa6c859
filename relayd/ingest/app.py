"""HTTP ingest: POST <route> -> validated messages in the buffer -> 2xx.

The Klein app (`IngestApp`) is the API surface: route lookup, method and
length checks, auth, body parsing (`validation`), rate limits, envelope
encoding (`codec`), the buffer offer, and the ack.  Every `Problem` raised
on the way becomes an ``application/problem+json`` response in one place
(`write_problem`), and nothing is enqueued before the whole request
validated.  The twisted.web guards underneath (body caps, deadlines,
connection caps, the hot-path dispatch) are in `relayd.ingest.http_layer`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from relayd.codec import EncodeError, encode_envelopes
from relayd.compat import header_map
from relayd.config import RouteConfig
from relayd.ids import IdGenerator
from relayd.ingest.auth import BearerTokens, WebhookVerifier, read_secret
from relayd.ingest.idempotency import RecentKeys, key_digester, parse_key
from relayd.ingest.paths import BoundedCache, KeyTemplate, PathMatcher, PathTemplate
from relayd.ingest.problems import (
    PROBLEM_CONTENT_TYPE,
    BadGateway,
    BadRequest,
    GatewayTimeout,
    LengthRequired,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    NotReady,
    Overloaded,
    Problem,
    StoreFailed,
    StoreTimeout,
    render_problem,
)
from relayd.ingest.ratelimit import RateLimiter
from relayd.ingest.validation import BodyParser, Validator
from relayd.ops.metrics import Metrics, RouteMetrics
from relayd.outbox.buffer import NotStored, RingBuffer, Waiter
from relayd.outbox.dedup import DedupListTarget, encode_bundle
from relayd.outbox.streams import ListAndStreamTarget, StreamTarget
from relayd.outbox.targets import ListTarget
from relayd.reply.inbox import ReplyInbox, ReplyTimeout, ReplyUnusable
from relayd.reply.protocol import Reply

JSON_CONTENT_TYPE = b"application/json"
RETRY_AFTER_OVERLOAD = 1  # seconds: the forwarder drains a full buffer in well under that
RETRY_AFTER_NOT_READY = 5  # seconds: Redis reconnect backoff is capped at 5 s
ACK_SWEEP_INTERVAL = 0.25  # seconds: granularity of the stored-ack timeout
#: Targets remembered per template route: a thousand teams' targets stay
#: built, while a flood of distinct segment values costs at most this many.
TARGET_CACHE = 10_000


class IngestRoute:
    """One configured route, ready for the hot path."""

    def __init__(
        self,
        config: RouteConfig,
        validator: Optional[Validator],
        metrics: RouteMetrics,
        clock: Any,
        share: float = 1.0,
    ) -> None:
        """`clock` (the reactor) drives token reloads, webhook windows and
        rate limits; `share` is this process's share of route rate limits."""
        self.path = config.path
        self.path_bytes = config.path.encode()
        self.reply_timeout = config.reply_timeout
        self.template = PathTemplate(config.path)
        self._list = KeyTemplate(config.list, self.template.names) if config.list else None
        self._stream = KeyTemplate(config.stream, self.template.names) if config.stream is not None else None
        self._history = config.history
        self._window_ms = int(config.idempotency_window * 1000)
        #: The stream key template (fan-out subscribers), None for a list-only route.
        self.has_stream = self._stream is not None
        self._targets = BoundedCache(self._build_targets, TARGET_CACHE)
        # A literal route's targets (a template route builds them per request).
        self.target: Any = None
        self.dedup_target: Optional[DedupListTarget] = None
        if not self.template.is_template:
            self.target, self.dedup_target = self._build_targets(())
        self.recent = RecentKeys(clock.seconds, config.idempotency_window)
        #: Idempotency-Key -> its route-scoped digest (`key_digest` with this route hashed once).
        self.key_digest = key_digester(self.path_bytes)
        self.stored = config.ack == "stored"
        self.envelope = config.format == "envelope"
        self.max_body = config.max_body
        self.parser = BodyParser(
            validator, raw=not self.envelope, max_lines=config.max_lines, max_depth=config.max_depth
        )
        self.metrics = metrics
        seconds = clock.seconds
        self.tokens: Optional[BearerTokens] = None
        if config.auth_tokens_file is not None:
            self.tokens = BearerTokens(config.auth_tokens_file, seconds)
        self.webhook: Optional[WebhookVerifier] = None
        if config.webhook_secret_file is not None:
            self.webhook = WebhookVerifier(
                read_secret(config.webhook_secret_file), config.webhook_scheme, config.webhook_tolerance, seconds
            )
        self.limiter: Optional[RateLimiter] = None
        if config.rate_limit is not None or config.client_rate_limit is not None:
            self.limiter = RateLimiter(
                seconds, config.rate_limit, config.rate_burst, config.client_rate_limit, config.client_rate_burst, share
            )


    def _build_targets(self, values: Tuple[bytes, ...]) -> Tuple[Any, Optional[DedupListTarget]]:
        """The (target, idempotent list target or None) for one request's path values."""
        list_key = self._list.fill(values) if self._list is not None else None
        dedup = DedupListTarget(list_key, self._window_ms) if list_key is not None else None
        if self._stream is None:
            assert list_key is not None and self._list is not None
            return ListTarget(list_key, label=self._list.template.encode()), dedup
        assert self._stream is not None
        stream = StreamTarget(self._stream.fill(values), self._history, label=self._stream.template.encode())
        if list_key is None:
            return stream, None
        return ListAndStreamTarget(list_key, stream), None

    def targets_for(self, values: Tuple[bytes, ...]) -> Tuple[Any, Optional[DedupListTarget]]:
        """Targets for a request's path values (cached per value, bounded)."""
        if self.target is not None:
            return self.target, self.dedup_target
        return self._targets.get(values)

    def stream_key(self, values: Tuple[bytes, ...]) -> bytes:
        """The stream a subscriber of these path values reads."""
        assert self._stream is not None
        return self._stream.fill(values)


class IngestApp:
    """The Klein application for ingest routes; dependencies injected."""

    _app = Klein()
    _log = Logger()

    def __init__(
        self,
        clock,  # type: ignore[no-untyped-def]
        routes: List[IngestRoute],
        buffer: RingBuffer,
        can_store: Callable[[int, int], bool],
        ids: IdGenerator,
        metrics: Metrics,
        ack_timeout: float,
        inbox: Optional[ReplyInbox] = None,
    ) -> None:
        """`inbox` is this process's reply list (needed by request/reply routes)."""
        self._clock = clock
        self._inbox = inbox
        self._set_routes(routes)
        self.fanout: Any = None  # relayd.fanout.subscribe.Subscriptions, set by the composition root
        self._buffer = buffer
        self._can_store = can_store
        self._ids = ids
        self._metrics = metrics
        self._ack_timeout = ack_timeout
        self._pending_acks: Deque[Tuple[float, Waiter, int]] = deque()
        metrics.watch(metrics.idempotency_keys, lambda: sum(len(r.recent) for r in self._all_routes))
        self._sweeper = LoopingCall(self._expire_acks)
        self._sweeper.clock = clock
        self.stopping = False
        self.active = 0  # requests being handled (for graceful stop)
        self._idle: Optional[Deferred] = None

    # -- limits used by the HTTP layer -------------------------------------

    def body_limit(self, path: bytes) -> int:
        """The body cap for a request path (query ignored)."""
        found = self.lookup(path.split(b"?", 1)[0])
        if found is not None:
            return found[0].max_body
        return max(r.max_body for r in self._all_routes)

    def _set_routes(self, routes: List[IngestRoute]) -> None:
        self._all_routes = list(routes)
        # Literal paths: one dict lookup per request (the hot path).
        self._routes: Dict[bytes, IngestRoute] = {r.path_bytes: r for r in routes if not r.template.is_template}
        # Template paths: the fallback (relayd/ingest/paths.py).
        self._templates: PathMatcher[IngestRoute] = PathMatcher(
            [(r.template, r) for r in routes if r.template.is_template]
        )

    def lookup(self, path: bytes) -> Optional[Tuple[IngestRoute, Tuple[bytes, ...]]]:
        """The route of a request path and its ``{name}`` values (``()`` for literal paths)."""
        route = self._routes.get(path)
        if route is not None:
            return route, ()
        if self._templates:
            return self._templates.match(path)
        return None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the stored-ack timeout sweeper."""
        self._sweeper.start(ACK_SWEEP_INTERVAL, now=False)

    def begin_stop(self) -> None:
        """From now on every answer closes its connection (the listener is closed)."""
        self.stopping = True

    def wait_idle(self) -> Deferred:
        """Fire when every in-flight request was answered."""
        if self.active == 0:
            return succeed(None)
        self._idle = Deferred()
        return self._idle

    def stop(self) -> None:
        """Stop the sweeper."""
        if self._sweeper.running:
            self._sweeper.stop()

    def _request_done(self, result: Any) -> Any:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)
        return result

    # -- the one route ------------------------------------------------------

    @_app.route("/", branch=True, strict_slashes=False)
    def ingest(self, request: Request) -> Any:
        """Everything off the hot path: unknown routes, wrong methods."""
        found = self.lookup(request.path)
        if found is None:
            raise NotFound(f"no route at {request.path.decode('utf-8', 'replace')}")
        route, values = found
        request.path_values = values  # type: ignore[attr-defined]
        if request.method == b"GET" and route.has_stream:
            raise NotAcceptable("subscribe with Accept: text/event-stream")
        if request.method != b"POST":
            route.metrics.rejected("method")
            raise MethodNotAllowed(
                f"{request.method.decode('ascii', 'replace')} is not allowed here; use POST",
                headers=((b"Allow", b"POST"),),
            )
        result = self.post(request, route)
        if not isinstance(result, Waiter):
            return _klein_ack(result, request)
        if route.reply_timeout is not None:
            return result.deferred.addBoth(self._request_done)  # the reply brings its own headers
        return result.deferred.addBoth(self._settled_klein, request, result)

    def replace_routes(self, routes: List[IngestRoute]) -> None:
        """Serve `routes` from the next request on (SIGHUP); requests in flight keep theirs."""
        self._set_routes(routes)

    def route_for(self, request: Request) -> Optional[IngestRoute]:
        """The route of a POST to a configured path (the hot path), else None."""
        if request.method == b"POST":
            route = self._routes.get(request.path)
            if route is not None:
                request.path_values = ()  # type: ignore[attr-defined]
                return route
            if self._templates:
                found = self._templates.match(request.path)
                if found is not None:
                    request.path_values = found[1]  # type: ignore[attr-defined]
                    return found[0]
        return None

    def subscriber_for(self, request: Request) -> bool:
        """Is this a Server-Sent Events subscription (GET, Accept: text/event-stream)?"""
        if request.method != b"GET" or self.fanout is None:
            return False
        accept = request.requestHeaders.getRawHeaders(b"accept")
        return accept is not None and any(b"text/event-stream" in a for a in accept)

    def subscribe(self, request: Request) -> None:
        """Serve one SSE subscription (relayd/fanout/); problems answered here."""
        try:
            found = self.lookup(request.path)
            if found is None or not found[0].has_stream:
                raise NotFound(f"no stream route at {request.path.decode('utf-8', 'replace')}")
            route, values = found
            if route.tokens is not None:  # the route's auth applies to subscribers
                auth = request.requestHeaders.getRawHeaders(b"authorization")
                route.tokens.check(auth[0] if auth else None)
            if route.tokens is None:
                # Anyone may read a route without tokens, from any page
                # (EventSource sends no credentials cross-origin).
                request.setHeader(b"Access-Control-Allow-Origin", b"*")
            self.fanout.subscribe(request, route.stream_key(values))
        except Problem as p:
            _finish(request, write_problem(request, p))

    def post(self, request: Request, route: IngestRoute) -> Any:
        """Accept one POST: the response body, or the `Waiter` whose Deferred
        gives it (stored acks)."""
        if self.stopping:
            # Still served (forwarder and spool run until ingest is drained),
            # but the client reconnects elsewhere afterwards: a 503 here, or
            # closing the connection under a request in flight, would be an
            # error for a client that did nothing wrong (a reload).
            request.setHeader(b"Connection", b"close")
            request.channel.persistent = False
        started = self._clock.seconds()
        try:
            result = self._accept(request, route, started)
        except Problem as p:
            route.metrics.rejected(p.reason)
            raise
        if isinstance(result, Waiter):
            self.active += 1  # until `_request_done`, called by whoever answers
        return result

    def serve(self, request: Request, route: IngestRoute) -> None:
        """The hot path without Klein's per-request machinery (see module doc).

        Same domain code as the Klein route (`post`), same problem rendering
        (`write_problem`); only URL mapping and result adaptation are skipped.
        """
        try:
            result = self.post(request, route)
        except Problem as p:
            _finish(request, write_problem(request, p), at_turn_end=True)
            return
        if isinstance(result, Waiter):
            request.gone_waiter = result  # type: ignore[attr-defined]  # IngestRequest.connectionLost frees it if the client leaves
            if route.reply_timeout is None:
                result.on_settled = self._settled  # one plain call per stored request, no Deferred
            else:  # the reply chain (`_request_reply`) gives the body and its headers
                result.deferred.addBoth(self._request_done)
                result.deferred.addCallbacks(
                    _finish_unless_gone, _fail_unless_gone, callbackArgs=(request, None), errbackArgs=(request,)
                )
        else:  # answered while the request is read: with the turn's other answers (relayd.wire.TurnSends)
            _finish(request, result, JSON_CONTENT_TYPE, at_turn_end=True)

    def _accept(self, request: Request, route: IngestRoute, started: float) -> Any:
        headers = request.requestHeaders
        raw = header_map(headers)  # by canonical name: one dict lookup per header
        client = None
        if route.tokens is not None:
            auth = raw.get(b"Authorization")
            client = route.tokens.check(auth[0] if auth else None)
        if b"Content-Length" not in raw and b"Transfer-Encoding" not in raw:
            raise LengthRequired("a POST needs Content-Length (or chunked transfer encoding)")
        assert request.content is not None  # IngestRequest.gotLength always sets it
        body = request.content.read()
        if route.webhook is not None:
            route.webhook.check(headers, body)
        stored = route.stored
        ack = raw.get(b"Relayd-Ack")
        if ack:
            stored = _ack_level(ack[0], route.stored)
        digest = None
        idem = raw.get(b"Idempotency-Key")
        if idem:
            digest = route.key_digest(parse_key(idem[0]))
            first_id = route.recent.get(digest)
            if first_id is not None:
                self._metrics.duplicates.labels(where="memory").inc()
                return self._duplicate(request, route, first_id, started)
        ctype = raw.get(b"Content-Type")
        parsed = route.parser.parse(body, ctype[0] if ctype else None)
        count = len(parsed.values)
        if route.limiter is not None:
            if client is None:
                client = request.getClientAddress().host.encode() if hasattr(request.getClientAddress(), "host") else b""
            route.limiter.take(client, count)
        if count == 1:
            ids = [self._ids.next_id()]
        else:
            ids = self._ids.next_ids(count)
        if route.envelope:
            reply_to = None
            if route.reply_timeout is not None:
                reply_to = self._check_reply_route(parsed.batch)
            try:
                items = encode_envelopes(ids, started, route.path, parsed.content_type, parsed.values, reply_to)
            except EncodeError as e:
                raise BadRequest(f"body has no strict JSON representation: {e}") from None
        else:
            items = parsed.raws
        try:
            return self._enqueue(request, route, items, ids, started, parsed.batch, stored, digest)
        except Problem:
            if route.limiter is not None and client is not None:
                route.limiter.refund(client, count)  # refused requests take no tokens
            raise

    def _enqueue(
        self,
        request: Request,
        route: IngestRoute,
        items: List[bytes],
        ids: List[str],
        started: float,
        batch: bool,
        stored: bool,
        digest: Optional[bytes],
    ) -> Any:
        """Offer the encoded messages to the buffer; the ack, or the `Waiter` of it.

        With an idempotency `digest` the request travels as one bundle to
        the route's dedup target (relayd/outbox/dedup.py), so that it is
        stored once or not at all.
        """
        count = len(items)
        if route.reply_timeout is not None:
            return self._request_reply(request, route, items, ids[0], started)
        target, dedup_target = route.targets_for(getattr(request, "path_values", ()))
        if digest is not None:
            if dedup_target is None:
                raise BadRequest("Idempotency-Key is not supported on stream routes (yet)")
            target = dedup_target
            items = [encode_bundle(digest, ids[0].encode(), items)]
        if stored:
            size = 0
            for item in items:
                size += len(item)
            if not self._can_store(count, size):
                raise NotReady(
                    "neither Redis nor the disk spool can take messages now", retry_after=RETRY_AFTER_NOT_READY
                )
            waiter = Waiter(len(items))
            if not self._buffer.offer(target, items, waiter):
                raise Overloaded("the buffer is full; retry shortly", retry_after=RETRY_AFTER_OVERLOAD)
            route.metrics.ingested.inc(count)
            self._pending_acks.append((started + self._ack_timeout, waiter, count))
            waiter.context = (route, ids, started, batch, digest, request)  # read by `_settled` / `_settled_klein`
            return waiter
        if not self._buffer.offer(target, items, None):
            raise Overloaded("the buffer is full; retry shortly", retry_after=RETRY_AFTER_OVERLOAD)
        route.metrics.ingested.inc(count)
        if digest is not None:
            route.recent.put(digest, ids[0].encode(), started)
        return self._acknowledge(request, route, ids, started, batch)

    def _settled(self, waiter: Waiter, error: Optional[Exception]) -> None:
        """A stored-ack request's outcome: its ack or its problem, answered unless the client left.

        The one callback of a stored request (`Waiter.on_settled`, the hot
        path): the ack's side effects (latency, the idempotency memory)
        happen even when the client is gone.  An error that is not a
        problem is a bug, not a client's fault: logged, as an unhandled
        Deferred failure was before.
        """
        self._request_done(None)
        route, ids, started, batch, digest, request = waiter.context
        waiter.context = None  # no request <-> waiter cycle left for the GC (request.gone_waiter)
        if error is not None:
            if request.gone:
                return  # nobody to answer (a client that left: CancelledError)
            problem = _outcome_problem(error)
            if problem is None:
                self._log.failure("stored-ack request failed", Failure(error))
                return
            _finish(request, write_problem(request, problem))
            return
        body = self._acknowledge(request, route, ids, started, batch, waiter, digest)
        if not request.gone:
            _finish(request, body, JSON_CONTENT_TYPE)

    def _settled_klein(self, outcome: Any, request: Request, waiter: Waiter) -> Any:
        """`_settled` for a request answered through Klein: the body, or the problem raised."""
        self._request_done(None)
        if isinstance(outcome, Failure):
            problem = _outcome_problem(outcome.value)
            if problem is None:
                return outcome
            raise problem
        route, ids, started, batch, digest, _ = waiter.context
        waiter.context = None
        return _klein_ack(self._acknowledge(request, route, ids, started, batch, waiter, digest), request)

    def _acknowledge(
        self,
        request: Request,
        route: IngestRoute,
        ids: List[str],
        started: float,
        batch: bool,
        waiter: Optional[Waiter] = None,
        digest: Optional[bytes] = None,
    ) -> bytes:
        if digest is not None:
            first_id = waiter.duplicate_of if waiter is not None else None
            if first_id is not None:
                # Not remembered here: this process does not know when the
                # first copy's marker expires, and memory must never answer
                # "duplicate" after Redis forgot it.
                return self._duplicate(request, route, first_id, started)
            route.recent.put(digest, ids[0].encode(), started)
        route.metrics.latency.observe(self._clock.seconds() - started)
        if batch:
            return b'{"status":"OK","accepted":%d,"ids":["%s"]}' % (len(ids), '","'.join(ids).encode())
        return b'{"status":"OK","id":"%s"}' % ids[0].encode()

    # -- request/reply ---------------------------------------------------------

    def _check_reply_route(self, batch: bool) -> bytes:
        """The reply list to name in the envelope; refuse what a reply route cannot serve."""
        if batch:
            raise BadRequest("a request/reply route takes one message per request, not an NDJSON batch")
        if self._inbox is None or not self._inbox.ready:
            # No worker could answer through the spool: answer now, store nothing.
            raise NotReady("request/reply needs Redis, which is unreachable", retry_after=RETRY_AFTER_NOT_READY)
        return self._inbox.list_name

    def _request_reply(self, request: Request, route: IngestRoute, items: List[bytes], request_id: str, started: float) -> Any:
        """Store the request like any stored message, then wait for its reply."""
        assert self._inbox is not None and route.reply_timeout is not None
        size = len(items[0])
        if not self._can_store(1, size):
            raise NotReady("neither Redis nor the disk spool can take messages now", retry_after=RETRY_AFTER_NOT_READY)
        waiter = ReplyWaiter(self._inbox, request_id)
        reply = self._inbox.wait(request_id, max(0.0, route.reply_timeout - (self._clock.seconds() - started)))
        if not self._buffer.offer(route.targets_for(getattr(request, "path_values", ()))[0], items, waiter):
            self._inbox.forget(request_id)
            reply.addErrback(_ignore)  # nobody waits for it
            raise Overloaded("the buffer is full; retry shortly", retry_after=RETRY_AFTER_OVERLOAD)
        route.metrics.ingested.inc(1)
        self._pending_acks.append((started + self._ack_timeout, waiter, 1))
        d = waiter.deferred
        d.addCallback(lambda _: reply)
        d.addCallbacks(self._relay_reply, _reply_problem, callbackArgs=(request, route, started), errbackArgs=(waiter, reply))
        return waiter

    def _relay_reply(self, reply: Reply, request: Request, route: IngestRoute, started: float) -> bytes:
        request.setResponseCode(reply.status)
        for name, value in reply.headers:
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(reply.body))
        route.metrics.latency.observe(self._clock.seconds() - started)
        return reply.body

    def _duplicate(self, request: Request, route: IngestRoute, first_id: bytes, started: float) -> bytes:
        """The answer to a repeated Idempotency-Key: 2xx with the first request's id."""
        route.metrics.latency.observe(self._clock.seconds() - started)
        return b'{"status":"OK","id":"%s","duplicate":true}' % first_id

    def _expire_acks(self) -> None:
        """Answer 503 to stored-ack requests that waited past the ack timeout.

        Only when none of the request's messages is stored or on its way to
        Redis or the spool (``waiter.untouched``): cancelling then
        guarantees that nothing of it is stored, so the 503 changes nothing
        and a retry cannot duplicate.  A request with messages on the way
        keeps waiting for their outcome (bounded by the reply timeout;
        failures spill).  This is the last resort, not the normal path: the
        forwarder answers a request nothing can store at once.
        """
        now = self._clock.seconds()
        pending = self._pending_acks
        later = []
        while pending:
            deadline, waiter, count = pending[0]
            if waiter.settled is not None or waiter.cancelled or waiter.answered:
                pending.popleft()
                continue
            if deadline > now:
                break
            pending.popleft()
            if not waiter.untouched:
                later.append((now + ACK_SWEEP_INTERVAL, waiter, count))
                continue
            waiter.fail(
                StoreTimeout(
                    f"not stored within {self._ack_timeout:g}s; nothing was stored", retry_after=RETRY_AFTER_NOT_READY
                )
            )
        pending.extend(later)

    @_app.handle_errors(Problem)  # type: ignore[arg-type]
    def _problem(self, request: Request, failure: Any) -> bytes:
        problem = failure.value
        return write_problem(request, problem)

    @_app.handle_errors(CancelledError)  # type: ignore[arg-type]
    def _cancelled(self, request: Request, failure: Any) -> bytes:
        return b""  # the client went away; nothing to answer

    def resource(self) -> Any:
        """The twisted.web resource of this app."""
        return self._app.resource()


def _ack_level(raw: bytes, route_stored: bool) -> bool:
    """``Relayd-Ack``: a request may ask for a stronger ack than its route's, never a weaker one."""
    value = raw.strip().lower()
    if value == b"stored":
        return True
    if value == b"accepted":
        if route_stored:
            raise BadRequest("Relayd-Ack: accepted is weaker than this route's stored ack; not granted")
        return False
    raise BadRequest('Relayd-Ack must be "stored" or "accepted"')


def _outcome_problem(error: Optional[BaseException]) -> Optional[Problem]:
    """The problem answering a stored request that failed: the forwarder's
    `NotStored` becomes a 503 (store-failed if something may be stored), a
    `Problem` (the ack timeout) is itself; None for anything else."""
    if isinstance(error, NotStored):
        if error.maybe_stored:
            return StoreFailed(error.reason, retry_after=error.retry_after)
        return NotReady(f"{error.reason}; nothing was stored", retry_after=error.retry_after)
    if isinstance(error, Problem):
        return error
    return None


def _not_stored_problem(failure: Any) -> Any:
    """`_outcome_problem` as an errback (the reply chain): raise the problem, or pass the failure."""
    problem = _outcome_problem(failure.value)
    if problem is None:
        return failure
    raise problem


class ReplyWaiter(Waiter):
    """A request/reply request: stored like any message, then waiting for its reply."""

    __slots__ = ("_inbox", "_request_id")

    def __init__(self, inbox: ReplyInbox, request_id: str) -> None:
        super().__init__(1)
        self._inbox = inbox
        self._request_id = request_id

    def client_gone(self) -> None:
        """Free the reply entry at once and end the request (its reply, if any, will count as late).

        The request's Deferred chain must end too, not just the entry: the
        ingest counts it as in flight until then, and a graceful stop waits
        for that count.  Nothing written yet: drop the message and fail the
        request now.  Else: end its wait for the reply now (the chain picks
        that up once the message is stored).
        """
        if self.untouched:
            self.fail(CancelledError())
        else:
            self._inbox.forget(self._request_id)


def _reply_problem(failure: Any, waiter: ReplyWaiter, reply: Deferred[Reply]) -> Any:
    """Not stored: 503 (and forget the reply); no reply: 504; a malformed reply: 502."""
    error = failure.value
    if isinstance(error, ReplyTimeout):
        raise GatewayTimeout("no reply within the route's reply_timeout; the request stays queued")
    if isinstance(error, ReplyUnusable):
        raise BadGateway(f"the reply could not be relayed: {error.reason}")
    waiter._inbox.forget(waiter._request_id)
    reply.addErrback(_ignore)  # not stored: nobody waits for the reply
    return _not_stored_problem(failure)


def _ignore(failure: Any) -> None:
    """Consume the failure of a Deferred nobody waits on (not an unhandled error)."""


def _finish(request: Any, body: bytes, content_type: Optional[bytes] = None, at_turn_end: bool = False) -> None:
    request.respond(body, content_type, at_turn_end)  # IngestRequest: one buffer, Content-Length computed


def _finish_unless_gone(body: bytes, request: Any, content_type: Optional[bytes]) -> None:
    if not request.gone:
        _finish(request, body, content_type)


def _klein_ack(body: bytes, request: Request) -> bytes:
    """An ack answered through Klein (not the hot path): its headers the usual way."""
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _fail_unless_gone(failure: Any, request: Any) -> None:
    if request.gone:
        return None
    if failure.check(Problem):
        _finish(request, write_problem(request, failure.value))
        return None
    return failure


def write_problem(request: Request, problem: Problem) -> bytes:
    """Set status and headers of a problem response; return its body."""
    request.setResponseCode(problem.status)
    request.setHeader(b"Content-Type", PROBLEM_CONTENT_TYPE)
    if problem.retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % problem.retry_after)
    for name, value in problem.headers:
        request.setHeader(name, value)
    body = render_problem(problem, instance=request.path.decode("utf-8", "replace"))
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body

"""One deliver as a service: claim, gate, send, settle; stop without losing anything.

Per message (at most ``concurrency`` at once in this process):

1. **claim**, oldest first, into this process's processing list: a script
   moves as many items as there are free slots in one round trip (LMOVE
   RIGHT LEFT each); when the list is empty, ``BLMOVE <list> <processing>
   RIGHT LEFT`` waits for the next one on a dedicated connection (a blocking
   command holds its connection);
2. **gate** (relayd/deliver/gate.py): Retry-After pause, circuit breaker,
   a permit of the global rate;
3. **send** (relayd/deliver/upstream.py), signed when a secret is configured;
4. **settle** by the outcome: a 2xx removes it from the processing list; a
   retryable failure moves it to the retry set (atomically); a permanent one
   pushes its dead letter and then removes it (two single-key commands: the
   dead list may be in another Cluster slot; a crash in between duplicates
   the dead letter, never loses it).  A settle that fails because Redis is
   down is retried until it succeeds or the service stops.

Graceful stop: no new claims; requests in flight get ``shutdown_timeout``
to finish and settle; then whatever is still claimed (waiting at the gate,
cut off, or unsettled) goes back to the list with one script.  If Redis is
down then, the processing list stays and the reaper of the next process
returns it after the visibility timeout.  Nothing is dropped; duplicates
only as at-least-once allows.
"""

from __future__ import annotations

from typing import Any, Optional, Set

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config import DeliverConfig, RedisConfig
from relayd.deliver import message as msg
from relayd.deliver.breaker import STATE_VALUES, CircuitBreaker
from relayd.deliver.claims import Claims
from relayd.deliver.gate import Gate
from relayd.deliver.keys import DeliverKeys
from relayd.deliver.outcome import DEAD, DONE, backoff_delay, final_outcome
from relayd.deliver.ratelimit import GlobalRateLimiter
from relayd.deliver.retries import RetryMover
from relayd.deliver.scripts import CLAIM, TO_RETRY
from relayd.deliver.signing import sign
from relayd.deliver.upstream import Upstream
from relayd.ops.metrics import DeliverMetrics
from relayd.redis.factory import make_redis_client

#: Seconds one BLMOVE blocks; the dedicated connection's reply timeout is above it.
BLOCK_SECONDS = 1
#: Most items one claim script moves (one round trip claims a batch).
CLAIM_BATCH = 64
#: Seconds to wait before claiming again after a Redis error.
CLAIM_RETRY = 0.5
#: Seconds between settle attempts while Redis is down.
SETTLE_RETRY = 0.5
#: Seconds between queue-lag readings.
LAG_INTERVAL = 1.0


class DeliverService(Service):
    """Consumes one list and delivers each message to one upstream."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: DeliverConfig,
        redis: Any,
        redis_config: RedisConfig,
        metrics: DeliverMetrics,
        proc_id: str,
        sign_key: Optional[bytes],
        shutdown_timeout: float,
        blocking: Any = None,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self._redis = redis
        self._metrics = metrics
        self._sign_key = sign_key
        self._shutdown_timeout = shutdown_timeout
        self.keys = DeliverKeys.for_deliver(config.list, config.name, config.dead_letter, proc_id)
        # One Redis, or one connection per primary of a cluster (routed by the list's key).
        self._blocking = blocking or make_redis_client(
            reactor, attrs.evolve(redis_config, reply_timeout=BLOCK_SECONDS + redis_config.reply_timeout)
        )
        self._claims = Claims(reactor, redis, self.keys, proc_id, config.visibility_timeout)
        self._blocking.on_ready(self._claims.redis_reconnected)
        self._mover = RetryMover(reactor, redis, self.keys)
        self.breaker = CircuitBreaker(reactor, config.breaker_failures, config.backoff, config.backoff_max)
        self.gate = Gate(reactor, self.breaker, GlobalRateLimiter(redis, self.keys.rate, config.rate))
        self.upstream = Upstream(
            reactor, config.url, config.method, config.headers, config.concurrency, config.timeout
        )
        self._claimed = 0  # messages claimed and not yet settled (<= concurrency)
        self._handlers: Set[Deferred] = set()
        self._sending: Set[Deferred] = set()  # handlers past the gate (their request is out)
        self._slot_free: Optional[Deferred] = None
        self._claim_loop: Optional[Deferred] = None
        self._claiming: Optional[Deferred] = None
        self._lag = LoopingCall(self._read_lag)
        self._lag.clock = reactor
        metrics.in_flight.set_function(lambda: float(self._claimed))
        metrics.circuit_state.set_function(lambda: STATE_VALUES[self.breaker.state])

    # -- lifecycle -----------------------------------------------------------------

    def startService(self) -> None:
        """Connect, take the lease, start the mover and the claim loop."""
        super().startService()
        self._blocking.startService()
        self._claims.start()
        self._mover.start()
        self._lag.start(LAG_INTERVAL, now=False)
        self._claim_loop = ensureDeferred(self._claim_forever())

    def stopService(self) -> Deferred:
        """Graceful stop (module docstring); fires when everything claimed is settled or returned."""
        if not self.running:
            return succeed(None)
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._claims.stop()
        self._mover.stop()
        if self._lag.running:
            self._lag.stop()
        self._wake()
        if self._claiming is not None:
            self._claiming.cancel()
        await self._blocking.stopService()  # a BLMOVE answered meanwhile stays claimed: returned below
        if self._claim_loop is not None:
            await self._claim_loop
        self.gate.close()  # waiting at the gate: never sent, returned below
        sending = list(self._sending)
        if sending:
            self._log.info(
                "deliver {name}: waiting up to {timeout} s for {count} requests in flight",
                name=self.config.name, timeout=self._shutdown_timeout, count=len(sending),
            )

            def cut_off() -> None:
                for d in sending:
                    d.cancel()

            timer = self._reactor.callLater(self._shutdown_timeout, cut_off)
            await DeferredList(sending, consumeErrors=True)
            if timer.active():
                timer.cancel()
        await DeferredList(list(self._handlers), consumeErrors=True)
        try:
            returned = await self._claims.release()
            if returned:
                self._log.info(
                    "deliver {name}: {count} unfinished messages returned to {list}",
                    name=self.config.name, count=int(returned), list=self.config.list,
                )
        except Exception as e:
            self._log.warn(
                "deliver {name}: could not return claimed messages ({error}); the reaper will after {t} s",
                name=self.config.name, error=e, t=self.config.visibility_timeout,
            )
        await self.upstream.close()

    # -- claiming ----------------------------------------------------------------

    def _wake(self) -> None:
        d, self._slot_free = self._slot_free, None
        if d is not None:
            d.callback(None)

    async def _claim_forever(self) -> None:
        k = self.keys
        while self.running:
            if self._claimed >= self.config.concurrency or not (self._claims.registered and self._blocking.ready):
                self._slot_free = Deferred()
                waiter = self._slot_free
                if self._claimed < self.config.concurrency:  # waiting for Redis / the lease
                    timer = self._reactor.callLater(CLAIM_RETRY, self._wake)
                    await waiter
                    if timer.active():
                        timer.cancel()
                else:
                    await waiter
                continue
            free = min(self.config.concurrency - self._claimed, CLAIM_BATCH)
            try:
                batch = await CLAIM.run(self._redis, [k.list, k.processing], [free])
            except Exception as e:
                if not self.running:
                    return
                self._log.debug("deliver: claim failed: {error}", error=e)
                await deferLater(self._reactor, CLAIM_RETRY, lambda: None)
                continue
            if not self.running:
                return  # claimed while stopping: never started, returned with the processing list
            if batch:
                for raw in batch:
                    self._start(raw)
                continue
            if not self.running:
                return
            # The list is empty: block (on the dedicated connection) until one arrives.
            d = self._blocking.execute(b"BLMOVE", k.list, k.processing, b"RIGHT", b"LEFT", BLOCK_SECONDS)
            self._claiming = d
            try:
                raw = await d
            except Exception as e:
                self._claiming = None
                if not self.running:
                    return
                self._log.debug("deliver: claim failed: {error}", error=e)
                await deferLater(self._reactor, CLAIM_RETRY, lambda: None)
                continue
            self._claiming = None
            if raw is not None and self.running:
                self._start(raw)

    def _start(self, raw: bytes) -> None:
        self._claimed += 1
        handler = ensureDeferred(self._handle(raw))
        self._handlers.add(handler)
        handler.addBoth(self._handled, handler)

    def _handled(self, result: Any, handler: Deferred) -> None:
        self._handlers.discard(handler)
        self._claimed -= 1
        if isinstance(result, Failure) and not result.check(CancelledError):
            self._log.failure("deliver {name}: unexpected error", result, name=self.config.name)
        self._wake()

    # -- one message ---------------------------------------------------------------

    async def _handle(self, raw: bytes) -> None:
        claimed = msg.parse_claimed(raw)
        request = msg.to_request(claimed.item)
        try:
            await self.gate.enter()
        except CancelledError:
            return  # stopping: the item is returned with the processing list
        sending = ensureDeferred(self._attempt(claimed, request))
        self._sending.add(sending)
        try:
            await sending
        except CancelledError:
            return  # cut off at stop: returned with the processing list
        finally:
            self._sending.discard(sending)
            self.gate.pump()

    async def _attempt(self, claimed: msg.Claimed, request: msg.Request) -> None:
        now = self._reactor.seconds()
        extra = {}
        if self._sign_key is not None:
            extra = sign(self._sign_key, request.message_id, int(now), request.body)
        attempt = await self.upstream.send(request.message_id, request.body, request.content_type, extra)
        outcome = attempt.outcome
        m = self._metrics
        m.latency.observe(attempt.seconds)
        m.attempt(f"{outcome.status // 100}xx" if outcome.status else "error")
        if outcome.upstream_failure:
            self.breaker.failure()
        else:  # any sane answer (4xx and 429 included) says the upstream is up
            self.breaker.success()
        if outcome.status in (429, 503):
            self.gate.pause(outcome.retry_after if outcome.retry_after is not None else self.config.backoff)
        attempts = claimed.attempts + 1
        first_ts = claimed.first_ts if claimed.first_ts is not None else now
        outcome = final_outcome(outcome, attempts, self.config.max_attempts)
        await self._settle(claimed, outcome, attempts, first_ts)

    async def _settle(self, claimed: msg.Claimed, outcome: Any, attempts: int, first_ts: float) -> None:
        k = self.keys
        cfg = self.config
        dead_pushed = False
        while True:
            try:
                if outcome.kind == DONE:
                    await self._redis.execute(b"LREM", k.processing, 1, claimed.raw)
                elif outcome.kind == DEAD:
                    if not dead_pushed:
                        item = msg.dead_letter(
                            claimed.item, outcome.status, outcome.detail, attempts, first_ts, self._reactor.seconds()
                        )
                        await self._redis.execute(b"LPUSH", k.dead, item)
                        dead_pushed = True
                        self._metrics.dead_lettered.inc()
                    await self._redis.execute(b"LREM", k.processing, 1, claimed.raw)
                else:
                    delay = backoff_delay(attempts, cfg.backoff, cfg.backoff_max)
                    if outcome.retry_after is not None:
                        delay = max(delay, outcome.retry_after)
                    due = self._reactor.seconds() + delay
                    await TO_RETRY.run(
                        self._redis,
                        [k.processing, k.retry],
                        [claimed.raw, b"%.3f" % due, msg.wrap_retry(claimed.item, attempts, first_ts)],
                    )
                    self._metrics.retries.inc()
                return
            except Exception as e:
                if not self.running:
                    return  # stopping with Redis down: the item stays claimed, the reaper returns it
                self._log.debug("deliver: settle failed, retrying: {error}", error=e)
                await deferLater(self._reactor, SETTLE_RETRY, lambda: None)

    # -- observation ---------------------------------------------------------------

    def _read_lag(self) -> None:
        def got(item: Optional[bytes]) -> None:
            ts = msg.enqueued_at(item) if item else None
            self._metrics.queue_lag.set(max(0.0, self._reactor.seconds() - ts) if ts is not None else 0.0)

        if self._redis.ready:
            self._redis.execute(b"LINDEX", self.keys.list, -1).addCallbacks(got, lambda _: None)

"""What an upstream answer means for a message, and how long a retry waits.

Pure functions (no I/O, randomness injected) so the rules of CONTRACT.md are
unit- and property-tested directly:

- 2xx: done;
- 408, 425, 429, 5xx, timeouts, connection errors: retry after the backoff;
  a ``Retry-After`` on 429/503 is the minimum delay, and pauses the whole
  deliver (not one request: vector#4724);
- any other status (1xx/3xx included: the agent follows no redirects): dead at once;
- a retry that would exceed ``max_attempts``: dead.
"""

from __future__ import annotations

import email.utils
import random
from typing import Callable, Optional

import attrs

DONE, RETRY, DEAD = "done", "retry", "dead"
RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: Statuses whose Retry-After pauses the deliver (RFC 9110 gives it to both).
PAUSING_STATUSES = frozenset({429, 503})
#: Longest Retry-After honoured, seconds: a typo of "86400" must not stall a deliver for a day.
MAX_RETRY_AFTER = 3600.0


@attrs.frozen
class Outcome:
    """The verdict on one attempt."""

    kind: str  # DONE, RETRY or DEAD
    status: Optional[int]  # HTTP status, None for timeouts and connection errors
    detail: str
    retry_after: Optional[float] = None  # seconds the upstream asked for (429/503)
    #: True when the failure says the upstream is unhealthy (counts for the breaker).
    upstream_failure: bool = False


def parse_retry_after(value: Optional[bytes], now: float) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


def classify_status(status: int, retry_after: Optional[float] = None, body_hint: str = "") -> Outcome:
    """The outcome of an attempt that got an HTTP status."""
    if 200 <= status < 300:
        return Outcome(DONE, status, "")
    detail = f"upstream answered {status}" + (f": {body_hint}" if body_hint else "")
    if status in RETRYABLE_STATUSES or 500 <= status < 600:
        return Outcome(
            RETRY,
            status,
            detail,
            retry_after if status in PAUSING_STATUSES else None,
            upstream_failure=status >= 500 or status == 408,
        )
    return Outcome(DEAD, status, detail)


def classify_error(detail: str) -> Outcome:
    """The outcome of an attempt without a status (timeout, refused, reset, garbage)."""
    return Outcome(RETRY, None, detail, upstream_failure=True)


def backoff_delay(
    attempts: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before the retry after `attempts` failed attempts (1 = first retry).

    Exponential ``base * 2**(attempts-1)`` capped at `cap`, with "equal
    jitter": half fixed, half random, so retries of messages that failed
    together spread out but never come back sooner than half the backoff.
    """
    exp = min(cap, base * 2.0 ** min(attempts - 1, 60))
    return exp / 2.0 + rand() * exp / 2.0


def final_outcome(outcome: Outcome, attempts: int, max_attempts: int) -> Outcome:
    """A retry past `max_attempts` becomes a dead letter (same status and detail)."""
    if outcome.kind == RETRY and attempts >= max_attempts:
        return attrs.evolve(outcome, kind=DEAD, detail=f"{outcome.detail} (after {attempts} attempts)")
    return outcome

"""Who may post: bearer tokens and signed webhooks, per route.

Bearer tokens (``auth_tokens_file``, one per line, ``#`` comments) are kept
as SHA-256 digests and a presented token is hashed before the set lookup:
the lookup time then depends on a hash of the guess, not on how many of its
leading characters match a real token (the timing leak that `==` on the
secret itself has).  The file is re-read when its mtime changes (checked at
most once per `RELOAD_CHECK_INTERVAL`) and on `reload()` (SIGHUP), so
rotating a token needs no restart.  A file that turns unreadable keeps the
last good set (logged), rather than locking every client out.

Signed webhooks (``webhook_secret_file``):

- ``webhook_scheme = "standard"`` (Standard Webhooks): headers
  ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` (space
  separated ``v1,<base64 HMAC-SHA256>``), signed content
  ``id.timestamp.body``; the secret may carry the ``whsec_`` prefix (then it
  is base64).  A timestamp outside ``webhook_tolerance`` is refused: a
  captured request cannot be replayed later.  Senders' retries reuse the id
  within the window and are accepted (consumers dedupe).
- ``webhook_scheme = "github"``: ``X-Hub-Signature-256: sha256=<hex>``, an
  HMAC-SHA256 of the body (GitHub signs no timestamp, so no replay window).

Missing credentials -> 401 (with ``WWW-Authenticate``), wrong ones -> 403.
Secrets and presented credentials never reach a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Any, Callable, FrozenSet, List, Optional

from twisted.logger import Logger

from relayd.ingest.problems import Forbidden, Unauthorized

RELOAD_CHECK_INTERVAL = 1.0  # seconds between mtime checks of a tokens file


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def read_tokens(path: str) -> FrozenSet[bytes]:
    """Digests of the tokens in a file: one per line, blanks and ``#`` ignored."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return frozenset(_digest(t.strip()) for t in lines if t.strip() and not t.strip().startswith(b"#"))


class BearerTokens:
    """A reloadable set of bearer tokens for one route."""

    _log = Logger()

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self._path = path
        self._clock = clock
        self._mtime = self._stat()
        self._digests = read_tokens(path)
        self._checked = clock()

    def _stat(self) -> Optional[float]:
        try:
            return os.stat(self._path).st_mtime
        except OSError:
            return None

    def reload(self) -> None:
        """Re-read the file now (SIGHUP); keep the old set if it cannot be read."""
        try:
            self._digests = read_tokens(self._path)
            self._mtime = self._stat()
            self._log.info("reloaded {count} tokens from {path}", count=len(self._digests), path=self._path)
        except OSError as e:
            self._log.error("cannot read tokens file {path}: {error}; keeping the previous tokens", path=self._path, error=e.strerror)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_INTERVAL:
            return
        self._checked = now
        mtime = self._stat()
        if mtime is not None and mtime != self._mtime:
            self.reload()

    def check(self, authorization: Optional[bytes]) -> bytes:
        """Return the token (the client's identity) or raise 401/403."""
        if not authorization:
            raise Unauthorized("this route needs Authorization: Bearer <token>", headers=_CHALLENGE)
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Unauthorized("use Authorization: Bearer <token>", headers=_CHALLENGE)
        self._maybe_reload()
        if _digest(token) not in self._digests:
            raise Forbidden("the bearer token is not valid for this route")
        return token


_CHALLENGE = ((b"WWW-Authenticate", b'Bearer realm="relayd"'),)


def read_secret(path: str) -> bytes:
    """A webhook secret from a file (first line); ``whsec_`` secrets are base64."""
    with open(path, "rb") as f:
        words = f.read().split()
    secret = words[0] if words else b""
    if not secret:
        raise ValueError(f"{path} holds no secret")
    if secret.startswith(b"whsec_"):
        return base64.b64decode(secret[6:])
    return secret


class WebhookVerifier:
    """Verifies signed webhook requests for one route."""

    def __init__(self, secret: bytes, scheme: str, tolerance: float, clock: Callable[[], float]) -> None:
        self._secret = secret
        self._scheme = scheme
        self._tolerance = tolerance
        self._clock = clock

    def check(self, headers: Any, body: bytes) -> None:
        """Raise 401 when the signature headers are missing, 403 when wrong or stale."""
        if self._scheme == "github":
            self._check_github(headers, body)
        else:
            self._check_standard(headers, body)

    def _check_github(self, headers: Any, body: bytes) -> None:
        sig = _header(headers, b"x-hub-signature-256")
        if sig is None:
            raise Unauthorized("this route needs an X-Hub-Signature-256 header")
        expected = b"sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(sig.strip().lower(), expected):
            raise Forbidden("X-Hub-Signature-256 does not match the body")

    def _check_standard(self, headers: Any, body: bytes) -> None:
        msg_id = _header(headers, b"webhook-id")
        timestamp = _header(headers, b"webhook-timestamp")
        signature = _header(headers, b"webhook-signature")
        if msg_id is None or timestamp is None or signature is None:
            raise Unauthorized("this route needs webhook-id, webhook-timestamp and webhook-signature headers")
        try:
            ts = int(timestamp)
        except ValueError:
            raise Forbidden("webhook-timestamp is not an integer") from None
        if abs(self._clock() - ts) > self._tolerance:
            raise Forbidden(f"webhook-timestamp is outside the {self._tolerance:g}s tolerance (replayed or clock skew)")
        mac = hmac.new(self._secret, msg_id + b"." + timestamp + b"." + body, hashlib.sha256).digest()
        for candidate in _signatures(signature):
            if hmac.compare_digest(candidate, mac):
                return
        raise Forbidden("no webhook-signature matches the request")


def _signatures(header: bytes) -> List[bytes]:
    out = []
    for part in header.split():
        version, _, value = part.partition(b",")
        if version == b"v1":
            try:
                out.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                continue
    return out


def _header(headers: Any, name: bytes) -> Optional[bytes]:
    values = headers.getRawHeaders(name)
    return values[0] if values else None

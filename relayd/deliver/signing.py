"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``
keyed with the secret; a secret written ``whsec_<base64>`` is the base64 of
the key (the spec's format), any other text is used as the key's bytes.
The tests verify these headers with the reference `standardwebhooks` library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Dict

SECRET_PREFIX = "whsec_"


def secret_key(text: str) -> bytes:
    """The HMAC key of a secret file's content (whitespace around it ignored)."""
    text = text.strip()
    if text.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error:
            pass
    return text.encode("utf-8")


def load_secret(path: str) -> bytes:
    """Read a ``sign_secret_file`` (checked readable at config load)."""
    with open(path, encoding="utf-8") as f:
        return secret_key(f.read())


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> Dict[bytes, bytes]:
    """The three signature headers of one request."""
    signed = b"%s.%d.%s" % (message_id.encode("utf-8"), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return {
        b"webhook-id": message_id.encode("utf-8"),
        b"webhook-timestamp": b"%d" % timestamp,
        b"webhook-signature": b"v1," + base64.b64encode(digest),
    }

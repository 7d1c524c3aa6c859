"""Bearer tokens and signed webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from relayd.ingest.auth import BearerTokens, WebhookVerifier, read_secret
from relayd.ingest.problems import Forbidden, Unauthorized


class BearerTokenTests(SynchronousTestCase):
    """Tokens from a file, checked without comparing secrets directly."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "tokens")
        self.write(b"# ops\nalpha\n\n  beta  \n")
        self.clock = Clock()
        self.tokens = BearerTokens(self.path, self.clock.seconds)

    def write(self, data, mtime=None):
        with open(self.path, "wb") as f:
            f.write(data)
        if mtime is not None:
            os.utime(self.path, (mtime, mtime))

    def test_valid_tokens(self):
        """Each listed token passes (whitespace trimmed) and is the client's identity."""
        self.assertEqual(self.tokens.check(b"Bearer alpha"), b"alpha")
        self.assertEqual(self.tokens.check(b"bearer beta"), b"beta")

    def test_missing_is_401_wrong_is_403(self):
        """No or malformed credentials: 401 with a challenge; unknown token: 403."""
        for header in (None, b"", b"Basic YWxhZGRpbjpvcGVu", b"Bearer "):
            with self.subTest(header=header):
                e = self.assertRaises(Unauthorized, self.tokens.check, header)
                self.assertIn((b"WWW-Authenticate", b'Bearer realm="relayd"'), e.headers)
        self.assertRaises(Forbidden, self.tokens.check, b"Bearer gamma")
        self.assertRaises(Forbidden, self.tokens.check, b"Bearer # ops")

    def test_reload_on_mtime_change(self):
        """A rewritten file takes effect after the next check interval, without a restart."""
        self.write(b"gamma\n", mtime=os.stat(self.path).st_mtime + 10)
        self.assertEqual(self.tokens.check(b"Bearer alpha"), b"alpha")  # not re-checked yet
        self.clock.advance(1.5)
        self.assertEqual(self.tokens.check(b"Bearer gamma"), b"gamma")
        self.assertRaises(Forbidden, self.tokens.check, b"Bearer alpha")

    def test_unreadable_file_keeps_old_tokens(self):
        """A tokens file that disappears does not lock every client out."""
        os.unlink(self.path)
        self.tokens.reload()
        self.assertEqual(self.tokens.check(b"Bearer alpha"), b"alpha")


def standard_headers(secret, msg_id, ts, body, sig=None):
    mac = hmac.new(secret, b"%s.%d.%s" % (msg_id, ts, body), hashlib.sha256).digest()
    h = Headers()
    h.setRawHeaders(b"webhook-id", [msg_id])
    h.setRawHeaders(b"webhook-timestamp", [b"%d" % ts])
    h.setRawHeaders(b"webhook-signature", [sig if sig is not None else b"v1," + base64.b64encode(mac)])
    return h


class StandardWebhookTests(SynchronousTestCase):
    """Standard Webhooks: id.timestamp.body signed, within a tolerance window."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.secret = b"super secret key"
        self.verifier = WebhookVerifier(self.secret, "standard", 300, self.clock.seconds)

    def test_valid(self):
        """A correct signature within the window passes, also among several signatures."""
        self.verifier.check(standard_headers(self.secret, b"msg_1", 1_700_000_000, b"{}"), b"{}")
        h = standard_headers(self.secret, b"msg_1", 1_700_000_000, b"{}")
        h.setRawHeaders(b"webhook-signature", [b"v1,AAAA " + h.getRawHeaders(b"webhook-signature")[0]])
        self.verifier.check(h, b"{}")

    def test_missing_headers_401(self):
        """Without the three headers: 401."""
        self.assertRaises(Unauthorized, self.verifier.check, Headers(), b"{}")

    def test_wrong_or_stale_403(self):
        """Altered body, wrong key, garbage signature or an old timestamp: 403."""
        ok = standard_headers(self.secret, b"msg_1", 1_700_000_000, b"{}")
        self.assertRaises(Forbidden, self.verifier.check, ok, b'{"x":1}')
        self.assertRaises(Forbidden, self.verifier.check, standard_headers(b"other", b"msg_1", 1_700_000_000, b"{}"), b"{}")
        self.assertRaises(Forbidden, self.verifier.check, standard_headers(self.secret, b"m", 1_700_000_000, b"{}", sig=b"v1,!!!"), b"{}")
        old = 1_700_000_000 - 301
        self.assertRaises(Forbidden, self.verifier.check, standard_headers(self.secret, b"m", old, b"{}"), b"{}")
        future = 1_700_000_000 + 301
        self.assertRaises(Forbidden, self.verifier.check, standard_headers(self.secret, b"m", future, b"{}"), b"{}")

    def test_whsec_secret_file(self):
        """whsec_ secrets are base64; other secrets are used as they are."""
        d = tempfile.mkdtemp()
        p = os.path.join(d, "s")
        with open(p, "wb") as f:
            f.write(b"whsec_" + base64.b64encode(b"key bytes") + b"\n")
        self.assertEqual(read_secret(p), b"key bytes")
        with open(p, "wb") as f:
            f.write(b"plain\n")
        self.assertEqual(read_secret(p), b"plain")
        with open(p, "wb") as f:
            f.write(b"  \n")
        self.assertRaises(ValueError, read_secret, p)


class GithubWebhookTests(SynchronousTestCase):
    """X-Hub-Signature-256 over the body."""

    def setUp(self):
        self.verifier = WebhookVerifier(b"gh-secret", "github", 300, Clock().seconds)

    def headers(self, value):
        h = Headers()
        if value is not None:
            h.setRawHeaders(b"x-hub-signature-256", [value])
        return h

    def test_github(self):
        """Valid passes; wrong 403; missing 401."""
        body = b'{"zen": "keep it logically awesome"}'
        sig = b"sha256=" + hmac.new(b"gh-secret", body, hashlib.sha256).hexdigest().encode()
        self.verifier.check(self.headers(sig), body)
        self.verifier.check(self.headers(sig.upper().replace(b"SHA256=", b"sha256=")), body)
        self.assertRaises(Forbidden, self.verifier.check, self.headers(sig), body + b" ")
        self.assertRaises(Unauthorized, self.verifier.check, self.headers(None), body)

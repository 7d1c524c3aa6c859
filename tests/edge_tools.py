"""Tools for the edge-protection black-box tests (tests/test_edge.py).

- `start_relayd`: a real ``twistd -n relayd`` (tests/harness.py's
  `RelaydProcess`) with the tables the harness does not write itself
  (``[limits]``, a custom ``listen`` such as a TLS endpoint);
- `ClassScope`: lets the harness fixtures live for a whole test class
  (cleanups registered with ``addClassCleanup``);
- a raw-socket HTTP/1.1 client (`raw_exchange`, `read_response`) for bytes
  that http.client refuses to send, and a response parser that reports
  "closed without answering" separately from an answer;
- hypothesis strategies for hostile HTTP framing (`malformed_http`) and
  hostile bodies (`hostile_bodies`);
- `rss_kib`, `self_signed_cert`, webhook signing helpers.

Every wait is bounded; nothing here sleeps to wait for a condition.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import time
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from hypothesis import strategies as st

from tests.harness import RedisServer, RelaydProcess, free_port, to_toml

PROBLEM_MEMBERS = ("type", "title", "status", "detail")


# --------------------------------------------------------------------------
# relayd with [limits] and custom listen strings
# --------------------------------------------------------------------------


class ClassScope:
    """Stands in for a TestCase so fixtures live as long as the class.

    The harness fixtures call ``test.addCleanup``; here that becomes
    ``cls.addClassCleanup``, run after the last test of the class.
    """

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def addCleanup(self, fn: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N802 - unittest's name
        self._cls.addClassCleanup(fn, *args, **kwargs)


def start_relayd(
    test: Any,
    redis: RedisServer,
    routes: Sequence[Mapping[str, Any]],
    limits: Optional[Mapping[str, Any]] = None,
    server: Optional[Mapping[str, Any]] = None,
    files: Optional[Mapping[str, Any]] = None,
    listen: Optional[str] = None,
    ingest_port: Optional[int] = None,
) -> RelaydProcess:
    """Start relayd (1 worker) with `routes`, a ``[limits]`` table and `server` keys.

    `files` are written into relayd's working directory first, so routes can
    name them relatively (``auth_tokens_file = "tokens"``).  `listen`, when
    given, replaces the plain-TCP ingest endpoint ("{port}" is filled in).
    """
    ingest_port = ingest_port or free_port()
    admin_port = free_port()
    tables: dict = {
        "server": {
            "listen": (listen or "tcp:{port}:interface=127.0.0.1").format(port=ingest_port),
            "admin": f"tcp:{admin_port}:interface=127.0.0.1",
            "workers": 1,
            **(server or {}),
        },
        "redis": {"url": redis.url},
        "spool": {"dir": "spool", "fsync": "batch"},
    }
    if limits:
        tables["limits"] = dict(limits)
    return RelaydProcess(
        test,
        config_text=to_toml(tables, routes),
        files=files,
        ingest_port=ingest_port,
        admin_port=admin_port,
    )


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------
# raw HTTP/1.1
# --------------------------------------------------------------------------


class RawResponse(NamedTuple):
    """One parsed HTTP response from a raw socket."""

    status: int
    reason: bytes
    headers: dict  # lower-case str name -> str value (last one wins)
    header_list: list  # [(name, value)] as received
    body: bytes
    raw: bytes

    def json(self) -> Any:
        """The body as JSON (AssertionError with the bytes if it is not)."""
        try:
            return json.loads(self.body)
        except ValueError:
            raise AssertionError(f"{self.status}: body is not JSON: {self.raw[:600]!r}") from None


class Closed(NamedTuple):
    """The server closed (or reset) the connection without a full response."""

    raw: bytes  # whatever arrived before the close


def parse_response(data: bytes) -> Optional[RawResponse]:
    """Parse one complete response at the start of `data`, or None if incomplete.

    Raises AssertionError if the bytes are not HTTP/1.x at all.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if data and not b"HTTP/1.".startswith(data[:7]) and not data.startswith(b"HTTP/1."):
            raise AssertionError(f"not an HTTP response: {data[:300]!r}")
        return None
    head = data[:end].split(b"\r\n")
    status_line = head[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise AssertionError(f"bad status line: {head[0]!r}")
    header_list = []
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        n, v = name.decode("latin-1").strip(), value.decode("latin-1").strip()
        header_list.append((n, v))
        headers[n.lower()] = v
    if "content-length" not in headers:
        raise AssertionError(f"response without Content-Length: {data[:600]!r}")
    length = int(headers["content-length"])
    body = data[end + 4 : end + 4 + length]
    if len(body) < length:
        return None
    return RawResponse(
        int(status_line[1]),
        status_line[2] if len(status_line) > 2 else b"",
        headers,
        header_list,
        body,
        data[: end + 4 + length],
    )


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` with TCP_NODELAY."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(sock: socket.socket, timeout: float = 10.0, buffered: bytes = b""):
    """Read one response: `RawResponse`, or `Closed` if the server closed first.

    Raises AssertionError if neither happens within `timeout` seconds (the
    server hung on the request).
    """
    responses, closed = read_responses(sock, 1, timeout, buffered)
    return responses[0] if responses else closed


def read_responses(
    sock: socket.socket, count: int, timeout: float = 10.0, buffered: bytes = b""
) -> Tuple[List[RawResponse], Optional[Closed]]:
    """Up to `count` responses in arrival order (pipelining), and `Closed` if the server closed first.

    Raises AssertionError if neither happens within `timeout` seconds.
    """
    data = buffered
    responses: List[RawResponse] = []
    deadline = time.monotonic() + timeout
    while len(responses) < count:
        parsed = parse_response(data)
        if parsed is not None:
            responses.append(parsed)
            data = data[len(parsed.raw) :]
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"{len(responses)} of {count} responses and no close within {timeout:.1f}s; got {data[:300]!r}"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return responses, Closed(data)
        if not chunk:
            return responses, Closed(data)
        data += chunk
    return responses, None


def send_all(sock: socket.socket, data: bytes) -> bool:
    """Send `data`; False if the server closed/reset the connection meanwhile."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def raw_exchange(port: int, data: bytes, timeout: float = 10.0):
    """Open a connection, send `data`, read one response (or `Closed`), close."""
    with connect(port, timeout) as s:
        send_all(s, data)
        return read_response(s, timeout)


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes `sock` within `timeout` (data before EOF is read and dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        if not chunk:
            return True


def post_bytes(path: str, body: bytes, content_type: Optional[str] = "application/json", extra: bytes = b"") -> bytes:
    """A well-framed HTTP/1.1 POST (Content-Length) as bytes."""
    ct = b"Content-Type: %s\r\n" % content_type.encode() if content_type else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: relayd\r\n%sContent-Length: %d\r\n%s\r\n"
        % (path.encode(), ct, len(body), extra)
        + body
    )


# --------------------------------------------------------------------------
# hypothesis: hostile HTTP framing
# --------------------------------------------------------------------------


class HttpCase(NamedTuple):
    """A malformed request and what the server may do with it."""

    kind: str
    data: bytes
    may_close: bool  # True: closing without any answer is acceptable (unparseable HTTP)
    statuses: tuple  # acceptable statuses when it answers


# A body that would be a valid message if the server accepted the framing:
# if a malformed request gets through, LLEN changes and the test sees it.
VALID_BODY = b'{"edge":"smuggled"}'

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)


def malformed_http(path: str = "/in") -> st.SearchStrategy:
    """Requests whose HTTP framing is broken (each a `HttpCase`).

    Where the server can still tell a request was meant it must answer a
    4xx problem; `may_close` marks the cases where the bytes are not
    parseable as HTTP at all (garbage request line, HTTP/0.9, bad version,
    NULs) and closing without an answer is acceptable.

    Left out on purpose: obsolete line folding (RFC 9112 5.2 lets a server
    unfold it, and relayd does: it is not malformed), and a single header
    line over 16 KiB (a deterministic relayd bug with its own strict-xfail
    test, `LimitsTest.test_single_header_line_over_16k_is_431`).
    """
    p = path.encode()
    body = VALID_BODY
    n = len(body)
    head = b"POST %s HTTP/1.1\r\nHost: relayd\r\nContent-Type: application/json\r\n" % p

    garbage_line = st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b and b"\r" not in b).map(
        lambda g: HttpCase("garbage request line", g + b"\r\n\r\n", True, (400,))
    )
    http09 = st.sampled_from([b"GET /\r\n", b"GET " + p + b"\r\n", b"POST " + p + b"\r\n"]).map(
        lambda line: HttpCase("HTTP/0.9 request line", line + b"\r\n", True, (400,))
    )
    bad_version = st.sampled_from([b"HTTP/2.0", b"HTTP/1.x", b"HTTPS/1.1", b"HTTP/11", b"http/1.1 extra"]).map(
        lambda v: HttpCase(
            "bad HTTP version", b"POST %s %s\r\nContent-Length: %d\r\n\r\n%s" % (p, v, n, body), True, (400, 505)
        )
    )
    no_colon = _TOKEN.map(
        lambda name: HttpCase(
            "header line without colon",
            head + b"%s\r\nContent-Length: %d\r\n\r\n%s" % (name.encode(), n, body),
            False,
            (400,),
        )
    )
    space_before_colon = _TOKEN.map(
        lambda name: HttpCase(
            "whitespace between field name and colon (RFC 9112 5.1: MUST 400)",
            head + b"Content-Length : %d\r\nX-%s: 1\r\n\r\n%s" % (n, name.encode(), body),
            False,
            (400, 411),
        )
    )
    many_headers = st.integers(65, 400).map(
        lambda k: HttpCase(
            "more header fields than max_headers (64)",
            head + b"".join(b"X-H%d: v\r\n" % i for i in range(k)) + b"Content-Length: %d\r\n\r\n%s" % (n, body),
            False,
            (431,),
        )
    )
    big_fields = st.tuples(st.integers(2, 8), st.integers(8 * 1024, 16 * 1024 - 100)).map(
        lambda t: HttpCase(
            "head bigger than max_header_bytes (16 KiB) in a few big fields",
            head + b"".join(b"X-Big%d: %s\r\n" % (i, b"a" * t[1]) for i in range(t[0]))
            + b"Content-Length: %d\r\n\r\n%s" % (n, body),
            False,
            (431,),
        )
    )
    many_small_headers = st.integers(20, 60).map(
        lambda k: HttpCase(
            "head bigger than max_header_bytes in many fields",
            head + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(k)) + b"Content-Length: %d\r\n\r\n%s" % (n, body),
            False,
            (431,),
        )
    )
    cl_te = st.sampled_from(
        [
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % n,
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % n,
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]
    ).map(
        lambda h: HttpCase(
            "Content-Length and Transfer-Encoding together (smuggling)",
            head + h + b"%x\r\n%s\r\n0\r\n\r\n" % (n, body),
            False,
            (400,),
        )
    )
    two_cl = st.integers(0, 40).filter(lambda k: k != n).map(
        lambda k: HttpCase(
            "two different Content-Length values",
            head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s" % (n, k, body),
            False,
            (400,),
        )
    )
    bad_cl = st.sampled_from([b"-1", b"abc", b"1e3", b"0x10", b"+19", b"19, 19", b" ", b"99999999999999999999999"]).map(
        lambda v: HttpCase(
            "invalid Content-Length value", head + b"Content-Length: %s\r\n\r\n%s" % (v, body), False, (400, 413)
        )
    )
    bad_te = st.sampled_from([b"gzip", b"chunked, chunked", b"identity", b"chunked;x=1", b"xchunked", b"gzip, chunked"]).map(
        lambda v: HttpCase(
            "unsupported Transfer-Encoding",
            head + b"Transfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (v, n, body),
            False,
            (400, 501),
        )
    )
    bad_chunk = st.sampled_from(
        [b"zz", b"-1", b"0x13", b" 13", b"13 13", b"1" * 40, b"", b"13;\x00", b"+13"]
    ).map(
        lambda size: HttpCase(
            "invalid chunk size",
            head + b"Transfer-Encoding: chunked\r\n\r\n%s\r\n%s\r\n0\r\n\r\n" % (size, body),
            False,
            # 408: a 40-digit hex size is a (huge) valid size; the server then
            # waits for that many bytes until the body deadline.
            (400, 408, 413),
        )
    )
    chunk_overrun = st.integers(1, 10).map(
        lambda short: HttpCase(
            "chunk data longer than its size",
            head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (n - short, body),
            False,
            (400,),
        )
    )
    nul_in = st.sampled_from(["method", "path", "name", "value"]).map(
        lambda where: HttpCase(
            f"NUL byte in the {where}",
            {
                "method": b"PO\x00ST %s HTTP/1.1\r\n" % p,
                "path": b"POST %s\x00x HTTP/1.1\r\n" % p,
                "name": b"POST %s HTTP/1.1\r\nX-N\x00ul: 1\r\n" % p,
                "value": b"POST %s HTTP/1.1\r\nX-Nul: a\x00b\r\n" % p,
            }[where]
            + b"Host: relayd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (n, body),
            True,
            (400, 404, 405),
        )
    )
    bare_lf_cr = st.just(
        HttpCase(
            "bare CR inside a header value",
            head + b"X-Cr: a\rb\r\nContent-Length: %d\r\n\r\n%s" % (n, body),
            False,
            (400,),
        )
    )
    return st.one_of(
        garbage_line, http09, bad_version, no_colon, space_before_colon, many_headers, big_fields,
        many_small_headers, cl_te, two_cl, bad_cl, bad_te, bad_chunk, chunk_overrun, nul_in, bare_lf_cr,
    )


# --------------------------------------------------------------------------
# hypothesis: hostile bodies
# --------------------------------------------------------------------------


class BodyCase(NamedTuple):
    """A hostile body, its Content-Type and the acceptable statuses."""

    kind: str
    body: bytes
    content_type: Optional[str]
    statuses: tuple


def _wrap(value: bytes) -> st.SearchStrategy:
    """Put a hostile JSON fragment at the top, in an object, or in an array."""
    return st.sampled_from([value, b'{"v":' + value + b"}", b"[1," + value + b"]", b'{"a":{"b":[' + value + b"]}}"])


def hostile_bodies(max_lines: int = 100, overflow: bool = True, bom: bool = True) -> st.SearchStrategy:
    """Bodies an envelope route with a JSON/NDJSON content type must refuse (400/413).

    `overflow=False` leaves out numbers overflowing a double and `bom=False`
    byte order marks (for ``format = "body"`` routes, where both are known
    relayd bugs with their own strict-xfail tests).
    """
    json_ct = st.sampled_from(["application/json", "application/json; charset=utf-8", "application/vnd.x+json"])

    def case(kind: str, values: st.SearchStrategy, statuses: tuple = (400,)) -> st.SearchStrategy:
        return st.tuples(values, json_ct).map(lambda t: BodyCase(kind, t[0], t[1], statuses))

    bad_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80"])
    invalid_utf8 = case("invalid UTF-8 in a string", bad_utf8.flatmap(lambda b: _wrap(b'"x' + b + b'y"')))
    surrogate = st.sampled_from([b'"\\ud800"', b'"\\udfff"', b'"a\\ud83db"', b'"\\udc00\\ud800"']).flatmap(_wrap)
    surrogates = case("lone surrogate escape", surrogate)
    constants = case("NaN/Infinity", st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"]).flatmap(_wrap))
    overflow_case = case("number overflowing a double", st.sampled_from([b"1e999", b"-1e999", b"1E400", b"123.4e99999"]).flatmap(_wrap))
    big_int = case("5000-digit integer", st.integers(4301, 6000).map(lambda k: b"9" * k).flatmap(_wrap))
    deep = case(
        "nesting far beyond max_depth",
        st.integers(65, 10000).flatmap(
            lambda d: st.sampled_from([b"[" * d + b"]" * d, b'{"a":' * d + b"1" + b"}" * d, b"[" * d])
        ),
    )
    trailing = case(
        "trailing garbage", st.sampled_from([b'{"a":1} x', b'{"a":1}{"b":2}', b"[1]]", b'{"a":1}\x00', b'"s" "t"', b"1 2"])
    )
    bom_case = case("byte order mark", st.sampled_from([b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe"]).map(lambda b: b + b'{"a":1}'))
    garbage = case("not JSON", st.binary(min_size=1, max_size=300).filter(_not_json))
    empty = case("empty body", st.just(b""))
    truncated = case("truncated JSON", st.sampled_from([b'{"a":', b"[1,2", b'"abc', b"{", b"tru", b'{"a" 1}', b"{'a':1}"]))
    too_many_lines = st.integers(max_lines + 1, max_lines * 30).map(
        lambda k: BodyCase(f"NDJSON over max_lines ({max_lines})", b'{"n":1}\n' * k, "application/x-ndjson", (413,))
    )
    bad_line = st.tuples(st.integers(1, 50), st.sampled_from([b"NaN", b'"\\ud800"', b"{", b"[" * 100 + b"]" * 100] + ([b"1e999"] if overflow else []))).map(
        lambda t: BodyCase(
            "NDJSON batch with one hostile line",
            b'{"n":1}\n' * t[0] + t[1] + b'\n{"n":2}\n',
            "application/x-ndjson",
            (400,),
        )
    )
    blank_batch = st.integers(1, 20).map(
        lambda k: BodyCase("NDJSON batch of blank lines", b"\n" * k, "application/x-ndjson", (400,))
    )
    kinds = [invalid_utf8, surrogates, constants, big_int, deep, trailing, garbage, empty, truncated,
             too_many_lines, bad_line, blank_batch]
    if overflow:
        kinds.append(overflow_case)
    if bom:
        kinds.append(bom_case)
    return st.one_of(*kinds)


def _not_json(b: bytes) -> bool:
    try:
        json.loads(b)
    except ValueError:
        return True
    return False


# --------------------------------------------------------------------------
# TLS and webhooks
# --------------------------------------------------------------------------


def self_signed_cert(directory: str) -> tuple:
    """Write ``key.pem`` and ``cert.pem`` (CN/SAN 127.0.0.1) into `directory`; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def standard_webhook_headers(secret: bytes, body: bytes, msg_id: str = "msg_1", timestamp: Optional[int] = None) -> dict:
    """Standard Webhooks headers signing `body` with the raw `secret` bytes."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def github_signature(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def assert_problem(test: Any, resp: Any, status: Optional[int] = None) -> dict:
    """`resp` (RawResponse or harness tuple) is an application/problem+json 4xx with the RFC 9457 members."""
    if isinstance(resp, RawResponse):
        code, headers, body = resp.status, resp.headers, resp.body
    else:
        code, headers, body = resp
    if status is not None:
        test.assertEqual(code, status, f"expected {status}, got {code}: {body[:500]!r}")
    else:
        test.assertTrue(400 <= code < 500, f"expected a 4xx, got {code}: {body[:500]!r}")
    ctype = headers.get("content-type", "")
    test.assertEqual(ctype.split(";")[0].strip(), "application/problem+json", f"{code} content-type {ctype!r}: {body[:300]!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        test.fail(f"{code}: problem body is not JSON: {body[:500]!r}")
    for member in PROBLEM_MEMBERS:
        test.assertIn(member, doc, f"problem lacks {member!r}: {doc}")
    test.assertEqual(doc["status"], code, doc)
    test.assertIsInstance(doc["detail"], str)
    return doc

"""Which key a command is about, and what a Redis Cluster redirect says.

A cluster client sends each command to the primary that serves the slot of
its key.  This module is the pure part of that decision, kept apart from
the connections so that every rule can be tested without a socket:

- `command_key`: the key a command routes by (the first key; for
  ``EVAL``/``EVALSHA``/``FCALL`` the first key after *numkeys*; for
  ``XREAD``/``XREADGROUP`` the first stream after ``STREAMS``), or None for
  commands that name no key (``PING``, ``CLUSTER ...``), which may go to any
  node.  Commands with several keys must keep them in one slot (see
  `relayd.redis.keys.companion`); Redis itself refuses them otherwise
  (``CROSSSLOT``), so routing by the first key is enough.
- `parse_redirect`: ``MOVED <slot> <host>:<port>`` (the slot has a new owner:
  update the map) and ``ASK <slot> <host>:<port>`` (the slot is migrating and
  this key is already on the target: send ``ASKING`` + the command there
  once, keep the map).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import attrs

Address = Tuple[str, int]

# Commands whose keys start after a numkeys argument at index 2.
_NUMKEYS_COMMANDS = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"})
# Commands that name a stream after a STREAMS token.
_STREAMS_COMMANDS = frozenset({b"XREAD", b"XREADGROUP"})
# Commands that name no key: any node answers them.
_KEYLESS_COMMANDS = frozenset(
    {
        b"PING", b"ECHO", b"INFO", b"CLUSTER", b"ASKING", b"READONLY", b"READWRITE", b"TIME", b"DBSIZE",
        b"AUTH", b"HELLO", b"SELECT", b"CLIENT", b"CONFIG", b"COMMAND", b"SCRIPT", b"FUNCTION", b"QUIT",
        b"MULTI", b"EXEC", b"DISCARD", b"WAIT", b"LASTSAVE", b"ROLE", b"MEMORY", b"LATENCY", b"SLOWLOG",
    }
)  # fmt: skip


def _as_bytes(value: Union[bytes, str, int, float]) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("ascii")


def command_key(args: Sequence[Union[bytes, str, int, float]]) -> Optional[bytes]:
    """The key `args` (a command and its arguments) routes by, or None."""
    if len(args) < 2:
        return None
    name = _as_bytes(args[0]).upper()
    if name in _KEYLESS_COMMANDS:
        return None
    if name in _NUMKEYS_COMMANDS:
        if len(args) < 4 or int(args[2]) < 1:
            return None
        return _as_bytes(args[3])
    if name in _STREAMS_COMMANDS:
        for i in range(1, len(args) - 1):
            if _as_bytes(args[i]).upper() == b"STREAMS":
                return _as_bytes(args[i + 1])
        return None
    return _as_bytes(args[1])


@attrs.frozen
class Redirect:
    """A ``MOVED`` or ``ASK`` error: `slot` is served (or being served) at `address`."""

    kind: str  # "MOVED" or "ASK"
    slot: int
    address: Address


def parse_address(text: str, default_host: str) -> Optional[Address]:
    """``host:port`` (IPv6 hosts have colons: the port is after the last one).

    An empty host (a node that does not know its own address) means "the
    node that answered", `default_host`.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    return (host or default_host, int(port))


def parse_redirect(message: Union[str, bytes], default_host: str) -> Optional[Redirect]:
    """The redirect in an error reply's text, or None when it is another error."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    address = parse_address(parts[2], default_host)
    if address is None:
        return None
    return Redirect(parts[0], int(parts[1]), address)

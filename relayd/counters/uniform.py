"""The uniform-batch parser: items of one length and one layout, cut at fixed offsets.

Why: under load nearly every batch is uniform.  Ingest writes every
envelope of a route with the same head (``"route"``, ``"content_type"``),
ids are fixed-width hex, ``ts`` is ``%.6f`` (fixed width for centuries),
keys are usually UUIDs and values usually ``1``: every item has the same
length and its fields sit at the same offsets.  Cutting the fields out
with one `struct` unpack and checking the rest with C-level bulk
operations costs ~0.4 us an item; the regular expression of the lean
parser (aggregate.py) scans all ~180 bytes of every item, ~1.1 us, and the
general parser ~3 us.

Exactness, i.e. the columns returned are what ``ujson.loads`` of every item
gives:

1. The first item is matched by the lean parser's own pattern (the exact
   envelope shape, all groups checked).  Its group spans fix the layout:
   the constant text between the fields (``{"id":"``, ``","ts":``, the head
   plus ``,"body":{"<key>":"``, ...) and each field's offset and width.
2. Every item is cut at those offsets (`struct`), and the batch is rebuilt
   from the constants and the cut fields and compared with the body: equal
   means every item is ``const0 id const1 ts const2 f1 const3 f2 const4``
   with the *same* constants as the first item.
3. Each field column is checked against the grammar the pattern gives that
   field: ids ``[0-9A-Za-z_-]``; ts digits with the point at the first
   item's place and no leading zero (other shapes: the pattern's own ts
   grammar over the column); keys free of ``"``, ``\\`` and control
   characters (the body is valid UTF-8: the caller checked); values the
   pattern's integer grammar.  A field that obeys its grammar ends exactly
   where its constant begins (a key has no ``"``, a number stops at ``,`` or
   ``}``), so every item is a JSON document of the pattern's shape and its
   parse is those fields.

Anything else (lengths that differ, another route's head in the batch, a
bad field) returns None and the caller tries the next parser; nothing is
guessed.
"""

from __future__ import annotations

import re
import struct
from typing import Iterator, List, NamedTuple, Optional, Pattern, Sequence, Tuple

#: Bytes an id may hold (the lean pattern's id group).
_ID_CHARS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-"
#: Bytes a key string may not hold unescaped: the quote, the backslash, control characters.
_KEY_BAD = b'"\\' + bytes(range(0x20))
_DIGITS = b"0123456789"
#: The lean pattern's ts and value grammars, for whole columns (each element followed by a comma).
_TS_COLUMN = re.compile(rb"(?:-?(?:0|[1-9][0-9]{0,17}+)(?:\.[0-9]{1,17}+)?,)*+")
_VALUE_COLUMN = re.compile(rb"(?:-?(?:0|[1-9][0-9]{0,14}+),)*+")
#: Items rebuilt and compared at a time (~50 KB: stays in the cache, no fresh pages per batch).
_CHUNK_ITEMS = 256


class Columns(NamedTuple):
    """A uniform batch's fields, one entry per item, in batch order (all bytes)."""

    ids: Sequence[bytes]
    tss: Sequence[bytes]
    keys: Sequence[bytes]
    values: Sequence[bytes]
    #: True when every ts has the first one's fixed-point shape (text order = numeric order).
    ts_fixed_point: bool = False


def parse_uniform(body: bytes, lengths: List[int], patterns: Sequence[Tuple[Pattern[bytes], int]]) -> Optional[Columns]:
    """The columns of a batch whose items all have one length and layout, or None (module docstring).

    `patterns` are the lean parser's (pattern, fixed length) pairs, key
    first then value first: groups 1 id, 2 ts, 3 head, then the body's
    two fields in order.
    """
    n = len(lengths)
    size = lengths[0] if n else 0
    if size <= 0 or lengths.count(size) != n or len(body) != n * size:
        return None
    for order, (pattern, _fixed) in enumerate(patterns):
        m = pattern.fullmatch(body, 0, size)
        if m is None:
            continue
        # groups 1 id, 2 ts, (3 head: constant), 4 and 5 the body's fields; the value is 5 or 4
        spans = [m.span(g) for g in (1, 2, 4, 5)]
        value_at = 3 if order == 0 else 2
        vs, ve = spans[value_at]
        # values all "1" (the usual increment): the value is part of the constant text, not a field
        ones = ve - vs == 1 and body[vs::size] == b"1" * n
        cut = [span for i, span in enumerate(spans) if not (ones and i == value_at)]
        columns = _cut(body, n, size, cut)
        if columns is None:
            return None
        if ones:
            columns.insert(value_at, [b"1"] * n)
        ids, tss, first, second = columns
        keys, values = (first, second) if order == 0 else (second, first)
        fixed_point = _fixed_point(tss)
        if not (
            _ids_ok(ids)
            and (fixed_point or _ts_grammar_ok(tss))
            and _keys_ok(keys)
            and (ones or _values_ok(values))
        ):
            return None
        return Columns(ids, tss, keys, values, fixed_point)
    return None


def _cut(body: bytes, n: int, size: int, spans: List[Tuple[int, int]]) -> Optional[List[Sequence[bytes]]]:
    """The fields at `spans` (offsets in an item) of every item, if the text around them is the first item's in every item.

    One `struct` unpack cuts the fields; the batch rebuilt from the first
    item's constant text and the cut fields must equal the body.
    """
    fmt, at = [], 0
    for start, end in spans:
        fmt.append("%dx%ds" % (start - at, end - start))
        at = end
    fmt.append("%dx" % (size - at))
    columns: List[Sequence[bytes]] = list(zip(*struct.Struct("".join(fmt)).iter_unpack(body)))
    constants = [body[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [size])]
    k = len(spans)
    parts: List[bytes] = [b""] * (2 * k * n + 1)
    parts[0] = constants[0]
    for j, column in enumerate(columns):
        parts[1 + 2 * j :: 2 * k] = column
        if j < k - 1:
            parts[2 + 2 * j :: 2 * k] = [constants[j + 1]] * n
    parts[2 * k :: 2 * k] = [constants[k] + constants[0]] * n
    parts[-1] = constants[k]
    # compared a few hundred items at a time: a rebuilt copy of the whole batch (megabytes, fresh
    # pages from the kernel for every batch) cost 4x more than the rebuilding itself (measured)
    step, at, join, starts = 2 * k * _CHUNK_ITEMS, 0, b"".join, body.startswith
    for i in range(0, len(parts), step):
        piece = join(parts[i : i + step])
        if not starts(piece, at):
            return None
        at += len(piece)
    return columns if at == len(body) else None


def _joined(column: Sequence[bytes]) -> Iterator[bytes]:
    """`column` joined `_CHUNK_ITEMS` * 8 entries at a time (small pieces: no fresh pages per batch)."""
    step, join = 8 * _CHUNK_ITEMS, b"".join
    for i in range(0, len(column), step):
        yield join(column[i : i + step])


def _ids_ok(ids: Sequence[bytes]) -> bool:
    """Every id is of the id alphabet (all have the first one's width, 1-64)."""
    return not any(piece.translate(None, _ID_CHARS) for piece in _joined(ids))


def _ts_grammar_ok(tss: Sequence[bytes]) -> bool:
    """Every ts is a JSON number of the lean grammar (any shape: integers, signs, other widths)."""
    joined = b",".join(tss) + b","
    # a comma cut out with a field would split it in two valid numbers: one comma per field exactly
    return joined.count(b",") == len(tss) and _TS_COLUMN.fullmatch(joined) is not None


def _fixed_point(tss: Sequence[bytes]) -> bool:
    """True if every ts is ``%.Nf``-shaped like the first: digits, the point at one place, no sign, no
    leading zero; then their text order is their numeric order."""
    width = len(tss[0])
    dot = tss[0].find(b".")
    if dot <= 0 or tss[0].startswith(b"-"):
        return False
    for piece in _joined(tss):
        m = len(piece) // width
        if not (
            piece.count(b".") == m
            and piece[dot::width].count(b".") == m
            and not piece.translate(None, _DIGITS + b".")
            and (dot == 1 or piece[0::width].count(b"0") == 0)
        ):
            return False
    return True


def _keys_ok(keys: Sequence[bytes]) -> bool:
    """No key holds a quote, a backslash or a control character."""
    return all(len(piece.translate(None, _KEY_BAD)) == len(piece) for piece in _joined(keys))


def _values_ok(values: Sequence[bytes]) -> bool:
    """Every value is an integer of the lean grammar (fast when all are ``1``)."""
    if values.count(b"1") == len(values):
        return True
    joined = b",".join(values) + b","
    return joined.count(b",") == len(values) and _VALUE_COLUMN.fullmatch(joined) is not None

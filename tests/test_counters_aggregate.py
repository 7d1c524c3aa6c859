"""Pure parts of the counters: aggregation, pointers, summaries, config.

test-case-name: tests.test_counters_aggregate
"""

from __future__ import annotations

import hashlib
import json
import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.codec import encode_envelope
from relayd.config import ConfigError, config_from_string
from relayd.counters.aggregate import (
    MAX_MAGNITUDE,
    PointerError,
    _aggregate_lean,
    aggregate,
    aggregate_items,
    batch_digest,
    frame,
    parse_pointer,
    parse_take_reply,
    resolve,
)
from relayd.counters.redis_sink import apply_args, parse_marker
from relayd.counters.summary import Summary

KEY, VALUE = ("key",), ("value",)


def env(i: int, body: object, ts: float = 1.0) -> bytes:
    """An envelope with id number `i`."""
    return encode_envelope("%030x" % i, ts, "/increments", "application/json", body)


@st.composite
def increment_items(draw):  # type: ignore[no-untyped-def]
    """(items, expected sums, expected dead count) for a random mix of good, bad and repeated items."""
    items, sums, dead = [], {}, 0
    n = draw(st.integers(0, 40))
    for i in range(n):
        kind = draw(st.sampled_from(["good", "good", "good", "nokey", "float", "big", "junk", "repeat"]))
        if kind == "good" or (kind == "repeat" and not items):
            key = draw(st.sampled_from(["a", "b", "c", "ü/~"]))
            value = draw(st.integers(-1000, 1000))
            items.append(env(i, {"key": key, "value": value}))
            sums[key] = sums.get(key, 0) + value
        elif kind == "repeat":
            items.append(items[draw(st.integers(0, len(items) - 1))])  # the outbox pushed one twice
            if not _is_good(items[-1]):
                dead += 1  # a misfit is dead-lettered each time; a good repeat counts once
        elif kind == "nokey":
            items.append(env(i, {"value": 1}))
            dead += 1
        elif kind == "float":
            items.append(env(i, {"key": "a", "value": 1.5}))
            dead += 1
        elif kind == "big":
            items.append(env(i, {"key": "a", "value": MAX_MAGNITUDE}))
            dead += 1
        else:
            items.append(b"\xff not json")
            dead += 1
    return items, sums, dead


def _is_good(item: bytes) -> bool:
    try:
        body = json.loads(item)["body"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False
    v = body.get("value") if isinstance(body, dict) else None
    return isinstance(v, int) and isinstance(body.get("key"), str) and abs(v) < MAX_MAGNITUDE


class AggregateTests(unittest.TestCase):
    """`aggregate` and `batch_digest`."""

    @given(increment_items())
    def test_sums_and_dead(self, case) -> None:  # type: ignore[no-untyped-def]
        """Sums equal the good values per key (a repeated id once); every misfit is dead, nothing else is."""
        items, sums, dead = case
        batch = aggregate(items, KEY, VALUE)
        self.assertEqual(batch.sums, {k: v for k, v in sums.items() if v != 0})
        self.assertEqual(len(batch.dead), dead)
        self.assertEqual(batch.size, len(items))
        self.assertEqual(batch.id, aggregate(list(items), KEY, VALUE).id)  # deterministic: a recovery agrees

    @given(st.lists(st.binary(max_size=20), max_size=10), st.lists(st.binary(max_size=20), max_size=10))
    def test_digest_separates_batches(self, a, b) -> None:  # type: ignore[no-untyped-def]
        """Different item lists have different fence digests and batch ids (lengths: no concatenation collisions)."""
        if a != b:
            self.assertNotEqual(batch_digest(a), batch_digest(b))
            self.assertNotEqual(frame(a).id, frame(b).id)

    def test_digest_matches_lua_definition(self) -> None:
        """The fence digest is SHA-1 over ``len:item`` (what TRIM_TAIL computes)."""
        self.assertEqual(batch_digest([b"ab", b"c"]), hashlib.sha1(b"2:ab1:c").hexdigest())

    @given(st.lists(st.binary(max_size=30), min_size=1, max_size=10))
    def test_frame_round_trip(self, items) -> None:  # type: ignore[no-untyped-def]
        """A TAKE reply parses back to the same id and items; the id is SHA-1 of ``<lengths>\\n<SHA-1 hex of the items>``."""
        f = frame(items)
        lengths = b",".join(b"%d" % len(i) for i in items)
        inner = hashlib.sha1(b"".join(items)).hexdigest().encode()
        self.assertEqual(f.id, hashlib.sha1(lengths + b"\n" + inner).hexdigest())
        back = parse_take_reply([f.id.encode(), lengths, f.body])
        self.assertEqual((back.id, back.items()), (f.id, list(items)))  # type: ignore[union-attr]
        self.assertIsNone(parse_take_reply([]))
        with self.assertRaises(ValueError):
            parse_take_reply([f.id.encode(), lengths, f.body + b"x"])

    def test_duplicates_adjust_sums(self) -> None:
        """`Batch.without` takes duplicate messages' values out and drops zero sums."""
        batch = aggregate([env(1, {"key": "a", "value": 2}), env(2, {"key": "b", "value": 3})], KEY, VALUE)
        self.assertEqual(batch.without(["%030x" % 2]), {"a": 2})

    def test_sum_overflow_is_dead(self) -> None:
        """A message that would push its key's batch sum past 2**53 is dead-lettered, earlier ones count."""
        big = MAX_MAGNITUDE - 1
        batch = aggregate([env(1, {"key": "a", "value": big}), env(2, {"key": "a", "value": 1})], KEY, VALUE)
        self.assertEqual(batch.sums, {"a": big})
        self.assertIn("out of range", batch.dead[0].reason)

    def test_dead_letter_shape(self) -> None:
        """A dead letter is ``{"message": <item as JSON>, "error": {"detail": reason}}``."""
        batch = aggregate([env(1, {"value": 1})], KEY, VALUE)
        letter = json.loads(batch.dead[0].letter())
        self.assertEqual(letter["message"]["body"], {"value": 1})
        self.assertIn("key pointer /key", letter["error"]["detail"])


class PointerTests(unittest.TestCase):
    """RFC 6901 pointers."""

    def test_parse_and_resolve(self) -> None:
        """Escapes, nesting and array indexes resolve; missing paths do not."""
        self.assertEqual(parse_pointer("/a~1b/~0c/0"), ("a/b", "~c", "0"))
        doc = {"a/b": {"~c": [7]}}
        self.assertEqual(resolve(doc, parse_pointer("/a~1b/~0c/0")), 7)
        self.assertIsNot(resolve(doc, parse_pointer("/a~1b/~0c/1")), 7)
        for bad in ("", "key", "/a~2"):
            with self.assertRaises(PointerError):
                parse_pointer(bad)


class WireTests(unittest.TestCase):
    """Summaries and APPLY arguments."""

    @given(st.dictionaries(st.text(max_size=10), st.integers(-(2**53) + 1, 2**53 - 1), max_size=20), st.floats(0, 2e9))
    def test_summary_round_trip(self, sums, ts) -> None:  # type: ignore[no-untyped-def]
        """A summary decodes to what was encoded."""
        s = Summary("b" * 40, ts, sums)
        self.assertEqual(Summary.decode(s.encode()), s)

    def test_apply_args_and_marker(self) -> None:
        """Fields go sorted; message ids are grouped by ts minute; declared duplicates come last; a marker names duplicates and excluded keys."""
        batch = aggregate([env(1, {"key": "b", "value": 1}, ts=61.0), env(2, {"key": "a", "value": 2}, ts=1.0)], KEY, VALUE)
        buckets, argv, fields = apply_args(batch, 100, 900)
        self.assertEqual(fields, ["a", "b"])
        self.assertEqual(buckets, [b"0", b"1"])
        self.assertEqual(argv, [b"100", b"2", b"a", b"2", b"b", b"1",
                                b"960", b"1", b"%030x" % 2, b"1020", b"1", b"%030x" % 1, b"0"])
        self.assertEqual(parse_marker(b"x,y\n2", fields), (("x", "y"), ("b",)))
        self.assertEqual(apply_args(batch, 100, 0)[0], [])
        without = batch.without(["%030x" % 2])
        _, argv, fields = apply_args(batch, 100, 0, without, ["%030x" % 2])
        self.assertEqual((fields, argv), (["b"], [b"100", b"1", b"b", b"1", b"1", b"%030x" % 2]))


@st.composite
def lean_shaped_items(draw):  # type: ignore[no-untyped-def]
    """Items mostly of the shape the lean parser takes, with the variations it must refuse or get right."""
    items = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["plain", "plain", "plain", "reversed", "escaped", "unicode", "extra", "big", "repeat", "glued", "halves", "float", "zero"]))
        key = draw(st.sampled_from(["a", "b", "00000000-0000-4000-8000-000000000001"]))
        value = draw(st.integers(-5, 5))
        ts = draw(st.sampled_from([1.0, 59.999999, 60.0, 1_800_000_000.123456]))
        if kind == "reversed":
            items.append(env(i, {"value": value, "key": key}, ts))
        elif kind == "escaped":
            items.append(env(i, {"key": 'q"uote\\', "value": value}, ts))
        elif kind == "unicode":
            items.append(env(i, {"key": "ü€", "value": value}, ts))
        elif kind == "extra":
            items.append(env(i, {"key": key, "value": value, "x": 1}, ts))
        elif kind == "big":
            items.append(env(i, {"key": key, "value": draw(st.sampled_from([10**15, -(10**15), MAX_MAGNITUDE - 1]))}, ts))
        elif kind == "repeat" and items:
            items.append(items[draw(st.integers(0, len(items) - 1))])
        elif kind == "glued" and items:
            # one list item holding two envelopes back to back: never two messages
            items.append(items[-1] + env(1000 + i, {"key": key, "value": 1}, ts))
        elif kind == "halves":
            # one envelope cut across two list items: never one message
            whole = env(i, {"key": key, "value": value}, ts)
            cut = draw(st.integers(1, len(whole) - 1))
            items.extend([whole[:cut], whole[cut:]])
        elif kind == "float":
            items.append(env(i, {"key": key, "value": 1.0}, ts))
        elif kind == "zero":
            items.append(env(i, {"key": key, "value": 0}, ts))
        else:
            items.append(env(i, {"key": key, "value": value}, ts))
    return items


class LeanParserTests(unittest.TestCase):
    """The lean parser agrees with the general one, or declines."""

    @given(lean_shaped_items())
    def test_lean_equals_general(self, items) -> None:  # type: ignore[no-untyped-def]
        """Whenever the lean parser takes a batch, every field of its result equals the general parser's."""
        general = aggregate_items(items, KEY, VALUE)
        lean = _aggregate_lean(frame(items), KEY, VALUE)
        if lean is None:
            return
        self.assertEqual(lean.id, general.id)
        self.assertEqual(lean.sums, general.sums)
        self.assertEqual(lean.counted, general.counted)
        self.assertEqual((lean.min_ts, lean.size, lean.dead), (general.min_ts, general.size, general.dead))

    def test_lean_takes_the_common_batch(self) -> None:
        """A batch as ingest writes it (either body order) is parsed lean; a misfit, a glued item or a repeat sends it to the general parser."""
        plain = [env(i, {"key": "k%d" % (i % 3), "value": 1}) for i in range(50)]
        self.assertIsNotNone(_aggregate_lean(frame(plain), KEY, VALUE))
        self.assertIsNotNone(_aggregate_lean(frame([env(i, {"value": 2, "key": "k"}) for i in range(5)]), KEY, VALUE))
        glued = plain[:-2] + [plain[-2] + plain[-1]]
        self.assertIsNone(_aggregate_lean(frame(glued), KEY, VALUE))
        self.assertEqual(aggregate(glued, KEY, VALUE).size, 49)
        self.assertEqual(len(aggregate(glued, KEY, VALUE).dead), 1)
        self.assertIsNone(_aggregate_lean(frame(plain + [plain[0]]), KEY, VALUE))
        halves = plain[:-1] + [plain[-1][:50], plain[-1][50:]]
        self.assertIsNone(_aggregate_lean(frame(halves), KEY, VALUE))
        self.assertEqual(len(aggregate(halves, KEY, VALUE).dead), 2)
        self.assertIsNone(_aggregate_lean(frame(plain + [b"junk"]), KEY, VALUE))
        self.assertIsNone(_aggregate_lean(frame(plain), ("a", "b"), VALUE))


BASE = '[[route]]\npath = "/increments"\nlist = "increments"\n'


class CounterConfigTests(unittest.TestCase):
    """``[[counter]]`` parsing: defaults, and one-line errors naming the key."""

    def parse(self, counter: str):  # type: ignore[no-untyped-def]
        """Parse a config with one counter table."""
        return config_from_string(BASE + "[[counter]]\n" + counter)

    def test_defaults_and_contract_example(self) -> None:
        """The contract's example parses; older configs (no counter) still do."""
        c = self.parse(
            'name = "hits"\nlist = "increments"\nkey = "/key"\nvalue = "/value"\nhash = "counts:hits"\n'
            'flush_interval = "5s"\npostgres = "postgresql://relayd@127.0.0.1:5432/relayd"\ntable = "counters"\n'
        ).counters[0]
        self.assertEqual((c.key, c.value, c.flush_interval, c.table), (("key",), ("value",), 5.0, "counters"))
        self.assertNotIn("postgresql", repr(c))
        self.assertEqual(config_from_string(BASE).counters, ())

    def test_errors_name_the_key(self) -> None:
        """Bad pointer, bad URL, flush_interval over 10 s, unknown key, duplicates: one line naming the key."""
        ok = 'name = "hits"\nlist = "increments"\nhash = "h"\n'
        cases = {
            'key = "key"\n': "counter[0].key",
            'postgres = "mysql://x"\n': "counter[0].postgres",
            'postgres = "postgresql://h:99999/db"\n': "counter[0].postgres",
            'flush_interval = "11s"\n': "counter[0].flush_interval",
            'flush_interval = "0s"\n': "counter[0].flush_interval",
            'flush_interval = "soon"\n': "counter[0].flush_interval",
            'table = "x; drop"\n': "counter[0].table",
            'colour = "red"\n': "counter[0].colour",
        }
        for extra, key in cases.items():
            with self.assertRaises(ConfigError) as e:
                self.parse(ok + extra)
            self.assertTrue(str(e.exception).startswith(key), str(e.exception))
            self.assertNotIn("\n", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            config_from_string(BASE + "[[counter]]\n" + ok + "[[counter]]\n" + ok)
        self.assertIn("counter[1].name", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            self.parse('name = "hits"\nlist = "a}b"\nhash = "h"\n')
        self.assertIn("counter[0].list", str(e.exception))

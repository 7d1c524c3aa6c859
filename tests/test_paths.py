"""Path templates and key templates (relayd/ingest/paths.py).

test-case-name: tests.test_paths
"""

from __future__ import annotations

import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.config import ConfigError, config_from_string
from relayd.ingest.paths import MAX_SEGMENT, BoundedCache, KeyTemplate, PathMatcher, PathTemplate, TemplateError

SEGMENT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~-"


def segments() -> st.SearchStrategy[str]:
    """Valid path segment values."""
    return st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=MAX_SEGMENT)


class PathTemplateTests(unittest.TestCase):
    """Matching a request path against ``/a/{x}/b/{y}``."""

    @given(segments(), segments())
    def test_valid_segments_match_and_fill(self, x: str, y: str) -> None:
        """Any valid segments match, and key templates get exactly those values."""
        template = PathTemplate("/a/{x}/b/{y}")
        values = template.match(f"/a/{x}/b/{y}".encode().split(b"/")[1:])
        self.assertEqual(values, (x.encode(), y.encode()))
        key = KeyTemplate("k:{y}:{x}:{zz}", template.names)
        self.assertEqual(key.fill(values), f"k:{y}:{x}:{{zz}}".encode())

    @given(st.text(min_size=1, max_size=200).filter(lambda s: "/" not in s))
    def test_invalid_segments_never_match(self, raw: str) -> None:
        """A segment outside [A-Za-z0-9._~-]+ or over 128 bytes is no match."""
        value = raw.encode()
        valid = len(value) <= MAX_SEGMENT and all(c in SEGMENT_CHARS for c in raw)
        matched = PathTemplate("/t/{team}").match([b"t", value])
        self.assertEqual(matched is not None, valid)

    def test_literal_parts_must_match(self) -> None:
        """Segment count and literal segments decide; an empty segment is no match."""
        template = PathTemplate("/t/{team}")
        self.assertIsNone(template.match([b"u", b"red"]))
        self.assertIsNone(template.match([b"t", b"red", b"x"]))
        self.assertIsNone(template.match([b"t", b""]))

    def test_bad_templates(self) -> None:
        """A brace inside a segment, or a name used twice, is an error."""
        for bad in ("/a{x}", "/{x}/{x}", "/a/{x", "/a/x}"):
            with self.assertRaises(TemplateError):
                PathTemplate(bad)

    def test_hash_tags_stay_literal(self) -> None:
        """Braces naming no path segment are literal; doubled braces make a hash tag around a value."""
        names = PathTemplate("/t/{team}").names
        self.assertEqual(KeyTemplate("{shop}:t:{team}", names).fill((b"red",)), b"{shop}:t:red")
        self.assertEqual(KeyTemplate("t:{{team}}", names).fill((b"red",)), b"t:{red}")
        self.assertFalse(KeyTemplate("{shop}:leads", names).is_template)

    def test_matcher_prefers_first_and_counts_segments(self) -> None:
        """PathMatcher returns the first template with that segment count that matches."""
        matcher = PathMatcher([(PathTemplate("/t/{a}"), "one"), (PathTemplate("/t/{a}/{b}"), "two")])
        self.assertEqual(matcher.match(b"/t/x"), ("one", (b"x",)))
        self.assertEqual(matcher.match(b"/t/x/y"), ("two", (b"x", b"y")))
        self.assertIsNone(matcher.match(b"/u/x"))

    @given(st.lists(st.binary(min_size=1, max_size=4), max_size=300))
    def test_bounded_cache(self, keys: list) -> None:  # type: ignore[type-arg]
        """The target cache never holds more than its size and returns the same object while cached."""
        built = []
        cache: BoundedCache[bytes] = BoundedCache(lambda v: built.append(v) or b"|".join(v), 16)
        for k in keys:
            self.assertEqual(cache.get((k,)), k)
            self.assertLessEqual(len(cache), 16)


class StreamConfigTests(unittest.TestCase):
    """The ``stream``/``history`` route keys and template paths in config."""

    BASE = '[redis]\nurl = "redis://127.0.0.1:6379/0"\n'

    def parse(self, route: str) -> object:
        return config_from_string(self.BASE + "[[route]]\n" + route)

    def test_stream_only_route(self) -> None:
        """A route may have a stream instead of a list; history defaults to 1000."""
        config = self.parse('path = "/t/{team}"\nstream = "t:{team}"\n')
        route = config.routes[0]  # type: ignore[attr-defined]
        self.assertEqual((route.list, route.stream, route.history), ("", "t:{team}", 1000))

    def test_errors_name_the_key(self) -> None:
        """Bad values are one-line errors naming the key."""
        cases = {
            'path = "/t"\n': "route[0].list",
            'path = "/t"\nstream = ""\n': "route[0].stream",
            'path = "/t"\nstream = "s"\nhistory = 0\n': "route[0].history",
            'path = "/t"\nlist = "l"\nhistory = 5\n': "route[0].history",
            'path = "/t{x}"\nstream = "s"\n': "route[0].path",
            'path = "/t"\nstream = "s"\nreply_timeout = "1s"\n': "route[0].reply_timeout",
        }
        for text, key in cases.items():
            with self.assertRaises(ConfigError) as cm:
                self.parse(text)
            self.assertTrue(str(cm.exception).startswith(key), (text, str(cm.exception)))

"""Path templates: ``/tracking/{team}`` routes and the keys filled from them.

A route `path` may hold ``{name}`` segments; each matches exactly one path
segment of ``[A-Za-z0-9._~-]+`` of at most `MAX_SEGMENT` bytes (anything
else is no match: a 404, never a key with a slash, a brace or a NUL in it).
Literal paths stay in `IngestApp`'s dict (one lookup per request); templates
are a fallback, tried only when no literal path matched, and only those with
the request's segment count (`PathMatcher`).

Key templates (`list`, `stream`): ``{name}`` naming one of the path's
segments is replaced by the segment's value; any other brace is literal.
So a Redis Cluster hash tag is written as usual (``{shop}:leads`` when the
path has no ``shop`` segment), and a hash tag *around* a value is written
with doubled braces: ``tracking:{{team}}`` -> ``tracking:{red}``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar, Union

MAX_SEGMENT = 128  # bytes; a team name or an id, never a payload
SEGMENT_RE = re.compile(rb"[A-Za-z0-9._~-]+\Z")
NAME_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_NAME_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")

T = TypeVar("T")
V = TypeVar("V")


class TemplateError(ValueError):
    """A path or key template that cannot be used (config names the key)."""


def path_names(path: str) -> List[str]:
    """The ``{name}`` segments of a route path, in order; raises `TemplateError`.

    A brace anywhere but as a whole segment is an error (``/a{b}`` would
    make segment boundaries ambiguous), and so is a name used twice.
    """
    names: List[str] = []
    for segment in path.split("/")[1:]:
        m = _WHOLE_NAME_RE.match(segment)
        if m is not None:
            if m.group(1) in names:
                raise TemplateError(f"{{{m.group(1)}}} appears twice")
            names.append(m.group(1))
        elif "{" in segment or "}" in segment:
            raise TemplateError(f"a {{name}} must be a whole path segment, got {segment!r}")
    return names


class PathTemplate:
    """One route path with ``{name}`` segments, compiled for matching."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.names = path_names(path)
        # Per segment: the literal bytes, or None for a placeholder.
        self.parts: List[Optional[bytes]] = [
            None if _WHOLE_NAME_RE.match(s) else s.encode() for s in path.split("/")[1:]
        ]

    @property
    def is_template(self) -> bool:
        """Has at least one ``{name}``."""
        return bool(self.names)

    def match(self, segments: Sequence[bytes]) -> Optional[Tuple[bytes, ...]]:
        """The placeholder values if `segments` match, else None."""
        if len(segments) != len(self.parts):
            return None
        values = []
        for part, segment in zip(self.parts, segments):
            if part is None:
                if len(segment) > MAX_SEGMENT or not SEGMENT_RE.match(segment):
                    return None
                values.append(segment)
            elif part != segment:
                return None
        return tuple(values)


class KeyTemplate:
    """A `list`/`stream` name with ``{name}``s filled from a path's values."""

    def __init__(self, template: str, names: Sequence[str]) -> None:
        self.template = template
        # Alternating literal pieces and value indexes.
        self._pieces: List[Union[bytes, int]] = []
        pos = 0
        for m in NAME_RE.finditer(template):
            if m.group(1) in names:
                self._pieces.append(template[pos : m.start()].encode())
                self._pieces.append(list(names).index(m.group(1)))
                pos = m.end()
        self._pieces.append(template[pos:].encode())
        self.is_template = len(self._pieces) > 1

    def fill(self, values: Sequence[bytes]) -> bytes:
        """The key for one request's path values."""
        return b"".join(p if isinstance(p, bytes) else values[p] for p in self._pieces)


class PathMatcher(Generic[T]):
    """Template routes grouped by segment count: the fallback after the literal dict."""

    def __init__(self, routes: Sequence[Tuple[PathTemplate, T]]) -> None:
        self._by_count: Dict[int, List[Tuple[PathTemplate, T]]] = {}
        for template, route in routes:
            self._by_count.setdefault(len(template.parts), []).append((template, route))

    def __bool__(self) -> bool:
        return bool(self._by_count)

    def match(self, path: bytes) -> Optional[Tuple[T, Tuple[bytes, ...]]]:
        """The first template route matching `path` (no query) and its values."""
        segments = path.split(b"/")[1:]
        for template, route in self._by_count.get(len(segments), ()):
            values = template.match(segments)
            if values is not None:
                return route, values
        return None


class BoundedCache(Generic[V]):
    """An LRU of per-value objects (targets), so a flood of distinct segments stays bounded."""

    def __init__(self, build: Callable[[Tuple[bytes, ...]], V], size: int) -> None:
        self._build = build
        self._size = size
        self._items: OrderedDict[Tuple[bytes, ...], V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, values: Tuple[bytes, ...]) -> V:
        """The object for `values`, built on first use."""
        items = self._items
        item = items.get(values)
        if item is None:
            item = self._build(values)
            items[values] = item
            if len(items) > self._size:
                items.popitem(last=False)
        else:
            items.move_to_end(values)
        return item

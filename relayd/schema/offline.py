"""Resolve a schema's external ``$ref``s from local files only; never open a socket.

jsonschema-rs fetches any ``http(s)://`` reference it cannot resolve
itself, at config load: the daemon's start-up would then depend on the
network, and a config could make the host send requests.  relayd gives the
validator this retriever instead (and the bundled meta-schemas, see
`metaschemas`).  A document is found, in this order:

1. a ``file:`` URI (a relative ``$ref`` in a schema without ``$id``
   resolves against the schema file's own URI) naming a file below the
   *root*, the directory of the route's schema file;
2. any URI that a JSON file below the root declares as its top-level
   ``$id`` (``id`` in draft 4): users keep the schemas they publish under
   ``https://example.com/...`` as local files;
3. a URI below the directory of the route schema's own ``$id``, mapped to
   the same relative path below the root (``$id``
   ``https://example.com/s/lead.json`` + ``$ref`` ``common/defs.json`` ->
   ``<root>/common/defs.json``).

Anything else is refused; the refusal is recorded (URI and reason) so that
the compiler can name the ``$ref`` and its place in one line.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote, urldefrag, urlsplit
from urllib.request import url2pathname

#: Files scanned for ``$id``s below the root: a schema directory is small;
#: this bounds config-load time if a route points into a big tree by mistake.
MAX_SCANNED_FILES = 2000
#: A schema file larger than this is not a schema (protects config load).
MAX_SCHEMA_BYTES = 16 * 1024 * 1024


class Refused(ValueError):
    """A ``$ref`` target that relayd will not (or cannot) load; the message says why."""


def load_json_file(path: str) -> Any:
    """Read one schema document; `Refused` with a short reason if unreadable or not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCHEMA_BYTES + 1)
    except OSError as e:
        raise Refused(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise Refused(f"{path} is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise Refused(f"{path} is nested too deeply") from None


def _strip(uri: str) -> str:
    """The document part of a URI (no fragment, no empty ``#``)."""
    return urldefrag(uri)[0]


def top_level_id(document: Any) -> Optional[str]:
    """A document's own ``$id`` (or draft 4's ``id``), without fragment."""
    if isinstance(document, dict):
        for key in ("$id", "id"):
            value = document.get(key)
            if isinstance(value, str) and value and not value.startswith("#"):
                return _strip(value)
    return None


class LocalRetriever:
    """The jsonschema-rs retriever of one route schema: local files only (see module docstring).

    ``refused`` lists ``(uri, reason)`` for every document it would not or
    could not give, in order, for the compiler's error line.
    """

    def __init__(self, root: Optional[str], root_id: Optional[str] = None) -> None:
        """`root`: the directory whose files may be loaded (None: no file at all);
        `root_id`: the route schema's own ``$id``."""
        self.root = os.path.realpath(root) if root is not None else None
        self._root_id_dir = posixpath.dirname(_strip(root_id)) + "/" if root_id else None
        self._by_id: Optional[Dict[str, str]] = None
        self.refused: List[Tuple[str, str]] = []

    def __call__(self, uri: str) -> Any:
        """Return the document at `uri`; raise (and record) when it is not local."""
        try:
            return self._retrieve(_strip(uri))
        except Refused as e:
            self.refused.append((uri, str(e)))
            raise

    def _retrieve(self, uri: str) -> Any:
        if self.root is None:
            raise Refused(f"{uri} is not in this schema (an inline schema can reference nothing else)")
        parts = urlsplit(uri)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise Refused(f"{uri} names a file on another host")
            return load_json_file(self._inside_root(url2pathname(unquote(parts.path)), uri))
        path = self._ids().get(uri)
        if path is not None:
            return load_json_file(path)
        if self._root_id_dir is not None and uri.startswith(self._root_id_dir):
            relative = unquote(uri[len(self._root_id_dir):])
            candidate = os.path.join(self.root, *relative.split("/"))
            if os.path.isfile(candidate):
                return load_json_file(self._inside_root(candidate, uri))
        raise Refused(
            f"no file below {self.root} is {uri} or has it as $id "
            "(relayd never fetches schemas over the network)"
        )

    def _inside_root(self, path: str, uri: str) -> str:
        assert self.root is not None
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:
            raise Refused(f"{uri} is outside {self.root}, the directory of the route's schema")
        return real

    def _ids(self) -> Dict[str, str]:
        """``$id`` -> file, for the JSON files below the root (built on first use)."""
        if self._by_id is None:
            assert self.root is not None
            self._by_id = {}
            scanned = 0
            for directory, subdirs, files in os.walk(self.root):
                subdirs.sort()
                for name in sorted(files):
                    if not name.endswith(".json"):
                        continue
                    scanned += 1
                    if scanned > MAX_SCANNED_FILES:
                        return self._by_id
                    path = os.path.join(directory, name)
                    try:
                        doc_id = top_level_id(load_json_file(path))
                    except Refused:
                        continue  # not a schema; only an error if a $ref names it by path
                    if doc_id is not None:
                        self._by_id.setdefault(doc_id, path)
        return self._by_id

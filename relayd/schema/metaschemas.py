"""The official meta-schemas of every supported draft, without the network.

jsonschema-rs embeds them, but a schema of one draft that ``$ref``s another
draft's meta-schema (``{"$ref": "http://json-schema.org/draft-07/schema#"}``
in a 2020-12 document) is not resolved from those copies: jsonschema-rs
would fail, or fetch it.  `bundle` of a document that refers to its own
draft's meta-schema hands the embedded copies back (the 2020-12 and 2019-09
vocabulary meta-schemas included), so relayd registers all of them up
front and needs no vendored copy and no extra dependency.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jsonschema_rs

from relayd.schema.drafts import SUPPORTED


def metaschema_resources() -> List[Tuple[str, Any]]:
    """``(URI, document)`` for every meta-schema (and vocabulary) of the supported drafts.

    Pure and cheap (~1 ms): called once per schema compilation, at config load.
    """
    found: Dict[str, Any] = {}
    for draft in SUPPORTED:
        bundled = jsonschema_rs.bundle(
            {"$schema": draft.uri, "$ref": draft.uri}, draft=draft.number, offline=True
        )
        assert isinstance(bundled, dict)
        embedded: Any = bundled.get("definitions") or bundled.get("$defs") or {}
        assert isinstance(embedded, dict)
        found.update(embedded)
    return sorted(found.items())

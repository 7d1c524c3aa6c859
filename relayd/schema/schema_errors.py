"""One line for every reason a schema file does not compile.

jsonschema-rs reports a schema that breaks its meta-schema (a bad ``type``,
a regex that does not compile, an unknown ``format``) with the JSON pointer
of the culprit inside the schema; a reference that cannot be resolved it
reports without one.  This module turns both into one line ending with
``at <pointer>``: for a reference, by finding the ``$ref`` (or
``$dynamicRef``/``$recursiveRef``) whose target failed, walking the
document with its ``$id`` scopes as the validator does.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, List, Optional, Tuple, Union
from urllib.parse import urldefrag, urljoin

import jsonschema_rs

from relayd.schema.formats import KNOWN_FORMATS
from relayd.schema.offline import LocalRetriever
from relayd.schema.route_schema import json_pointer

_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
#: Keywords whose values are data, not subschemas: a "$ref" in there is not a reference.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})

_UNKNOWN_FORMAT = re.compile(r"Unknown format: '(.*)'\. ")
#: jsonschema-rs's preamble before the retriever's own reason: noise in a one-line error.
_NOT_PRESENT = re.compile(r"^Resource '[^']*' is not present in a registry and retrieving it failed: (\w+: )?")

_NOT_LOCAL = re.compile(r"^Resource '([^']*)' is not present in a registry and retrieving it failed: Retriev")

RefSite = Tuple[str, str, str, str]  # pointer, keyword, value as written, absolute URI


def ref_sites(schema: Any, base_uri: str, path: Optional[List[Union[str, int]]] = None) -> Iterator[RefSite]:
    """Every reference in `schema`: where it is, what it says, what it resolves to."""
    path = path or []
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from ref_sites(item, base_uri, path + [i])
        return
    if not isinstance(schema, dict):
        return
    for id_key in ("$id", "id"):
        own = schema.get(id_key)
        if isinstance(own, str) and not own.startswith("#"):
            base_uri = urljoin(base_uri, own)
            break
    for keyword in _REF_KEYWORDS:
        value = schema.get(keyword)
        if isinstance(value, str):
            yield json_pointer(path + [keyword]), keyword, value, urljoin(base_uri, value)
    for key, value in schema.items():
        if key not in _DATA_KEYWORDS and isinstance(value, (dict, list)):
            yield from ref_sites(value, base_uri, path + [key])


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid schema"


def _locate_ref(schema: Any, base_uri: str, failed_uri: Optional[str], message: str) -> Optional[RefSite]:
    sites = list(ref_sites(schema, base_uri))
    if failed_uri is not None:
        document = urldefrag(failed_uri)[0]
        for site in sites:
            if urldefrag(site[3])[0] == document:
                return site
    for site in sites:  # "Pointer '/defs/x' does not exist", "Anchor 'a' ...", "Resource 'uri' ..."
        document, fragment = urldefrag(site[3])
        if site[2] in message or f"'{document}'" in message or (fragment and f"'{fragment}'" in message):
            return site
    return None


def describe(error: Exception, schema: Any, base_uri: str, retriever: LocalRetriever) -> str:
    """The reason `schema` did not compile, in one line that ends with where."""
    if isinstance(error, jsonschema_rs.ValidationError) and not isinstance(
        error.kind, jsonschema_rs.ValidationErrorKind.Referencing
    ):
        where = json_pointer(error.instance_path, root="/")
        unknown = _UNKNOWN_FORMAT.match(error.message)
        if unknown:
            return (
                f"unknown format {unknown.group(1)!r} (relayd asserts formats, so one it does not know "
                f"would pass everything; known: {', '.join(KNOWN_FORMATS)}) at {where}"
            )
        return f"{first_line(error.message)} at {where}"
    message = first_line(getattr(error, "message", None) or str(error))
    failed_uri, reason = retriever.refused[0] if retriever.refused else (None, None)
    site = _locate_ref(schema, base_uri, failed_uri, message)
    if site is None:
        return f"unresolvable reference: {reason or message} at /"
    pointer, keyword, value, _ = site
    if reason is None:
        not_local = _NOT_LOCAL.match(message)
        if not_local:  # a reference kind jsonschema-rs resolves without asking the retriever
            reason = f"{not_local.group(1)} is not local (relayd never fetches schemas over the network)"
        else:
            reason = _NOT_PRESENT.sub("", message)
    return f"{keyword} {value!r} cannot be resolved: {reason} at {pointer}"

"""Which JSON Schema draft a document is written in.

jsonschema-rs picks a draft from ``$schema`` too, but quietly falls back to
2020-12 for a URI it does not know (draft 3, a typo, a custom meta-schema),
which would apply the wrong rules without a word.  relayd decides here
instead: a known ``$schema`` selects its draft, a missing one means 2020-12
(the current draft, the one OpenAPI 3.1 uses, and jsonschema-rs's own
default), anything else is a config error.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

import attrs
import jsonschema_rs


@attrs.frozen
class Draft:
    """One supported draft: its name for messages, its validator class and its meta-schema URI."""

    name: str
    validator_cls: Type[jsonschema_rs.Validator]
    number: int  # jsonschema_rs.Draft4 ... Draft202012
    uri: str  # the canonical ``$schema`` URI

    @property
    def has_uuid_format(self) -> bool:
        """2019-09 and later define ``uuid``; older drafts get relayd's own (see `formats`)."""
        return self.number in (jsonschema_rs.Draft201909, jsonschema_rs.Draft202012)


DRAFT4 = Draft("draft 4", jsonschema_rs.Draft4Validator, jsonschema_rs.Draft4, "http://json-schema.org/draft-04/schema#")
DRAFT6 = Draft("draft 6", jsonschema_rs.Draft6Validator, jsonschema_rs.Draft6, "http://json-schema.org/draft-06/schema#")
DRAFT7 = Draft("draft 7", jsonschema_rs.Draft7Validator, jsonschema_rs.Draft7, "http://json-schema.org/draft-07/schema#")
DRAFT2019 = Draft(
    "draft 2019-09", jsonschema_rs.Draft201909Validator, jsonschema_rs.Draft201909,
    "https://json-schema.org/draft/2019-09/schema",
)
DRAFT2020 = Draft(
    "draft 2020-12", jsonschema_rs.Draft202012Validator, jsonschema_rs.Draft202012,
    "https://json-schema.org/draft/2020-12/schema",
)
SUPPORTED = (DRAFT4, DRAFT6, DRAFT7, DRAFT2019, DRAFT2020)
#: The draft of a schema without ``$schema``: the current one (see module docstring).
DEFAULT = DRAFT2020


def _key(uri: str) -> str:
    """Compare URIs the way users write them: scheme and one trailing ``#`` do not matter."""
    uri = uri.strip()
    if uri.endswith("#"):
        uri = uri[:-1]
    return uri.split("://", 1)[-1]


_BY_URI: Dict[str, Draft] = {_key(d.uri): d for d in SUPPORTED}


class UnknownDraft(ValueError):
    """``$schema`` names no draft relayd supports."""


def draft_of(schema: Any) -> Draft:
    """The draft `schema` (a parsed document) is written in; `UnknownDraft` if unsupported."""
    declared: Optional[Any] = schema.get("$schema") if isinstance(schema, dict) else None
    if declared is None:
        return DEFAULT
    if not isinstance(declared, str):
        raise UnknownDraft(f"$schema must be a URI string, not {type(declared).__name__}")
    draft = _BY_URI.get(_key(declared))
    if draft is None:
        raise UnknownDraft(
            f"$schema {declared!r} is not a supported draft "
            f"(relayd knows {', '.join(d.name for d in SUPPORTED)}; without $schema: {DEFAULT.name})"
        )
    return draft

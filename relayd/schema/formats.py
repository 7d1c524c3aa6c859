"""Which ``format`` values relayd asserts, and how a draft gets the ones it lacks.

relayd's stance (unchanged from its first schema support): ``format`` is an
assertion in every draft, and a format the validator does not know is a
config error, never a silent pass.  2019-09 and 2020-12 make ``format`` an
annotation by default; users who write ``"format": "uuid"`` on a route mean
"refuse what is not a UUID", so relayd opts in to assertion (the specs allow
it) and says so in docs/configuration.md.

jsonschema-rs knows, per draft, the formats that draft defines: draft 7 has
no ``uuid`` or ``duration``, draft 4 no ``uri-reference``, ``json-pointer``
and friends.  A schema of an older draft may still use them: relayd lends it
the 2020-12 definition, checked by a one-keyword 2020-12 validator (a Rust
callable, so the check stays in the Rust core's strictness and costs
~0.2 us, not a Python regex).  Only a format no draft defines is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jsonschema_rs

from relayd.schema.drafts import DRAFT2020, Draft

#: Every format some supported draft defines (the 2020-12 list), each asserted.
KNOWN_FORMATS: Tuple[str, ...] = (
    "date", "date-time", "time", "duration",
    "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uri-template",
    "json-pointer", "relative-json-pointer", "regex", "uuid",
)


def email_options() -> jsonschema_rs.EmailOptions:
    """``email``: an RFC 5321 address only; jsonschema-rs would also take ``Name <a@b>``."""
    return jsonschema_rs.EmailOptions(allow_display_text=False)


def _knows(draft: Draft, name: str) -> bool:
    try:
        draft.validator_cls({"format": name}, validate_formats=True, ignore_unknown_formats=False)
    except jsonschema_rs.ValidationError:
        return False
    return True


def borrowed_formats(draft: Draft) -> Dict[str, Callable[[Any], bool]]:
    """``{format: checker}`` for the known formats `draft` does not define itself."""
    if draft is DRAFT2020:
        return {}
    return {
        name: DRAFT2020.validator_cls(
            {"format": name}, validate_formats=True, email_options=email_options()
        ).is_valid
        for name in KNOWN_FORMATS
        if not _knows(draft, name)
    }

"""A route's compiled schema, as the ingest path uses it.

Two questions, two costs: `RouteSchema.is_valid` is the validator's own
bound method (a Rust call, no error object built) and answers every
message; `RouteSchema.violation` is asked only for a message that failed,
and builds the 400's detail: which field (a JSON pointer into the body),
which keyword, and the validator's message, cut to a bounded length (it
may quote the offending value, which a client controls).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

import attrs
import jsonschema_rs

from relayd.schema.drafts import Draft

#: Longest message quoted in a 400: enough for a field name and a short
#: value; a 1 MiB string that failed ``maxLength`` is not echoed back.
MAX_MESSAGE_CHARS = 240


def json_pointer(path: List[Union[str, int]], root: str = "") -> str:
    """RFC 6901 pointer of a path (``~`` and ``/`` escaped); `root` for the empty path."""
    if not path:
        return root
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@attrs.frozen
class Violation:
    """Why one message failed its route's schema: what a 400 says."""

    field: str  # JSON pointer into the message; "/" for the whole message
    keyword: str  # the schema keyword that failed, e.g. "format", "required"
    schema_path: str  # JSON pointer of that keyword inside the schema
    message: str  # the validator's words, bounded

    @property
    def detail(self) -> str:
        """One line for the problem's ``detail`` and for NDJSON line reports."""
        return f"{self.field}: {self.message} (keyword {self.keyword})"


def _keyword(error: jsonschema_rs.ValidationError) -> str:
    for part in reversed(error.schema_path):
        if isinstance(part, str):
            return part
    return error.kind.name


def _bounded(message: str) -> str:
    message = message.replace("\n", " ")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return message


class RouteSchema:
    """One route's compiled JSON Schema (made by `relayd.schema.compile_schema_file`).

    ``is_valid(value)`` raises `UnicodeEncodeError` for a string holding a
    lone surrogate (ujson lets them in; the validator works on UTF-8): the
    caller refuses such a body as it refuses it when encoding.
    """

    __slots__ = ("is_valid", "draft", "source", "_validator")

    is_valid: Callable[[Any], bool]

    def __init__(self, validator: jsonschema_rs.Validator, draft: Draft, source: str) -> None:
        """`source`: the file (or "inline schema") for logs and reprs."""
        self._validator = validator
        self.is_valid = validator.is_valid  # the hot path: one Rust call per message
        self.draft = draft
        self.source = source

    def violation(self, value: Any) -> Optional[Violation]:
        """The first violation of `value`, or None if it is valid."""
        try:
            self._validator.validate(value)
        except jsonschema_rs.ValidationError as e:
            return Violation(
                field=json_pointer(e.instance_path, root="/"),
                keyword=_keyword(e),
                schema_path=json_pointer(e.schema_path),
                message=_bounded(e.message),
            )
        return None

    def __repr__(self) -> str:
        return f"<RouteSchema {self.draft.name} {self.source}>"

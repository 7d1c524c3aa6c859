"""Schema file -> `RouteSchema`, or one `ConfigError` line that says why not.

Called from config loading (`relayd.config.check_environment` gets
`compile_schema_file` injected), before any port is bound: a route whose
schema would be half-applied, would need the network, or would crash on
some input never starts.  Every failure is ``<route key>: <file>: <reason>
at <JSON pointer in the schema>``; no schema file can cause a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import jsonschema_rs

from relayd.config import ConfigError
from relayd.schema import schema_errors
from relayd.schema.drafts import UnknownDraft, draft_of
from relayd.schema.engine import engine_for, without_schema_uri
from relayd.schema.formats import borrowed_formats, email_options
from relayd.schema.metaschemas import metaschema_resources
from relayd.schema.offline import LocalRetriever, Refused, load_json_file, top_level_id
from relayd.schema.route_schema import RouteSchema

#: Base URI of a schema given as a value (tests, scripts) rather than a file:
#: it has no directory, so it can reference nothing outside itself.
INLINE_BASE_URI = "urn:relayd:inline-schema"


def compile_schema_file(path: str, key: str) -> RouteSchema:
    """Load and compile one route's schema file; `ConfigError` names `key` and `path`."""
    try:
        schema = load_json_file(path)
    except Refused as e:
        raise ConfigError(f"{key}: {e}") from None
    return compile_schema(schema, key, path=path)


def compile_schema(schema: Any, key: str = "schema", path: Optional[str] = None) -> RouteSchema:
    """Compile a parsed schema document; `path` (its file) anchors relative ``$ref``s.

    Drafts 4, 6, 7, 2019-09 and 2020-12 by ``$schema`` (2020-12 without
    one); ``format`` asserted; references resolved offline (`offline`).
    """
    where = f"{key}: {path}" if path is not None else key
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"{where}: a schema is a JSON object or a boolean, not {type(schema).__name__}")
    try:
        draft = draft_of(schema)
    except UnknownDraft as e:
        raise ConfigError(f"{where}: {e} at /$schema") from None
    if path is not None:
        real = os.path.realpath(path)
        base_uri = Path(real).as_uri()
        retriever = LocalRetriever(os.path.dirname(real), top_level_id(schema))
    else:
        base_uri = INLINE_BASE_URI
        retriever = LocalRetriever(None, top_level_id(schema))
    borrowed = borrowed_formats(draft)
    try:
        registry = jsonschema_rs.Registry(metaschema_resources(), retriever=retriever)
        validator = draft.validator_cls(
            schema,
            formats=borrowed or None,
            validate_formats=True,
            ignore_unknown_formats=False,
            retriever=retriever,
            registry=registry,
            base_uri=base_uri,
            email_options=email_options(),
        )
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, Refused) as e:
        raise ConfigError(f"{where}: {schema_errors.describe(e, schema, base_uri, retriever)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # Not seen with any schema of the official suite; kept one line all the same.
        raise ConfigError(f"{where}: invalid schema: {schema_errors.first_line(str(e))}") from None
    engine = engine_for(schema, draft, borrowed)
    if engine is not draft and isinstance(schema, dict):
        # the same test on the 2020-12 class, where the borrowed formats are native (engine.py);
        # compiled after the draft's own, so a schema's errors are always its own draft's
        try:
            validator = engine.validator_cls(
                without_schema_uri(schema),
                validate_formats=True,
                ignore_unknown_formats=False,
                retriever=retriever,
                registry=registry,
                base_uri=base_uri,
                email_options=email_options(),
            )
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, Refused, ValueError, TypeError):
            pass  # keep the draft's own validator
    return RouteSchema(validator, draft, path or "inline schema")

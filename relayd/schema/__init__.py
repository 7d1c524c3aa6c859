"""Route JSON Schemas: every draft users write, resolved offline, refused in one line.

A route's ``schema`` file is where users state what "valid" means, so a
schema that is half-applied is a silent data-quality bug.  This package
turns a schema file into a `RouteSchema` at config load:

- `drafts`: which draft a document is written in (``$schema``; 2020-12 when
  absent) and the validator class for it;
- `metaschemas`: the official meta-schemas of every supported draft, taken
  from jsonschema-rs's own embedded copies, so ``$ref``s to them never
  leave the host;
- `offline`: the only retriever the validator gets: files below the schema's
  directory (by path or by ``$id``), nothing over the network, ever;
- `formats`: which ``format`` values are asserted, per draft;
- `compiler`: file -> `RouteSchema`, every failure one `ConfigError` line
  naming the route key, the file and the JSON pointer inside the schema;
- `route_schema`: the compiled schema the ingest hot path asks "valid?" and,
  only for a 400, "what is wrong, where, which keyword?".

The validator itself is jsonschema-rs (a Rust core that passes the official
JSON-Schema-Test-Suite): see docs/configuration.md for the measured cost.
"""

from relayd.schema.compiler import compile_schema, compile_schema_file
from relayd.schema.route_schema import RouteSchema, Violation

__all__ = ["RouteSchema", "Violation", "compile_schema", "compile_schema_file"]

"""The summary of an applied batch, as queued for PostgreSQL.

``{"b": <batch id>, "ts": <oldest item's ts>, "k": [keys], "v": [sums]}``
in one JSON line: what the hash received for that batch, after
duplicates and exclusions, so PostgreSQL receives exactly the same.
"""

from __future__ import annotations

from typing import Dict, Optional

import attrs
import ujson


@attrs.frozen
class Summary:
    """One batch's contribution to PostgreSQL."""

    batch: str
    ts: Optional[float]
    sums: Dict[str, int]

    def encode(self) -> bytes:
        """One JSON document (keys sorted, so equal summaries are equal bytes)."""
        keys = sorted(self.sums)
        return ujson.dumps(
            {"b": self.batch, "ts": self.ts, "k": keys, "v": [self.sums[k] for k in keys]},
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Summary:
        """Inverse of `encode`; raises ValueError on anything else."""
        d = ujson.loads(data)
        if not isinstance(d, dict) or not isinstance(d.get("b"), str) or len(d.get("k", ())) != len(d.get("v", ())):
            raise ValueError("not a counter summary")
        return cls(d["b"], d.get("ts"), dict(zip(d["k"], d["v"])))

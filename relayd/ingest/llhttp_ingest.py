"""relayd's ingest channel with llhttp parsing (issue 13 item 3, EXPERIMENT).

`IngestChannel`'s guards (413 before the body, head/body deadlines, 431
problem documents) over `LLHTTPChannel`'s parsing: the guards hook
`allHeadersReceived`, `lineLengthExceeded`, the bad-request path and the
header counters, which `LLHTTPChannel` drives the way twisted.web does.
"""

from __future__ import annotations

from relayd.ingest.http_layer import IngestChannel
from relayd.ingest.llhttp_channel import LLHTTPChannel


class LLHTTPIngestChannel(IngestChannel, LLHTTPChannel):
    """IngestChannel parsing with llhttp (MRO: IngestChannel's hooks, then LLHTTPChannel, then HTTPChannel)."""

"""Run relayd (twistd -n relayd ...) with its ingest channel parsing HTTP with llhttp or twisted.web.

Bench-only (issue 13 item 3, the llhttp experiment, left out of relayd):
swaps `IngestSite.protocol` for `LLHTTPIngestChannel` (relayd's
`IngestChannel` guards over `bench.llhttp_channel.LLHTTPChannel`) before
twistd builds the service, so the rest of the process is the same code as
a normal relayd.

Usage: python bench/relayd_llhttp.py {llhttp|twisted} TWISTD-ARGS...
  e.g. python bench/relayd_llhttp.py llhttp -n --pidfile= relayd --config relayd.conf
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser, argv = sys.argv[1], sys.argv[2:]
    if parser == "llhttp":
        from bench.llhttp_channel import LLHTTPChannel
        from relayd.ingest.http_layer import IngestChannel, IngestSite

        class LLHTTPIngestChannel(IngestChannel, LLHTTPChannel):
            """relayd's guards over llhttp parsing.

            MRO: IngestChannel's hooks (413 before the body, head/body
            deadlines, 431/400 problem documents via `bad_request` and
            `lineLengthExceeded`), then LLHTTPChannel, then HTTPChannel.
            """

        IngestSite.protocol = LLHTTPIngestChannel  # type: ignore[assignment]
    elif parser != "twisted":
        raise SystemExit(f"unknown parser {parser!r}")
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


if __name__ == "__main__":
    main()

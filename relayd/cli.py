"""The ``relayd`` command: operator tools beside the twistd plugin.

``relayd spool inspect|verify DIR`` reads a spool directory offline;
``relayd plugin-cache`` is an install step (write Twisted's plugin cache as
the installing user).  The daemon itself is started with
``twistd [-n] relayd --config PATH``.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: relayd spool inspect DIR   segments, records, bytes, oldest age
       relayd spool verify DIR    check every record's CRC (exit 1 on corruption)
       relayd plugin-cache        install step: write twistd's plugin cache (dropin.cache); run after pip install
run the daemon with: twistd -n relayd --config etc/relayd.conf"""


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch a sub-command; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["spool"]:
        from relayd.spool.cli import main as spool_main

        return spool_main(args[1:])
    if args[:1] == ["plugin-cache"]:
        from relayd.install.plugin_cache import main as plugin_cache_main

        return plugin_cache_main(args[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Take a burst of replies off the reply list as ONE packed bulk string.

txredisapi's pure-Python parser handles an array reply one element per
reactor iteration (after each bulk element it pauses and re-enters itself
with ``callLater(0)``) and re-splits its whole buffer per line: an
``RPOP <list> 256`` of ~300 B replies costs 256 reactor turns and quadratic
copying before its Deferred fires, so a burst's first reply waits for its
last.  This script pops the same items and returns them as ``len:item``
concatenated (the counters' TAKE answers one bulk string for the same
reason): one bulk string, parsed in one go.  One key, so it runs on the
list's node in a cluster.
"""

from __future__ import annotations

from typing import List, Optional

from relayd.redis.scripts import Script

#: KEYS[1] = the reply list, ARGV[1] = at most this many (oldest first, RPOP order).
#: Returns nil when the list is empty.
TAKE_PACKED = Script(
    """
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then
  return false
end
local out = {}
for i, item in ipairs(items) do
  out[i] = #item .. ':' .. item
end
return table.concat(out)
"""
)


def unpack_replies(packed: Optional[bytes]) -> List[bytes]:
    """The items of a `TAKE_PACKED` answer, oldest first (``[]`` for nil); ValueError if malformed."""
    items: List[bytes] = []
    if not packed:
        return items
    pos, end = 0, len(packed)
    find = packed.find
    while pos < end:
        colon = find(b":", pos)
        if colon < 0:
            raise ValueError("malformed packed replies")
        start = colon + 1
        stop = start + int(packed[pos:colon])
        if stop > end:
            raise ValueError("truncated packed replies")
        items.append(packed[start:stop])
        pos = stop
    return items

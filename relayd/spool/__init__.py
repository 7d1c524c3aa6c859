"""The on-disk spool: a segmented, CRC-checked record log with durable cursors.

One concern per module (see docs/spool.md for the map): ``spool`` (the
`Spool` class), ``record`` (framing, CRC32C, entry codec), ``segments``
(segment files, fsync primitives, policy names), ``meta`` (the cursor
document), ``sync`` (group commit), ``scan`` (frame walk and resync),
``recovery`` (open-time repair, quarantine), ``inspection`` (read-only
scan for the CLI), ``errors``.  Nothing is re-exported here: import a name
from the module that owns it.
"""

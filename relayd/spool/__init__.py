"""The on-disk spool: a segmented, CRC-checked record log with durable cursors."""

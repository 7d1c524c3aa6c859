"""Live fan-out: Server-Sent Events subscribers of Redis Streams (docs/fanout.md).

Data path: ``GET <stream route>`` -> `subscribe.Subscriptions` (auth done by
ingest, resume from Last-Event-ID) -> `hub.Hub` (local subscribers per
stream) <- `reader.StreamReader` (one loop per process: blocks on the
change log of `changes`, reads the changed streams); each subscriber is an
`sse.Subscriber` (bounded queue, cut when slow), written through
`relayd.wire.direct_writer`.
"""

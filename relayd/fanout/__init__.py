"""Live fan-out: Server-Sent Events subscribers of Redis Streams (docs/fanout.md).

Data path: ``GET <stream route>`` -> `subscribe.Subscriptions` (auth done by
ingest, resume from Last-Event-ID) -> `hub.Hub` (local subscribers per
stream) <- `reader.StreamReader` (one ``XREAD BLOCK`` loop per process) ;
each subscriber is an `sse.Subscriber` (bounded queue, cut when slow).
"""

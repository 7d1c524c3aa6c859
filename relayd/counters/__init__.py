"""Counters (``[[counter]]``): increments from a Redis list, summed exactly once.

The data path, one module per step::

    list ──take (work_queue)──► processing list ──aggregate (pure)──► Batch
         ──apply (redis_sink: one Lua EVAL in the hash's slot)──► hash
         ──complete (work_queue: fenced by the batch digest)──► PG pending list
         ──pg_sink (one transaction per chunk of pending batches)──► PostgreSQL

`aggregator.Aggregator` drives one counter in one process; `service`
composes the counters of a config.  The design essay (invariant and crash
points) is in `aggregator`; the user-facing account is docs/counters.md.
"""

"""REFERENCE (naive request/reply design): a fresh reply key and a BLPOP per request.

What a team would write first, and what relayd's per-process reply list is
measured against (celery/ceps#7): Starlette on uvicorn (one worker, no access
log, uvloop + httptools), redis.asyncio.  Per request: LPUSH the envelope
with ``reply_to`` = a fresh key ``naive:reply:<id>``, then ``BLPOP`` that key
with the route's timeout.  A BLPOP holds its connection, so every waiting
request takes a pooled connection of its own (the pool grows with the
number of requests in flight).  The envelope and the reply handling
(status, headers, JSON body) are the same as relayd's.

  REDIS_URL=redis://127.0.0.1:PORT/0 NAIVE_LIST=bench-quote uvicorn bench.ref_reply_naive:app \
      --host 127.0.0.1 --port N --workers 1 --no-access-log --loop uvloop --http httptools
"""

import os
import time

import redis.asyncio as aioredis
import ujson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LIST = os.environ.get("NAIVE_LIST", "bench-quote")
TIMEOUT = 5

_redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=1000))
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


async def quote(request):
    rid = os.urandom(8).hex()
    key = f"naive:reply:{rid}"
    envelope = ujson.dumps(
        {"id": rid, "ts": time.time(), "route": "/quote", "content_type": "application/json",
         "body": ujson.loads(await request.body()), "reply_to": key},
        ensure_ascii=False, escape_forward_slashes=False,
    )
    await _redis.lpush(LIST, envelope)
    popped = await _redis.blpop([key], timeout=TIMEOUT)
    if popped is None:
        return Response(b'{"title":"no reply in time"}', status_code=504, media_type="application/problem+json")
    reply = ujson.loads(popped[1])
    headers = {k: v for k, v in reply.get("headers", {}).items() if k.lower() not in _HOP}
    body = ujson.dumps(reply["body"], ensure_ascii=False, escape_forward_slashes=False).encode()
    return Response(body, status_code=reply.get("status", 200), headers=headers)


app = Starlette(routes=[Route("/quote", quote, methods=["POST"])])

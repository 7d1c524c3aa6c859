"""Naive reference app: what a team would write first.

Starlette on uvicorn (one worker, no access log), one ``LPUSH`` per request
with ``redis.asyncio``, 2xx after Redis answered -- the same durability as
relayd's ``ack = "stored"`` without any batching.

Run by bench/run.py as:
  REDIS_URL=redis://127.0.0.1:PORT/0 uvicorn bench.ref_naive_starlette:app \
      --host 127.0.0.1 --port N --workers 1 --no-access-log [--loop uvloop] [--http httptools]
"""

import os

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LIST = os.environ.get("NAIVE_LIST", "naive_leads")
OK = b'{"status":"OK"}'

_redis = aioredis.from_url(REDIS_URL)


async def leads(request):
    body = await request.body()
    await _redis.lpush(LIST, body)
    return Response(OK, media_type="application/json")


app = Starlette(routes=[Route("/leads", leads, methods=["POST"])])

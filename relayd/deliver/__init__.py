"""Delivery: consume Redis lists and feed each message to an upstream HTTP endpoint.

The data path, one module per concern (docs/delivery.md has the picture):

- `keys`: the Redis keys a deliver keeps next to its list (one Cluster slot);
- `message`: what one list item means -- the request to send, its id, its
  retry state -- and the dead-letter item it becomes;
- `scripts`: the Lua scripts that move items between those keys atomically;
- `claims`: the per-process processing list, its lease and the reaper;
- `ratelimit`: the global GCRA limiter shared by every process on the Redis;
- `breaker` / `outcome`: the per-deliver circuit breaker, status
  classification and jittered backoff (pure, clock-injected);
- `signing`: Standard Webhooks signatures;
- `upstream`: the treq client (pool, whole-exchange timeout, stale keep-alive retry);
- `service`: one deliver composed as an IService; `manager`: all of them, reloadable;
- `admin`: `GET /deliver` and `POST /deliver/<name>/replay`.
"""

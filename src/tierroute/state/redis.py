"""Shared state in Redis (redis-py and hiredis; `pip install tierroute[redis]`).

Every key starts with a prefix (`tierroute:` unless configured), so several gateways, or
tests, can share one Redis. Limits are checked and counted in one Lua script (atomic, one
round trip); breaker failures likewise. The request path's commands (limit checks, cache
reads and writes, breaker updates, settlements, the heartbeat) go through one pipelined
connection of this process (state/pipe.py, lighter than redis-py's client): those issued in
the same turn of the event loop go out in one write, so a request's limit check and its
decision-cache read cost one round trip, and 64 concurrent requests' commands a few. The
beat's reads and writes go the same way; the rest (draining the controller's list,
tenants' offsets, pings) uses redis-py's client.
When Redis cannot be reached the state logs one line, answers from a MemoryState of this
process (limits then hold per replica), reports the problem for /healthz, and pings once
a second until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tierroute.errors import ConfigError
from tierroute.keys import KeyPolicy
from tierroute.state.base import Ask, BreakerView, Snapshot, Verdict
from tierroute.state.memory import MemoryState
from tierroute.state.windows import Clock

log = logging.getLogger(__name__)

# KEYS: requests now, requests before, tokens now, tokens before, day, month, reserved.
# ARGV: rpm, tpm, day budget, month budget (-1: none), fraction of the minute gone,
#       tokens asked, cost asked, seconds to the next minute, day, month.
# Returns {refused, retry after, day spend, month spend} before this request (spends as
# text: Lua numbers would be truncated to integers on the way back).
_ACQUIRE = """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local dbud, mbud = tonumber(ARGV[3]), tonumber(ARGV[4])
local f = tonumber(ARGV[5])
local function n(k) return tonumber(redis.call('GET', k) or '0') end
local r = n(KEYS[2]) * (1 - f) + n(KEYS[1])
local t = n(KEYS[4]) * (1 - f) + n(KEYS[3])
local resv = n(KEYS[7])
local day, month = n(KEYS[5]) + resv, n(KEYS[6]) + resv
local refused, wait = 0, 0
if rpm >= 0 and r + 1 > rpm then refused, wait = 1, tonumber(ARGV[8])
elseif tpm >= 0 and t >= tpm then refused, wait = 2, tonumber(ARGV[8])
elseif dbud >= 0 and day >= dbud then refused, wait = 3, tonumber(ARGV[9])
elseif mbud >= 0 and month >= mbud then refused, wait = 4, tonumber(ARGV[10])
end
if refused > 0 then return {refused, wait, tostring(day), tostring(month)} end
redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 150)
redis.call('INCRBY', KEYS[3], ARGV[6]); redis.call('EXPIRE', KEYS[3], 150)
redis.call('INCRBYFLOAT', KEYS[7], ARGV[7]); redis.call('EXPIRE', KEYS[7], 3600)
return {0, 0, tostring(day), tostring(month)}
"""

# KEYS: tokens window, reserved, day, month. ARGV: tokens delta, cost asked, cost spent.
# A tokens window already gone (a request longer than two minutes) is left alone.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
redis.call('INCRBYFLOAT', KEYS[2], -tonumber(ARGV[2]))
redis.call('INCRBYFLOAT', KEYS[3], ARGV[3]); redis.call('EXPIRE', KEYS[3], 2 * 86400)
redis.call('INCRBYFLOAT', KEYS[4], ARGV[3]); redis.call('EXPIRE', KEYS[4], 32 * 86400)
return 1
"""

# KEYS: the breaker hash, its probe. ARGV: threshold, now. Returns {failures, opened_at}.
_FAILURE = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if opened or failures >= tonumber(ARGV[1]) then
  opened = ARGV[2]
  redis.call('HSET', KEYS[1], 'opened_at', opened)
end
redis.call('DEL', KEYS[2])
return {failures, opened or ''}
"""

# KEYS: the leader key. ARGV: holder, ttl ms. Takes a free lease or renews one's own.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the replicas' sorted set. ARGV: holder, ttl ms. Scores are expiry times on
# Redis's clock (replicas' clocks may disagree); returns how many replicas are alive.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: counts hash, version. ARGV: tenant, n, bad, ... (pairs of fields)
_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('INCR', KEYS[2])
return 1
"""


def redact(url: str) -> str:
    """The URL without its password, for logs and /healthz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    netloc = user + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def publish_revocation(url: str, prefix: str, key_id: str, timeout_s: float = 5.0) -> None:
    """Add `key_id` to the revoked set every replica mirrors each beat (`tierroute keys
    revoke`); raises redis.RedisError or OSError when Redis does not take it."""
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "publishing a revocation to Redis needs the redis package: "
            "pip install 'tierroute[redis]'"
        ) from None
    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
    )
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.sadd(prefix + "revoked", key_id)
            pipe.incr(prefix + "revoked:version")
            pipe.execute()
    finally:
        client.close()


def _limit(value: float | None) -> float:
    return -1 if value is None else value


class RedisState:
    shared = True

    def __init__(
        self,
        url: str,
        prefix: str = "tierroute:",
        timeout_s: float = 0.5,
        reconnect_s: float = 1.0,
        cache_size: int = 10_000,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            from tierroute.state.pipe import Pipe
        except ImportError:
            raise ConfigError(
                "a redis:// state needs the redis and hiredis packages: "
                "pip install 'tierroute[redis]'"
            ) from None
        self.url = url
        self.prefix = prefix
        self.reconnect_s = reconnect_s
        self.local = MemoryState(cache_size)
        # Short timeouts and one immediate retry (a pooled connection that died with a
        # restarted server): an unreachable Redis costs a request at most ~2 timeouts once.
        self._redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self._errors: tuple[type[BaseException], ...] = (
            __import__("redis").RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._noscript: type[BaseException] = __import__("redis").exceptions.NoScriptError
        self._down: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch = Pipe(url, timeout_s)
        # Scripts run by EVALSHA through the pipe, by EVAL once when Redis lacks one.
        self._scripts = {
            name: (hashlib.sha1(text.encode()).hexdigest(), text)
            for name, text in (
                ("acquire", _ACQUIRE),
                ("settle", _SETTLE),
                ("failure", _FAILURE),
                ("lease", _LEASE),
                ("seed", _SEED),
                ("heartbeat", _HEARTBEAT),
            )
        }

    # ------------------------------------------------------------ health

    def problem(self) -> str | None:
        if self._down is None:
            return None
        return f"Redis at {redact(self.url)} unreachable ({self._down}): using local state"

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except self._errors as exc:
            self._lost(exc)
        else:
            log.info("shared state: Redis at %s (keys %s*)", redact(self.url), self.prefix)
        self._task = asyncio.create_task(self._reconnect(), name="tierroute-state-reconnect")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._batch.aclose()
        await self._redis.aclose()

    def _lost(self, exc: BaseException) -> None:
        if self._down is None:
            self._down = str(exc) or type(exc).__name__
            log.warning(
                "shared state: Redis at %s unreachable (%s); this replica works on local "
                "state (limits per replica) until it returns",
                redact(self.url),
                self._down,
                extra={"event": "state_down"},
            )

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.reconnect_s)
            if self._down is None:
                continue
            try:
                await self._redis.ping()
            except self._errors:
                continue
            log.warning(
                "shared state: Redis at %s answers again; shared state resumed",
                redact(self.url),
                extra={"event": "state_up"},
            )
            self._down = None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script in the next pipeline: by its SHA, or its text the first time
        this Redis sees it (after a restart or SCRIPT FLUSH)."""
        sha, text = self._scripts[name]
        try:
            return await self._batch.call("EVALSHA", sha, len(keys), *keys, *args)
        except self._noscript:
            return await self._batch.call("EVAL", text, len(keys), *keys, *args)

    async def _try(self, op: Any, fallback: Any) -> Any:
        """Run `op()` against Redis, or `fallback()` locally while Redis is down."""
        if self._down is None:
            try:
                return await op()
            except self._errors as exc:
                self._lost(exc)
        return await fallback()

    # ------------------------------------------------------------ decision cache

    async def cache_get(self, key: str) -> str | None:
        result: str | None = await self._try(
            lambda: self._batch.call("GET", self._k("cache", key)),
            lambda: self.local.cache_get(key),
        )
        return result

    async def cache_put(self, key: str, value: str, ttl_s: float) -> None:
        ms = max(1, int(ttl_s * 1000))
        await self._try(
            lambda: self._batch.call("SET", self._k("cache", key), value, "PX", ms),
            lambda: self.local.cache_put(key, value, ttl_s),
        )

    # ------------------------------------------------------------ breakers

    async def breaker_failure(self, tier: str, threshold: int, now: float) -> BreakerView:
        async def op() -> BreakerView:
            keys = [self._k("breaker", tier), self._k("probe", tier)]
            failures, opened = await self._script("failure", keys, [threshold, repr(now)])
            return BreakerView(int(failures), float(opened) if opened else None)

        view: BreakerView = await self._try(
            op, lambda: self.local.breaker_failure(tier, threshold, now)
        )
        return view

    async def breaker_success(self, tier: str) -> None:
        await self._try(
            lambda: self._batch.call("DEL", self._k("breaker", tier), self._k("probe", tier)),
            lambda: self.local.breaker_success(tier),
        )

    async def claim_probe(self, tier: str, ttl_s: float) -> bool:
        ms = max(1, int(ttl_s * 1000))

        async def op() -> bool:
            return bool(await self._batch.call("SET", self._k("probe", tier), "1", "PX", ms, "NX"))

        claimed: bool = await self._try(op, lambda: self.local.claim_probe(tier, ttl_s))
        return claimed

    # ------------------------------------------------------------ sync

    async def _all(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Replies of `commands`, sent together in the pipe's next write; the first error
        raised once all have answered (so none is left unretrieved)."""
        got = await asyncio.gather(
            *(self._batch.call(*c) for c in commands), return_exceptions=True
        )
        for reply in got:
            if isinstance(reply, BaseException):
                raise reply
        return got

    async def snapshot(self, tiers: list[str], window: int) -> Snapshot:
        async def op() -> Snapshot:
            commands: list[tuple[Any, ...]] = []
            for tier in tiers:
                commands.append(("HGETALL", self._k("breaker", tier)))
                commands.append(("LRANGE", self._k("latency", tier), 0, window - 1))
            commands.append(("GET", self._k("threshold")))
            commands.append(("GET", self._k("offsets", "version")))
            commands.append(("GET", self._k("revoked", "version")))
            got = await self._all(*commands)
            snap = Snapshot()
            for i, tier in enumerate(tiers):
                flat, lat = got[2 * i], got[2 * i + 1]
                b = dict(zip(flat[::2], flat[1::2], strict=True))  # HGETALL: field, value, ...
                opened = b.get("opened_at")
                snap.breakers[tier] = BreakerView(
                    int(b.get("failures", 0)), float(opened) if opened else None
                )
                snap.latency[tier] = [float(x) for x in lat]
            snap.threshold = float(got[-3]) if got[-3] is not None else None
            snap.offsets_version = int(got[-2] or 0)
            snap.revoked_version = int(got[-1] or 0)
            return snap

        result: Snapshot = await self._try(op, lambda: self.local.snapshot(tiers, window))
        return result

    async def add_latencies(self, samples: dict[str, list[float]], window: int) -> None:
        async def op() -> None:
            commands: list[tuple[Any, ...]] = []
            for tier, values in samples.items():
                key = self._k("latency", tier)
                commands.append(("LPUSH", key, *(f"{v:.3f}" for v in values)))
                commands.append(("LTRIM", key, 0, window - 1))
            await self._all(*commands)

        if samples:
            await self._try(op, lambda: self.local.add_latencies(samples, window))

    async def push_scores(self, scores: list[float], cap: int) -> None:
        async def op() -> None:
            key = self._k("scores")
            await self._all(("RPUSH", key, *(f"{s:.6f}" for s in scores)), ("LTRIM", key, -cap, -1))

        if scores:
            await self._try(op, lambda: self.local.push_scores(scores, cap))

    async def drain_scores(self, limit: int) -> list[float]:
        async def op() -> list[float]:
            got = await self._redis.lpop(self._k("scores"), limit)
            return [float(x) for x in got or ()]

        result: list[float] = await self._try(op, lambda: self.local.drain_scores(limit))
        return result

    # ------------------------------------------------------------ replicas

    async def heartbeat(self, holder: str, ttl_s: float) -> int:
        async def op() -> int:
            ms = max(1, int(ttl_s * 1000))
            return int(await self._script("heartbeat", [self._k("replicas")], [holder, ms]))

        alive: int = await self._try(op, lambda: self.local.heartbeat(holder, ttl_s))
        return alive

    async def leave(self, holder: str) -> None:
        await self._try(
            lambda: self._batch.call("ZREM", self._k("replicas"), holder),
            lambda: self.local.leave(holder),
        )

    # ------------------------------------------------------------ controller

    async def lease(self, holder: str, ttl_s: float) -> bool:
        async def op() -> bool:
            ms = max(1, int(ttl_s * 1000))
            return bool(await self._script("lease", [self._k("leader")], [holder, ms]))

        held: bool = await self._try(op, lambda: self.local.lease(holder, ttl_s))
        return held

    async def publish_threshold(self, value: float) -> None:
        await self._try(
            lambda: self._redis.set(self._k("threshold"), repr(value)),
            lambda: self.local.publish_threshold(value),
        )

    # ------------------------------------------------------------ personalisation

    async def offsets_add(self, tenant: str, n: float, bad: float) -> None:
        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrbyfloat(self._k("offsets", "n"), tenant, n)
                pipe.hincrbyfloat(self._k("offsets", "bad"), tenant, bad)
                pipe.incr(self._k("offsets", "version"))
                await pipe.execute()

        await self._try(op, lambda: self.local.offsets_add(tenant, n, bad))

    async def offsets_all(self) -> dict[str, list[float]]:
        async def op() -> dict[str, list[float]]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._k("offsets", "n"))
                pipe.hgetall(self._k("offsets", "bad"))
                ns, bads = await pipe.execute()
            return {t: [float(v), float(bads.get(t, 0))] for t, v in ns.items()}

        result: dict[str, list[float]] = await self._try(op, self.local.offsets_all)
        return result

    async def offsets_seed(self, counts: dict[str, list[float]]) -> None:
        async def op() -> None:
            version = self._k("offsets", "version")
            n_args = [x for t, c in counts.items() for x in (t, repr(c[0]))]
            bad_args = [x for t, c in counts.items() for x in (t, repr(c[1]))]
            # bad first: n's existence is what says "already seeded"
            await self._script("seed", [self._k("offsets", "bad"), version], bad_args)
            await self._script("seed", [self._k("offsets", "n"), version], n_args)

        if counts:
            await self._try(op, lambda: self.local.offsets_seed(counts))

    # ------------------------------------------------------------ revocations

    async def revoked_keys(self) -> set[str]:
        async def op() -> set[str]:
            return set(await self._redis.smembers(self._k("revoked")))

        result: set[str] = await self._try(op, self.local.revoked_keys)
        return result

    # ------------------------------------------------------------ limits

    def _limit_keys(self, key_id: str, c: Clock, window: int | None = None) -> list[str]:
        w = c.window if window is None else window
        return [
            self._k("rl", key_id, "r", str(w)),
            self._k("rl", key_id, "r", str(w - 1)),
            self._k("rl", key_id, "t", str(w)),
            self._k("rl", key_id, "t", str(w - 1)),
            self._k("spend", key_id, "d", c.day),
            self._k("spend", key_id, "m", c.month),
            self._k("spend", key_id, "reserved"),
        ]

    async def acquire(self, policy: KeyPolicy, ask: Ask, now: float) -> Verdict:
        c = Clock.at(now)

        async def op() -> Verdict:
            args: list[str | int | float] = [
                _limit(policy.requests_per_minute),
                _limit(policy.tokens_per_minute),
                _limit(policy.budget_usd_day),
                _limit(policy.budget_usd_month),
                repr(c.fraction),
                ask.tokens,
                repr(ask.cost_usd),
                c.to_next_minute,
                c.to_next_day,
                c.to_next_month,
            ]
            keys = self._limit_keys(policy.key_id, c)
            refused, wait, day, month = await self._script("acquire", keys, args)
            return Verdict(int(refused), int(wait), float(day), float(month), c.window)

        verdict: Verdict = await self._try(op, lambda: self.local.acquire(policy, ask, now))
        return verdict

    async def settle(
        self, policy: KeyPolicy, ask: Ask, verdict: Verdict, tokens: int, cost_usd: float
    ) -> None:
        await self.settle_many([(policy, ask, verdict, tokens, cost_usd)])

    async def settle_many(self, items: list[tuple[KeyPolicy, Ask, Verdict, int, float]]) -> None:
        c = Clock.at(time.time())

        async def op() -> None:
            calls = []
            for policy, ask, verdict, tokens, cost_usd in items:
                keys = self._limit_keys(policy.key_id, c, verdict.window)
                calls.append(
                    self._script(
                        "settle",
                        [keys[2], keys[6], keys[4], keys[5]],
                        [tokens - ask.tokens, repr(ask.cost_usd), repr(cost_usd)],
                    )
                )
            await asyncio.gather(*calls)  # issued together: one pipeline

        if items:
            await self._try(op, lambda: self.local.settle_many(items))

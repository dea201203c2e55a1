"""The Redis state's own pipelined connection (state/pipe.py) against real Redis servers:
replies matched in order, one command's error its own, the URL's database, a Redis that
stops answering or goes away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .redis_helpers import REDIS_URL, needs_redis, needs_redis_server, own_redis, unique_prefix

pytest.importorskip("hiredis")

from redis.exceptions import ConnectionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from tierroute.state.pipe import Pipe, pack


def test_pack_writes_resp_bulk_strings() -> None:
    assert pack(("SET", "k", 1, 0.5, b"\x00")) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n0.5\r\n$1\r\n\x00\r\n"
    )
    with pytest.raises(Exception, match="cannot send bool"):
        pack(("SET", "k", True))


@needs_redis
def test_replies_in_order_and_errors_are_each_commands_own() -> None:
    key = unique_prefix() + "k"

    async def go() -> None:
        pipe = Pipe(REDIS_URL)
        try:
            calls = [
                pipe.call("SET", key, "text"),
                pipe.call("INCR", key),  # WRONGTYPE-like: not an integer
                pipe.call("EVALSHA", "0" * 40, 0),
                pipe.call("GET", key),
                pipe.call("DEL", key),
            ]
            got = await asyncio.gather(*calls, return_exceptions=True)
            assert got[0] == "OK" and got[3] == "text" and got[4] == 1
            assert isinstance(got[1], ResponseError) and not isinstance(got[1], NoScriptError)
            assert isinstance(got[2], NoScriptError)
            assert pipe.pipelines == 1 and pipe.commands == 5  # one write for all five
            # a caller that gave up does not shift the others' replies
            gone = pipe.call("ECHO", "a")
            gone.cancel()
            assert await pipe.call("ECHO", "b") == "b"
        finally:
            await pipe.aclose()

    asyncio.run(go())


@needs_redis
def test_the_urls_database_is_selected() -> None:
    import redis

    key = unique_prefix() + "db"

    async def go() -> None:
        pipe = Pipe(REDIS_URL.rsplit("/", 1)[0] + "/5")
        try:
            await pipe.call("SET", key, "on five", "PX", 60_000)
        finally:
            await pipe.aclose()

    asyncio.run(go())
    five = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/5")
    zero = redis.Redis.from_url(REDIS_URL)
    try:
        assert five.get(key) == b"on five" and zero.get(key) is None
    finally:
        five.delete(key)
        five.close()
        zero.close()


@needs_redis_server
def test_a_late_reply_fails_what_is_in_flight_and_a_lost_server_is_reconnected(
    tmp_path: Path,
) -> None:
    import redis

    async def go() -> None:
        with own_redis(tmp_path) as server:
            pipe = Pipe(server.url, timeout_s=0.2)
            try:
                assert await pipe.call("PING") == "PONG"
                admin = redis.Redis.from_url(server.url)
                admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
                with pytest.raises(RedisTimeout):
                    await pipe.call("PING")
                await asyncio.sleep(0.6)  # the pause ends
                assert await pipe.call("PING") == "PONG"  # on a new connection
                admin.close()
                server.stop()
                with pytest.raises((ConnectionError, OSError)):
                    await pipe.call("PING")
                server.start()
                assert await pipe.call("PING") == "PONG"
            finally:
                await pipe.aclose()

    asyncio.run(go())

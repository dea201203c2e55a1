"""One pipelined Redis connection for the request path: RESP over an asyncio stream,
replies parsed by hiredis.

redis-py's asyncio client spends 100-250 µs of CPU on each command here (a pooled
connection taken and given back under a lock, a retry wrapper, a timeout context, reply
callbacks): with a limited key's check on every request, that was most of what Redis added
to a request. Redis answers a connection's commands in order, so one connection carries
every command of this process: those issued during one turn of the event loop go out in one
write (one round trip for a request's limit check and its cache read, a few for 64
concurrent requests), and each reply resolves the oldest waiting future. About 30-50 µs of
CPU a command.

A reply that is an error is that command's own (`redis.ResponseError`, `NoScriptError`
for an unknown script); a lost connection, or a reply later than `timeout_s`, fails every
command in flight (`redis.ConnectionError`, `redis.TimeoutError`) and the next command
connects afresh. redis-py parses the URL, so the two clients of RedisState agree on it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import (
    ConnectionError,
    DataError,
    InvalidResponse,
    NoScriptError,
    ResponseError,
    TimeoutError,
)


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings (numbers as redis-py writes them)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise DataError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """Matches replies to the futures waiting for them, oldest first."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=ResponseError, encoding="utf-8"
        )
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                future = self.waiting.popleft()
                if future.done():  # its caller gave up
                    continue
                if isinstance(reply, ResponseError):
                    if str(reply).startswith("NOSCRIPT"):
                        reply = NoScriptError(str(reply))
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (InvalidResponse, IndexError) as exc:  # not Redis, or out of step
            self.fail(ConnectionError(f"unreadable reply from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        self._fail_waiting(self.lost)

    def fail(self, exc: BaseException) -> None:
        """Give up the connection: every command in flight fails with `exc`."""
        self.lost = exc
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting(exc)

    def _fail_waiting(self, exc: BaseException) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)

    @property
    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()


class Pipe:
    """Commands to the Redis at `url`, sent in one write per turn of the event loop."""

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.options: dict[str, Any] = dict(parse_url(url))
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self.pipelines = 0  # writes so far, and the commands they carried (for tests)
        self.commands = 0

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command; the future resolves to its reply (or its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled:
            # Runs once the callbacks ready now have run: whatever they queue meanwhile
            # goes out in the same write.
            self._scheduled = True
            loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        self._scheduled = False
        protocol = self._protocol
        if protocol is None or not protocol.usable:
            self._protocol = None
            if self._queue and self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # sent once connected
        batch, self._queue = self._queue, []
        data = []
        for args, future in batch:
            if future.done():  # a caller that gave up before it was sent
                continue
            try:
                data.append(pack(args))
            except DataError as exc:
                future.set_exception(exc)
                continue
            protocol.waiting.append(future)
        if not data:
            return
        self.pipelines += 1
        self.commands += len(data)
        assert protocol.transport is not None
        protocol.transport.write(b"".join(data))
        last = protocol.waiting[-1]
        asyncio.get_running_loop().call_later(self.timeout_s, self._overdue, protocol, last)

    def _overdue(self, protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        if not future.done():
            protocol.fail(TimeoutError(f"Redis did not answer within {self.timeout_s} s"))

    async def _connect(self) -> None:
        try:
            protocol = await asyncio.wait_for(self._open(), self.timeout_s)
        except BaseException as exc:
            queued, self._queue = self._queue, []
            for _, future in queued:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self._protocol = protocol
            self._send()
        finally:
            self._connecting = None

    async def _open(self) -> _Protocol:
        """A connection, authenticated and on the URL's database."""
        loop = asyncio.get_running_loop()
        o = self.options
        if "path" in o:
            _, protocol = await loop.create_unix_connection(_Protocol, o["path"])
        else:
            host, port = o.get("host", "localhost"), int(o.get("port", 6379))
            context = self._ssl() if o.get("connection_class") is SSLConnection else None
            _, protocol = await loop.create_connection(_Protocol, host, port, ssl=context)
        setup: list[tuple[Any, ...]] = []
        if o.get("password") is not None:
            user = o.get("username")
            setup.append(("AUTH", user, o["password"]) if user else ("AUTH", o["password"]))
        if o.get("db"):
            setup.append(("SELECT", int(o["db"])))
        if setup:
            futures = [loop.create_future() for _ in setup]
            protocol.waiting.extend(futures)
            assert protocol.transport is not None
            protocol.transport.write(b"".join(pack(args) for args in setup))
            try:
                await asyncio.gather(*futures)
            except BaseException:
                protocol.fail(ConnectionError("Redis refused the connection's setup"))
                raise
        return protocol

    def _ssl(self) -> ssl.SSLContext:
        o = self.options
        context = ssl.create_default_context(cafile=o.get("ssl_ca_certs"))
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
            str(o.get("ssl_cert_reqs", "required")).lower(), ssl.CERT_REQUIRED
        )
        if reqs == ssl.CERT_NONE or not o.get("ssl_check_hostname", True):
            context.check_hostname = False
        context.verify_mode = reqs
        if o.get("ssl_certfile"):
            context.load_cert_chain(o["ssl_certfile"], o.get("ssl_keyfile"))
        return context

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.fail(ConnectionError("the Redis connection was closed"))
            self._protocol = None
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.cancel()

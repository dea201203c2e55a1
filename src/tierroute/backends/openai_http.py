"""A remote tier behind any OpenAI-compatible `/chat/completions` endpoint, over aiohttp.

Errors map onto BackendError so the gateway can decide what to do next:

    connect error, timeout, broken stream, 5xx, 429   retryable=True  (retry or next tier)
    an answer over max_response_bytes, an SSE line
    over MAX_SSE_LINE_BYTES, a malformed answer       retryable=True  (next tier)
    any other 4xx                                     retryable=False (upstream's message)

Answers are read in chunks and abandoned at the limit, so a runaway upstream costs at
most max_response_bytes of memory per request, never the whole answer.

aiohttp rather than httpx: on this 2-core machine httpx's connection pool cost ~3 ms of
CPU per request at 64 concurrent requests (285 req/s against a fast local upstream, where
aiohttp did 5,000), which made the HTTP client the gateway's bottleneck. The session is
created on first use inside the running event loop, never at import.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tierroute.backends.base import BackendError, ChatRequest, ChatResult, StreamDelta
from tierroute.backends.content import flatten, refuse_non_text
from tierroute.errors import MissingDependencyError

if TYPE_CHECKING:
    import aiohttp

INSTALL_HINT = "Remote tiers need aiohttp; install it with: pip install 'tierroute[serve]'"
# A whole answer (or a whole stream): far above any chat completion, far below what would
# hurt the gateway's memory with a few hundred requests in flight.
DEFAULT_MAX_RESPONSE_BYTES = 8 << 20
# One SSE line: a streamed event holds a few tokens; aiohttp's own readline limit is lower
# (and escapes as its LineTooLong), so lines are split here.
MAX_SSE_LINE_BYTES = 1 << 20
_READ_CHUNK = 64 << 10
# What a malformed JSON answer can raise while it is read (RecursionError: absurd nesting).
_MALFORMED = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    RecursionError,
    OverflowError,  # int(Infinity): Python's json reads it
)


class _Oversize(Exception):
    """An upstream answer went past a limit; the stream/complete call says which tier."""


class OpenAIHTTPBackend:
    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_connections: int = 256,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        vision: bool = True,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout  # the default; each call passes its own
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.vision = vision  # False: image parts are refused here, not sent
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            try:
                import aiohttp
            except ImportError as exc:
                raise MissingDependencyError(INSTALL_HINT) from exc
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _payload(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {**request.extra, "model": self.model, "messages": request.messages}
        for key in ("max_tokens", "temperature", "top_p", "stop"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream", None)
        return body

    def _sent(self, request: ChatRequest) -> ChatRequest:
        """The request as this tier gets it: a tier that cannot see gets no image part (400)
        and its text parts joined into strings, which text-only servers need (e.g.
        llama_cpp.server's chat templates fail on list content)."""
        if self.vision:
            return request
        refuse_non_text(request.messages, self.name, "its config says vision: false")
        return replace(request, messages=flatten(request.messages))

    async def post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST `body` (its model set to the tier's) to `path` under the API root and return
        the JSON object answered, with the bounds and error mapping of `complete`. For the
        endpoints passed through whole (/completions, /embeddings)."""
        status, text, url = await self._send(path, {**body, "model": self.model}, timeout)
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"the answer is a {type(data).__name__}")
            return data
        except _MALFORMED as exc:
            raise BackendError(
                f"Tier {self.name!r} at {url} sent a reply that is not a JSON object "
                f"({exc!r}); check that base_url ends in the API root (e.g. /v1).",
                retryable=True,
                status=status,
            ) from exc

    async def _send(
        self, path: str, payload: dict[str, Any], timeout: float
    ) -> tuple[int, str, str]:
        """(status, body, url) of one POST; an HTTP error status is raised as BackendError."""
        import aiohttp

        session = self._http()
        url = f"{self.base_url}{path}"
        try:
            async with asyncio.timeout(timeout):
                async with session.post(url, json=payload) as resp:
                    status = resp.status
                    text = await self._read_text(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, timeout) from exc
        except _Oversize as exc:
            raise self._oversize_error(exc) from None
        if status >= 400:
            raise self._status_error(status, text)
        return status, text, url

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult:
        request = self._sent(request)
        status, text, url = await self._send(
            "/chat/completions", self._payload(request, False), timeout
        )
        try:
            data = json.loads(text)
            choices = data["choices"]
            if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                raise TypeError("choices is not a list of objects")
            choice = choices[0]
            usage = data.get("usage") or {}
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}")
            return ChatResult(
                text=content,
                finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                model=str(data.get("model") or self.model),
                token_logprobs=_token_logprobs(choice),
                choices=choices,
                fields=_fields(data),
            )
        except _MALFORMED as exc:
            raise BackendError(
                f"Tier {self.name!r} at {url} sent a reply that is not an OpenAI chat "
                f"completion ({exc!r}); check that base_url ends in the API root (e.g. /v1).",
                retryable=True,
                status=status,
            ) from exc

    async def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[StreamDelta]:
        import aiohttp

        request = self._sent(request)
        session = self._http()
        url = f"{self.base_url}/chat/completions"
        deadline = time.monotonic() + timeout
        finish: str | None = None
        usage: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        done = False
        try:
            async with asyncio.timeout(timeout):
                resp = await session.post(url, json=self._payload(request, True))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, timeout) from exc
        try:
            if resp.status >= 400:
                raise self._status_error(resp.status, await self._read_text(resp))
            events = _sse_data(resp.content, self.max_response_bytes)
            while True:
                # A deadline per read, not a timeout scope around the yields: a scope
                # would cancel whichever task is consuming this generator.
                remaining = max(deadline - time.monotonic(), 0.0)
                try:
                    data = await asyncio.wait_for(anext(events), remaining)
                except StopAsyncIteration:
                    break
                if data == "[DONE]":
                    done = True
                    break
                chunk = self._chunk(data)
                fields = _fields(chunk)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                choices = self._choices(chunk)
                for _, finished in choices:
                    finish = finished or finish
                if choices:  # forwarded whole: tool_calls, logprobs, every index
                    text = "".join(t for t, _ in choices)  # the first answer's: for the books
                    yield StreamDelta(text=text, choices=chunk["choices"], fields=fields)
        except _Oversize as exc:
            resp.close()  # abandon the rest of the answer (and its connection)
            raise self._oversize_error(exc) from None
        except TimeoutError as exc:
            raise self._transport_error(exc, timeout) from None
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc, timeout) from exc
        finally:
            resp.release()
        if not done and finish is None:
            raise BackendError(
                f"Tier {self.name!r} closed its stream before the answer ended; retry or "
                "send the request to another tier.",
                retryable=True,
            )
        yield StreamDelta(
            text="",
            finish_reason=finish or "stop",
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            fields={**fields, "usage": usage},  # for the usage chunk the client may ask for
        )

    async def _read_text(self, resp: aiohttp.ClientResponse) -> str:
        """The body, read in chunks and abandoned past max_response_bytes."""
        limit = self.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()
            raise _Oversize(f"declared {resp.content_length} bytes")
        body = bytearray()
        async for piece in resp.content.iter_chunked(_READ_CHUNK):
            body += piece
            if len(body) > limit:
                resp.close()
                raise _Oversize(f"more than {limit} bytes")
        try:
            return body.decode(resp.charset or "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return body.decode("utf-8", "replace")

    def _oversize_error(self, exc: _Oversize) -> BackendError:
        return BackendError(
            f"Tier {self.name!r} sent an answer too large to accept ({exc}; its "
            f"max_response_bytes is {self.max_response_bytes}); send the request to another "
            "tier, or raise the tier's max_response_bytes if such answers are expected.",
            retryable=True,
        )

    def _choices(self, chunk: dict[str, Any]) -> list[tuple[str, str | None]]:
        """(content, finish_reason) of each choice of a streamed chunk; content only for
        the first answer (index 0) when n > 1."""
        try:
            out = []
            choices = chunk.get("choices") or []
            if not isinstance(choices, list):
                raise TypeError(f"choices is {type(choices).__name__}")
            for choice in choices:
                if not isinstance(choice, dict):
                    raise TypeError(f"a choice is {type(choice).__name__}")
                text = (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or None
                if not isinstance(text, str):
                    raise TypeError(f"content is {type(text).__name__}")
                text = text if choice.get("index", 0) == 0 else ""
                out.append((text, None if finish is None else str(finish)))
            return out
        except _MALFORMED as exc:
            raise self._malformed_event(repr(chunk)) from exc

    def _malformed_event(self, data: str) -> BackendError:
        return BackendError(
            f"Tier {self.name!r} streamed an event that is not an OpenAI chunk "
            f"({data[:80]!r}); check that the endpoint speaks the OpenAI streaming format.",
            retryable=True,
        )

    def _chunk(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise BackendError(
                f"Tier {self.name!r} streamed an event that is not JSON ({data[:80]!r}); "
                "check that the endpoint speaks the OpenAI streaming format.",
                retryable=True,
            ) from exc
        if not isinstance(chunk, dict):
            chunk = {}
        if "error" in chunk:
            raise BackendError(
                f"Tier {self.name!r} reported an error mid-stream: {_message(chunk)}",
                retryable=True,
            )
        return chunk

    def _transport_error(self, exc: Exception, timeout: float) -> BackendError:
        import aiohttp

        if isinstance(exc, TimeoutError):
            what = f"did not answer within {timeout:g}s"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            what = f"could not be reached at {self.base_url} ({exc})"
        else:
            what = f"broke the connection ({type(exc).__name__}: {exc})"
        return BackendError(
            f"Tier {self.name!r} {what}; retry, check that the server is up, or send the "
            "request to another tier.",
            retryable=True,
        )

    def _status_error(self, status: int, body: str) -> BackendError:
        try:
            detail = _message(json.loads(body))
        except ValueError:
            detail = body.strip()[:300] or "no message"
        retryable = status == 429 or status >= 500
        advice = (
            "retry later or send the request to another tier"
            if retryable
            else "fix the request or the tier's model/api_key settings"
        )
        return BackendError(
            f"Tier {self.name!r} answered HTTP {status}: {detail} ({advice}).",
            retryable=retryable,
            status=status,
        )


# Top-level fields of an answer that the gateway sets itself; the rest reach the client.
# (usage stays: its details, e.g. cached or reasoning tokens, reach the client too.)
_OWN = frozenset({"id", "object", "created", "model", "choices"})


def _fields(data: dict[str, Any]) -> dict[str, Any]:
    """An answer's other top-level fields (system_fingerprint, service_tier, unknown ones)."""
    return {k: v for k, v in data.items() if k not in _OWN}


def _token_logprobs(choice: dict[str, Any]) -> tuple[float, ...] | None:
    """`choices[0].logprobs.content[*].logprob`, when the endpoint sent them (the request
    asked with "logprobs": true); None when absent or not in that shape."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    try:
        return tuple(float(item["logprob"]) for item in content)
    except (KeyError, TypeError, ValueError):
        return None


def _message(data: Any) -> str:
    """The human message in an OpenAI (`error.message`) or FastAPI (`detail`) error body."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if "detail" in data:
            return str(data["detail"])[:300]
    return json.dumps(data)[:300]


def _count(value: Any) -> int | None:
    """A token count from an upstream's usage, or None when it is not a whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _lines(content: aiohttp.StreamReader, max_total: int) -> AsyncIterator[bytes]:
    """The lines of a body, split here rather than by aiohttp's readline, so that a line
    over MAX_SSE_LINE_BYTES or a body over `max_total` raises _Oversize at the limit."""
    pending = b""
    total = 0
    async for piece in content.iter_any():
        total += len(piece)
        if total > max_total:
            raise _Oversize(f"a stream of more than {max_total} bytes")
        *lines, pending = (pending + piece).split(b"\n")
        if len(pending) > MAX_SSE_LINE_BYTES:
            raise _Oversize(f"an event line of more than {MAX_SSE_LINE_BYTES} bytes")
        for line in lines:
            yield line
    if pending:
        yield pending


async def _sse_data(content: aiohttp.StreamReader, max_total: int) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined with newlines)."""
    buf: list[str] = []
    async for raw in _lines(content, max_total):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue  # a comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)

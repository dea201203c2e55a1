"""A minimal, fast OpenAI-compatible upstream for measuring the gateway's own overhead.

It answers every chat completion at once with a fixed short reply (no model), so the
difference between calling it directly and through tierroute is tierroute's cost.
Run: python benchmarks/fast_upstream.py PORT [--mimic]

With --mimic it answers each request as OpenAI's API would (n choices, tool calls,
logprobs, JSON mode, system_fingerprint; /completions and /embeddings too: see mimic.py),
echoing the request it received, for tests of what passes through the gateway.
"""

from __future__ import annotations

import json
import os
import sys
import time

import uvicorn

MIMIC = "--mimic" in sys.argv

REPLY = {
    "id": "chatcmpl-upstream",
    "object": "chat.completion",
    "model": "fast",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
BODY = json.dumps(REPLY).encode()
# The same reply as server-sent chunks, for `"stream": true`.
_CHUNK = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "model": "fast"}
STREAM = (
    b"".join(
        b"data: " + json.dumps({**_CHUNK, **part}).encode() + b"\n\n"
        for part in (
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": REPLY["usage"]},
        )
    )
    + b"data: [DONE]\n\n"
)


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more, request = True, b""
    while more:
        message = await receive()
        request += message.get("body", b"")
        more = message.get("more_body", False)
    body, kind = b'{"status":"ok"}', b"application/json"
    if MIMIC and scope["path"].startswith("/v1/"):
        body, kind = _mimic(scope["path"], json.loads(request or b"{}"))
    elif scope["path"].endswith("/chat/completions"):
        body = BODY
        if b'"stream"' in request and json.loads(request).get("stream"):
            body, kind = STREAM, b"text/event-stream"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", kind),
                (b"x-created", str(int(time.time())).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _mimic(path: str, request: dict) -> tuple[bytes, bytes]:  # type: ignore[type-arg]
    import mimic

    if path.endswith("/chat/completions") and request.get("stream"):
        events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in mimic.chat_chunks(request)]
        return b"".join(events) + b"data: [DONE]\n\n", b"text/event-stream"
    if path.endswith("/chat/completions"):
        return json.dumps(mimic.chat(request)).encode(), b"application/json"
    if path.endswith("/completions"):
        return json.dumps(mimic.completion(request)).encode(), b"application/json"
    if path.endswith("/embeddings"):
        return json.dumps(mimic.embeddings(request)).encode(), b"application/json"
    if path.endswith("/models"):
        return b'{"object":"list","data":[]}', b"application/json"
    return b'{"status":"ok"}', b"application/json"


if __name__ == "__main__":
    host = os.environ.get("FAST_UPSTREAM_HOST", "127.0.0.1")  # 0.0.0.0 in a container
    uvicorn.run(app, host=host, port=int(sys.argv[1]), log_level="warning", access_log=False)

"""/v1/completions and /v1/embeddings: passed whole to a tier that serves them.

A remote tier (any OpenAI-compatible endpoint) gets the client's body as sent, with its own
model name; the answer comes back as the tier gave it, under our id and the tier's model
name, with a ledger row like a chat request's. Routing is the chat endpoint's: `model`
"auto" scores the prompt, a tier name (or its model name) forces that tier. Local tiers do
not serve these endpoints: an auto request moves on to the next tier of its chain that
does, a request that names a local tier gets 400 saying so.

Embeddings are never routed: two models' vectors are not comparable, so a client that mixed
tiers would get an index it cannot search. `model` must name the tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tierroute.backends.base import ChatRequest, Poster
from tierroute.gateway.engine import Hints, Outcome, Routed
from tierroute.gateway.schema import ApiError, ChatCall, hints_from, model_of

COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"
MAX_INPUTS = 2048  # OpenAI's own bound on an embeddings batch


def serves(backend: object) -> bool:
    """Whether a tier's backend passes whole bodies on (remote tiers do)."""
    return isinstance(backend, Poster)


def _text(doc: dict[str, Any], key: str) -> str:
    """The text of `prompt` / `input`: a string or an array of strings (joined to route)."""
    value = doc.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if (
        isinstance(value, list)
        and value
        and len(value) <= MAX_INPUTS
        and all(isinstance(v, str) for v in value)
        and any(v.strip() for v in value)
    ):
        return "\n".join(value)
    raise ApiError(
        400,
        f"'{key}' must be a non-empty string or an array of up to {MAX_INPUTS} strings "
        "(token arrays are not routed).",
        param=key,
    )


def parse(
    doc: dict[str, Any],
    path: str,
    models: list[str],
    aliases: dict[str, str],
    headers: dict[str, str],
) -> ChatCall:
    """The request as a ChatCall (its text as one user message, for routing and the books)."""
    model = model_of(doc, models, aliases)
    if doc.get("stream") not in (None, False):
        raise ApiError(
            400,
            f"Streaming is not offered on /v1{path}; send stream: false, or stream from "
            "/v1/chat/completions.",
            param="stream",
        )
    if path == EMBEDDINGS and model == "auto":
        raise ApiError(
            400,
            "Embeddings are not routed (vectors of different models cannot be compared): "
            f"set 'model' to a tier, one of {models[1:]}.",
            param="model",
        )
    text = _text(doc, "prompt" if path == COMPLETIONS else "input")
    limit = doc.get("max_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
    user = doc.get("user")
    hints: Hints = hints_from(doc.get("metadata"), headers, user)
    request = ChatRequest(messages=[{"role": "user", "content": text}], max_tokens=limit)
    return ChatCall(model=model, request=request, stream=False, include_usage=False, hints=hints)


def body_for_tier(doc: dict[str, Any]) -> dict[str, Any]:
    """What the tier gets: the client's body without the gateway's own `metadata` hints."""
    return {k: v for k, v in doc.items() if k != "metadata"}


def usage(data: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of an answer's usage; 0 where absent or not a count."""
    raw = data.get("usage")
    raw = raw if isinstance(raw, dict) else {}

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


def tagged(routed: Routed, path: str) -> Routed:
    """The decision tagged with its endpoint, so the ledger and `report --by tag` tell
    these rows from chat ones."""
    d = routed.decision
    decision = replace(d, tags={**d.tags, "endpoint": path.strip("/")})
    return replace(routed, decision=decision)


def check_chain(outcome: Outcome, backends: Mapping[str, object], path: str) -> None:
    """400 when no tier of the chain serves `path`; the tiers passed over go in the notes."""
    chain = outcome.routed.chain
    serving = [t for t in chain if serves(backends[t])]
    if not serving:
        raise ApiError(
            400,
            f"No tier here serves /v1{path}: {', '.join(chain)} "
            f"{'is a local model' if len(chain) == 1 else 'are local models'} (llama.cpp "
            "answers chat only); name a remote tier in 'model'.",
            param="model",
        )
    skipped = chain[: chain.index(serving[0])]
    outcome.notes.extend(f"{t} skipped: a local model does not serve /v1{path}" for t in skipped)


def answer(data: dict[str, Any], request_id: str, model: str) -> dict[str, Any]:
    """The tier's answer under our id (completions; embeddings have none) and model name."""
    body = {**data, "model": model}
    if "id" in data:
        body["id"] = request_id
    return body

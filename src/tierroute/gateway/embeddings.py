"""/v1/embeddings served in the gateway by the packaged all-MiniLM-L6-v2.

A request whose `model` is one of `gateway.embedding_models` (default
["all-MiniLM-L6-v2"]) is answered here, in OpenAI's shape, by the sentence-embedding
model the router already uses (tierroute.embed): 384 floats per input, L2-normalised,
mean-pooled, as sentence-transformers gives them. Any other `model` goes to the remote
tier it names (gateway/passthrough.py).

    input             a string, an array of strings, an array of token ids, or an array of
                      such arrays; up to MAX_INPUTS inputs and MAX_TOTAL_TOKENS tokens
                      (token ids are the model's own WordPiece ids, [CLS] and [SEP]
                      included, as its tokenizer gives them, not tiktoken's)
    encoding_format   "float" (default) or "base64" (little-endian float32, as OpenAI)
    dimensions        384 or unset (the model has no shorter form)
    user, metadata    accepted (the tenant, for the books)
Texts and token arrays longer than the model reads (256 tokens) are cut there, as
sentence-transformers does; `usage.prompt_tokens` counts the tokens read.

The vectors are the standard model's: the router's own embedder is shared when it is that
model at full precision (fp32, 256 tokens, no fine-tuned layers), otherwise one is loaded
for this endpoint on its first request. One embedding batch runs at a time, off the event
loop and off the routing thread.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierroute.embed import MODEL_NAME, Embedder, Vectors
from tierroute.gateway.schema import ApiError
from tierroute.ledger import LedgerRow

DEFAULT_NAMES = ("all-MiniLM-L6-v2",)
MAX_INPUTS = 2048  # OpenAI's bound on an embeddings batch
MAX_TOTAL_TOKENS = 300_000  # likewise, per request
MAX_LENGTH = 256  # tokens the model reads of each input
_KEYS = {"model", "input", "encoding_format", "dimensions", "user", "metadata"}
TIER = "embeddings"  # what the ledger and /metrics call this endpoint's local model


@dataclass(frozen=True)
class EmbedCall:
    model: str
    texts: list[str] | None  # strings, or
    ids: list[list[int]] | None  # token arrays
    base64: bool


def parse(doc: dict[str, Any], model: str) -> EmbedCall:
    """The request, or ApiError 400 naming the field that is wrong."""
    for key in doc:
        if key not in _KEYS:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: '{key}' (the local embedding model "
                f"'{model}' takes {', '.join(sorted(_KEYS))}).",
                param=key,
            )
    fmt = doc.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(
            400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    dims = doc.get("dimensions")
    if dims is not None and dims != Embedder.dim:
        raise ApiError(
            400,
            f"'{model}' gives {Embedder.dim}-dimensional vectors only; leave 'dimensions' "
            f"unset or send {Embedder.dim}.",
            param="dimensions",
        )
    if doc.get("user") is not None and not isinstance(doc["user"], str):
        raise ApiError(400, "'user' must be a string.", param="user")
    texts, ids = _inputs(doc.get("input"))
    return EmbedCall(model=model, texts=texts, ids=ids, base64=fmt == "base64")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    shape = (
        "'input' must be a non-empty string, an array of up to "
        f"{MAX_INPUTS} non-empty strings, an array of token ids or an array of such arrays."
    )
    if isinstance(value, str) or (_is_ids(value) and value):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_INPUTS:
        raise ApiError(400, shape, param="input")
    if all(isinstance(v, str) for v in value):
        if not all(v for v in value):
            raise ApiError(400, "'input' cannot hold an empty string.", param="input")
        return list(value), None
    if not all(_is_ids(v) and v for v in value):
        raise ApiError(400, shape, param="input")
    total = sum(min(len(v), MAX_LENGTH) for v in value)
    if total > MAX_TOTAL_TOKENS:
        raise ApiError(
            400, f"'input' holds more than {MAX_TOTAL_TOKENS} tokens; split it.", param="input"
        )
    return None, [list(v) for v in value]


def embed(embedder: Embedder, call: EmbedCall) -> tuple[Vectors, int]:
    """The vectors and the tokens read (blocking: run it in a worker thread)."""
    if call.ids is not None:
        vocab = embedder.vocab_size
        for i, row in enumerate(call.ids):
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(
                    400,
                    f"'input[{i}]' holds token id {bad}, outside the model's vocabulary "
                    f"(0 to {vocab - 1}).",
                    param=f"input[{i}]",
                )
        ids = call.ids
    else:
        assert call.texts is not None
        ids = embedder.token_ids(call.texts)
        if sum(len(r) for r in ids) > MAX_TOTAL_TOKENS:
            raise ApiError(
                400, f"'input' holds more than {MAX_TOTAL_TOKENS} tokens; split it.", param="input"
            )
    return embedder.embed_ids(ids), sum(min(len(r), embedder.max_length) for r in ids)


def body(call: EmbedCall, vectors: Vectors, tokens: int) -> dict[str, Any]:
    """OpenAI's embeddings answer."""

    def encode(vector: Any) -> Any:
        if call.base64:
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        return [float(x) for x in vector]

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)
        ],
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def ledger_row(
    request_id: str,
    ts: float,
    model: str,
    tokens: int,
    latency_ms: float,
    api_key_id: str | None,
    tenant: str | None,
) -> LedgerRow:
    """The request's row: no routing, no cost (the model runs here), tag endpoint."""
    return LedgerRow(
        id=request_id,
        ts=ts,
        tier=TIER,
        model=f"{MODEL_NAME} as {model}",
        api_key_id=api_key_id,
        prompt_tokens=tokens,
        latency_ms=latency_ms,
        fallback_chain=(TIER,),
        reason=f"'{model}' is the local embedding model (gateway.embedding_models)",
        tags={"endpoint": "embeddings"},
        forced=True,
        tenant=tenant,
        price_in_per_m=0.0,
        price_out_per_m=0.0,
    )


def shared_embedder(router: object) -> Embedder:
    """The router's embedder when it gives the standard model's vectors, else a new one
    (loaded on first use)."""
    encoder = getattr(router, "encoder", None)
    own = getattr(encoder, "embedder", None)
    if (
        isinstance(own, Embedder)
        and own.precision == "fp32"
        and own.max_length == MAX_LENGTH
        and own.overrides is None
    ):
        return own
    return Embedder(max_length=MAX_LENGTH, precision="fp32")

"""The ASGI app: OpenAI-compatible endpoints over the routing engine.

    POST /v1/chat/completions   model "auto" routes; a tier name forces that tier
    GET  /v1/models             the tiers and "auto"
    POST /v1/route              the decision alone, nothing generated
    POST /v1/router/rollback    undo the continuous learner's last promotion (gateway.learning)
    GET  /healthz, /metrics     liveness; Prometheus metrics
    GET  /openapi.json, /docs   the schema

Every answer carries X-Tierroute-Tier, -Score, -Reason, -Cost-Usd, -Fallback and
-Request-Id headers (and -Cascade when the cascade ran); every error is an OpenAI error
object with the right status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierroute.backends.base import Backend, BackendError, StreamDelta
from tierroute.conversation import estimate_tokens
from tierroute.errors import InputError
from tierroute.gateway.engine import AllTiersFailed, Engine, Outcome, Routed, new_request_id
from tierroute.gateway.learner import Learner
from tierroute.gateway.metrics import Metrics
from tierroute.gateway.schema import (
    ApiError,
    ChatCall,
    chunk_body,
    completion_body,
    parse_chat,
    parse_json,
    sse,
)
from tierroute.gateway.settings import GatewaySettings, hash_key
from tierroute.ledger import Ledger
from tierroute.routers.base import BaseRouter

log = logging.getLogger(__name__)

_CHAT_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["messages"],
                    "properties": {
                        "model": {"type": "string", "description": "'auto' or a tier name"},
                        "messages": {"type": "array", "items": {"type": "object"}},
                        "stream": {"type": "boolean"},
                        "max_tokens": {"type": "integer"},
                        "temperature": {"type": "number"},
                        "metadata": {
                            "type": "object",
                            "description": "priority, latency_budget_ms, max_cost_usd",
                        },
                    },
                }
            }
        },
    }
}


@dataclass
class Parts:
    """What the app is built from; built lazily in the lifespan when not passed in."""

    router: BaseRouter
    backends: Mapping[str, Backend]
    ledger: Ledger


def _header_safe(text: str, limit: int = 400) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")[:limit].replace("\n", " ")


def _decision_headers(
    routed: Routed,
    tier: str | None,
    tried: list[str],
    cost: float | None,
    request_id: str,
    cascade: str | None = None,
) -> dict[str, str]:
    d = routed.decision
    headers = {
        "X-Tierroute-Tier": tier or d.tier.name,
        "X-Tierroute-Score": "" if d.score != d.score else f"{d.score:.4f}",
        "X-Tierroute-Reason": _header_safe(d.reason),
        "X-Tierroute-Fallback": ",".join(tried) if len(tried) > 1 else "",
        "X-Tierroute-Request-Id": request_id,
        "X-Tierroute-Cache": "hit" if routed.cache_hit else "miss",
    }
    if cost is not None:
        headers["X-Tierroute-Cost-Usd"] = f"{cost:.8f}"
    if cascade is not None:
        headers["X-Tierroute-Cascade"] = _header_safe(cascade)
    return headers


def _tenant_or_key(call: ChatCall, key_id: str | None) -> ChatCall:
    """A request without a `user` belongs to its API key, for personalisation."""
    if call.hints.tenant is not None or key_id is None:
        return call
    return replace(call, hints=replace(call.hints, tenant=key_id))


def create_app(
    settings: GatewaySettings,
    build: Callable[[GatewaySettings], Parts],
    metrics: Metrics | None = None,
) -> FastAPI:
    """The gateway app. `build` makes router, backends and ledger at start-up (in a thread,
    since local models take a while to load); they are closed again at shutdown."""
    state: dict[str, Engine] = {}
    learners: dict[str, Learner] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts = await asyncio.to_thread(build, settings)
        engine = Engine(settings, parts.router, parts.backends, parts.ledger, metrics)
        state["engine"] = engine
        if settings.learning is not None:
            folder = parts.ledger.path.parent / "learned"
            learner = Learner(
                engine, settings.learning, folder, settings.router, asyncio.get_running_loop()
            )
            await asyncio.to_thread(learner.restore)
            learner.start()
            learners["learner"] = learner
        try:
            yield
        finally:
            # Graceful shutdown (SIGTERM): in-flight requests have finished; every
            # queued ledger row is committed before the process exits.
            if "learner" in learners:
                await asyncio.to_thread(learners["learner"].stop)
            engine.close()
            if engine.shadow is not None:
                await engine.shadow.aclose()
            for backend in parts.backends.values():
                await backend.aclose()
            await parts.ledger.aclose()

    app = FastAPI(title="tierroute", version="0.1.0", lifespan=lifespan)

    def engine() -> Engine:
        return state["engine"]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(exc.status_code, str(exc.detail), type=kind).body(),
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        error = ApiError(
            500,
            f"Internal error in tierroute ({type(exc).__name__}); see the gateway's log.",
            type="api_error",
            code="internal_error",
        )
        return JSONResponse(error.body(), status_code=500)

    def authorise(request: Request) -> str | None:
        """The caller's key id (a short hash), or 401 when keys are configured."""
        if not settings.api_key_hashes:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        digest = hash_key(key) if key else ""
        if digest not in settings.api_key_hashes:
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                type="authentication_error",
                code="invalid_api_key",
            )
        return digest[:12]

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(
            413, f"The request body exceeds {limit} bytes.", code="request_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return body

    def headers_of(request: Request) -> dict[str, str]:
        return {k.lower(): v for k, v in request.headers.items()}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        e = engine()
        return {"status": "ok", "tiers": {n: e.breakers[n].state for n in e.tier_names}}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(engine().metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/dashboard")
    async def dashboard() -> Response:
        from importlib import resources

        page = resources.files("tierroute.resources").joinpath("dashboard.html").read_text()
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/v1/dashboard/data")
    async def dashboard_json(since: str = "24h") -> JSONResponse:
        from tierroute.errors import LedgerError
        from tierroute.gateway.dashboard import dashboard_data
        from tierroute.ledger import parse_since

        try:
            start = parse_since(since)
        except LedgerError as exc:
            raise ApiError(400, str(exc), param="since") from None
        e = engine()
        await e.ledger.aflush()  # so the charts include the requests just answered
        data = await asyncio.to_thread(dashboard_data, e.ledger, settings, start)
        return JSONResponse(data)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorise(request)
        created = int(time.time())
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "tierroute"}]
        data += [
            {"id": s.name, "object": "model", "created": created, "owned_by": s.tier.model}
            for s in settings.tiers
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/route", openapi_extra=_CHAT_SCHEMA)
    async def route(request: Request) -> JSONResponse:
        key_id = authorise(request)
        doc = parse_json(await read_body(request))
        call = parse_chat(
            doc, ["auto", *engine().tier_names], headers_of(request), settings.max_tokens_default
        )
        routed = await _route(_tenant_or_key(call, key_id))
        d = routed.decision
        body = {
            "tier": d.tier.name,
            "model": d.tier.model,
            "score": None if d.score != d.score else d.score,
            "reason": d.reason,
            "tags": dict(d.tags),
            "fallback_chain": routed.chain,
            "cache_hit": routed.cache_hit,
            "routing_ms": round(routed.routing_ms, 3),
        }
        return JSONResponse(body, headers=_decision_headers(routed, None, [], None, ""))

    async def _route(call: ChatCall) -> Routed:
        forced = None if call.model == "auto" else call.model
        max_tokens = call.request.max_tokens or settings.max_tokens_default
        try:
            return await engine().route(call.request.messages, call.hints, max_tokens, forced)
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    @app.post("/v1/router/rollback")
    async def rollback(request: Request) -> JSONResponse:
        """Serve the router before the continuous learner's last promotion again."""
        authorise(request)
        learner = learners.get("learner")
        if learner is None:
            raise ApiError(
                404,
                "Continuous learning is off ('gateway.learning' in the config): "
                "there is no promotion to roll back.",
                type="not_found_error",
                code="learning_disabled",
            )
        try:
            run = await asyncio.to_thread(learner.rollback)
        except InputError as exc:
            raise ApiError(409, f"{exc}.", code="nothing_to_roll_back") from None
        return JSONResponse(
            {
                "object": "router.rollback",
                "status": run.outcome,
                "detail": run.reason,
                "router": run.router,
            }
        )

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """Rate an answer: {"request_id", "rating": 1 | 0 | a score in [0, 1], "comment"?}."""
        key_id = authorise(request)
        doc = parse_json(await read_body(request))
        request_id = doc.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ApiError(
                400,
                "'request_id' must be the id of a completion (chatcmpl-...).",
                param="request_id",
            )
        rating = doc.get("rating")
        if isinstance(rating, bool):
            rating = 1.0 if rating else 0.0
        if not isinstance(rating, int | float) or not 0.0 <= rating <= 1.0:
            raise ApiError(
                400,
                "'rating' must be 1 (thumbs up), 0 (thumbs down) or a score between 0 and 1.",
                param="rating",
            )
        comment = doc.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise ApiError(400, "'comment' must be a string.", param="comment")
        owner = await engine().request_owner(request_id)
        # Another key's request is reported as unknown: its existence is not theirs to see.
        if owner is None or (settings.api_key_hashes and owner.api_key_id != key_id):
            raise ApiError(
                404,
                f"No request with id '{request_id}'.",
                type="not_found_error",
                param="request_id",
                code="request_not_found",
            )
        engine().ledger.add_feedback(request_id, float(rating), comment)
        engine().feedback(owner, float(rating))
        return JSONResponse(
            {
                "object": "feedback",
                "request_id": request_id,
                "rating": float(rating),
                "status": "recorded",
            }
        )

    def failed(
        outcome: Outcome,
        call: ChatCall,
        key_id: str | None,
        start: float,
        prompt: str | None,
        exc: AllTiersFailed | BackendError,
        stream: bool,
    ) -> ApiError:
        """Record a request no tier could answer; return the error the client gets."""
        status = 502 if isinstance(exc, AllTiersFailed) else (exc.status or 502)
        engine().record(
            outcome,
            status=status,
            hints=call.hints,
            api_key_id=key_id,
            latency_ms=(time.perf_counter() - start) * 1000,
            error=str(exc),
            stream=stream,
            prompt_text=prompt,
        )
        return ApiError(
            status, f"No tier could answer: {exc}", type="api_error", code="upstream_error"
        )

    @app.post("/v1/chat/completions", openapi_extra=_CHAT_SCHEMA)
    async def chat(request: Request) -> Response:
        start = time.perf_counter()
        key_id = authorise(request)
        doc = parse_json(await read_body(request))
        e = engine()
        call = _tenant_or_key(
            parse_chat(
                doc, ["auto", *e.tier_names], headers_of(request), settings.max_tokens_default
            ),
            key_id,
        )
        routed = await _route(call)
        outcome = Outcome(request_id=new_request_id(), routed=routed)
        prompt = routed.text if settings.keep_prompts else None
        cascade = e.cascades(routed, forced=call.model != "auto")
        if call.stream:
            return await _stream(call, outcome, key_id, start, prompt, cascade)
        try:
            if cascade:
                result = await e.complete_cascade(outcome, call.request, call.hints)
            else:
                result = await e.complete(outcome, call.request)
        except (AllTiersFailed, BackendError) as exc:
            raise failed(outcome, call, key_id, start, prompt, exc, stream=False) from None
        latency = (time.perf_counter() - start) * 1000
        tier = e.settings.spec(outcome.tier or routed.decision.tier.name).tier
        # Usage in the body is the returned answer's; the cost covers every call made.
        cost = tier.cost(result.prompt_tokens, result.completion_tokens) + e.spent_cost(outcome)
        e.record(
            outcome,
            status=200,
            hints=call.hints,
            api_key_id=key_id,
            latency_ms=latency,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            prompt_text=prompt,
        )
        if e.shadow is not None:
            e.shadow.maybe_sample(outcome.request_id, call.request, tier.name, result.text)
        body = completion_body(
            outcome.request_id,
            tier.model,
            result.text,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
        )
        headers = _decision_headers(
            routed, outcome.tier, outcome.tried, cost, outcome.request_id, outcome.cascade
        )
        return JSONResponse(body, headers=headers)

    async def _stream(
        call: ChatCall,
        outcome: Outcome,
        key_id: str | None,
        start: float,
        prompt: str | None,
        cascade: bool,
    ) -> Response:
        e = engine()
        try:
            if cascade:
                first, rest = await e.open_cascade_stream(outcome, call.request, call.hints)
            else:
                first, rest = await e.open_stream(outcome, call.request)
        except (AllTiersFailed, BackendError) as exc:
            raise failed(outcome, call, key_id, start, prompt, exc, stream=True) from None
        ttft = (time.perf_counter() - start) * 1000
        tier_name = outcome.tier or outcome.routed.decision.tier.name
        tier = e.settings.spec(tier_name).tier
        max_cost = tier.cost(
            estimate_tokens(outcome.routed.text),
            call.request.max_tokens or settings.max_tokens_default,
        ) + e.spent_cost(outcome)
        headers = _decision_headers(
            outcome.routed, tier_name, outcome.tried, max_cost, outcome.request_id, outcome.cascade
        )
        headers["X-Tierroute-Cost-Usd-Is"] = "upper-estimate"
        created = int(time.time())

        async def body() -> AsyncIterator[bytes]:
            status, error = 200, None
            usage = StreamDelta(text="", prompt_tokens=0, completion_tokens=0)
            tier_start = time.perf_counter()
            pieces: list[str] = []
            try:
                yield sse(
                    chunk_body(
                        outcome.request_id,
                        tier.model,
                        created,
                        {"role": "assistant", "content": ""},
                        None,
                    )
                )
                delta: StreamDelta | None = first
                while delta is not None:
                    if delta.text:
                        pieces.append(delta.text)
                        yield sse(
                            chunk_body(
                                outcome.request_id,
                                tier.model,
                                created,
                                {"content": delta.text},
                                None,
                            )
                        )
                    if delta.finish_reason is not None:
                        usage = delta
                        yield sse(
                            chunk_body(
                                outcome.request_id, tier.model, created, {}, delta.finish_reason
                            )
                        )
                    delta = await anext(rest, None)
                if call.include_usage:
                    p, c = usage.prompt_tokens or 0, usage.completion_tokens or 0
                    yield sse(
                        {
                            "id": outcome.request_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": tier.model,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": p,
                                "completion_tokens": c,
                                "total_tokens": p + c,
                            },
                            "tierroute": {
                                "tier": tier_name,
                                "cost_usd": tier.cost(p, c) + e.spent_cost(outcome),
                            },
                        }
                    )
                yield sse("[DONE]")
                if e.shadow is not None:
                    e.shadow.maybe_sample(
                        outcome.request_id, call.request, tier_name, "".join(pieces)
                    )
            except BackendError as exc:
                # Chunks already went out: we cannot switch tiers silently (see engine).
                status, error = 502, f"stream from tier {tier_name} broke: {exc}"
                yield sse(ApiError(502, error, type="api_error", code="stream_broken").body())
            except (asyncio.CancelledError, GeneratorExit):
                status, error = 499, "client closed the stream"
                raise
            finally:
                if not outcome.replayed:  # a replayed answer's tier was booked when it answered
                    e.stream_finished(
                        tier_name, (time.perf_counter() - tier_start) * 1000, ok=status != 502
                    )
                e.record(
                    outcome,
                    status=status,
                    hints=call.hints,
                    api_key_id=key_id,
                    latency_ms=(time.perf_counter() - start) * 1000,
                    prompt_tokens=usage.prompt_tokens or 0,
                    completion_tokens=usage.completion_tokens or 0,
                    ttft_ms=ttft,
                    error=error,
                    stream=True,
                    prompt_text=prompt,
                )

        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return app

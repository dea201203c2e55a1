"""The ASGI app: OpenAI-compatible endpoints over the routing engine.

    POST /v1/chat/completions   model "auto" routes; a tier (or its model name) forces it
    POST /v1/completions        passed whole to a remote tier, routed the same way
    POST /v1/embeddings         passed whole to the remote tier `model` names
    GET  /v1/models             the tiers and "auto"
    POST /v1/route              the decision alone, nothing generated
    POST /v1/router/rollback    undo the continuous learner's last promotion (gateway.learning)
    GET  /healthz, /metrics     liveness; Prometheus metrics
    GET  /dashboard, /v1/dashboard/data   the dashboard page and its data
    POST /v1/feedback           rate one of the caller's own answers
    GET  /openapi.json, /docs   the schema

Who may call what (gateway/auth.py): /healthz, /dashboard (a page without data),
/openapi.json and /docs are open; the admin surfaces (rollback, dashboard data, /metrics
unless `gateway.public_metrics`) need a config key; the rest take any key, and a virtual
key reaches only its own requests. The endpoints that spend money (chat, completions,
embeddings) pass through one seam, `paying`, that authorises, admits under the key's
limits and budget, and books the spend to the key; /v1/route and /v1/feedback, which
spend CPU and ledger rows, through `side_gate` (a per-key count of their own).

Every answer carries X-Tierroute-Tier, -Score, -Reason, -Cost-Usd, -Fallback and
-Request-Id headers (and -Cascade when the cascade ran); every error is an OpenAI error
object with the right status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tierroute.backends.base import Backend, BackendError, ChatRequest, StreamDelta
from tierroute.conversation import estimate_tokens
from tierroute.errors import InputError, LedgerError, MissingDependencyError
from tierroute.gateway import embeddings as local_embeddings
from tierroute.gateway import passthrough
from tierroute.gateway.admission import gate, key_policy, side_gate
from tierroute.gateway.auth import Caller, authenticate, require_admin
from tierroute.gateway.engine import (
    AllTiersFailed,
    Engine,
    Lookahead,
    Outcome,
    Routed,
    new_request_id,
)
from tierroute.gateway.learner import Learner
from tierroute.gateway.limits import Ticket, settle
from tierroute.gateway.metrics import Metrics
from tierroute.gateway.schema import (
    ApiError,
    ChatCall,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorBody,
    FeedbackRecorded,
    FeedbackRequest,
    RouteDecision,
    answer_body,
    chunk_body,
    forwarded_chunk,
    hints_from,
    parse_chat,
    parse_json,
    sse,
    usage_fields,
)
from tierroute.gateway.settings import GatewaySettings
from tierroute.gateway.sync import attach_state, detach_state
from tierroute.keys import Authoriser, KeyStore
from tierroute.ledger import Ledger
from tierroute.routers.base import BaseRouter

log = logging.getLogger(__name__)

_ERRORS = {
    400: "A bad request (OpenAI error object; `param` names the field)",
    401: "No or a wrong API key, when keys are configured",
    408: "The client sent its body too slowly",
    413: "The body is larger than `max_body_bytes`",
    415: "The body is not `application/json`",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": _ERRORS.get(s, "")} for s in statuses}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# One server-sent event (a schema for an event stream describes each event, before 3.2).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a chat.completion.chunk or an error object as JSON, or [DONE]",
        },
        "event": {"type": "string"},
    },
}
_BODY_ERRORS = (400, 401, 408, 413, 415)
_UPSTREAM: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorBody, "description": "No tier could answer"}
}


@dataclass
class Parts:
    """What the app is built from; built lazily in the lifespan when not passed in."""

    router: BaseRouter
    backends: Mapping[str, Backend]
    ledger: Ledger
    learned_dir: Path | None = None  # where the learner keeps its routers: by the ledger file

    def learned_folder(self) -> Path:
        if self.learned_dir is not None:
            return self.learned_dir
        if self.ledger.path is not None:
            return self.ledger.path.parent / "learned"
        from tierroute.paths import data_dir

        return data_dir() / "learned"  # the ledger is on PostgreSQL


MAX_COMMENT_CHARS = 4000
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _header_safe(text: str, limit: int = 400) -> str:
    """Text for a header value: latin-1, no control characters (a reason can hold a
    client's tenant name, and h11 refuses such a header after the answer was paid)."""
    latin = text.encode("latin-1", "replace").decode("latin-1")[:limit]
    return _CONTROL.sub(" ", latin)


def _decision_headers(
    routed: Routed,
    tier: str | None,
    tried: list[str],
    cost: float | None,
    request_id: str,
    cascade: str | None = None,
    notes: Sequence[str] = (),
) -> dict[str, str]:
    d = routed.decision
    reason = "; ".join([d.reason, *notes]) if notes else d.reason  # e.g. "large skipped: ..."
    headers = {
        "X-Tierroute-Tier": tier or d.tier.name,
        "X-Tierroute-Score": "" if d.score != d.score else f"{d.score:.4f}",
        "X-Tierroute-Reason": _header_safe(reason),
        "X-Tierroute-Fallback": ",".join(tried) if len(tried) > 1 else "",
        "X-Tierroute-Request-Id": request_id,
        "X-Tierroute-Cache": "hit" if routed.cache_hit else "miss",
    }
    if cost is not None:
        headers["X-Tierroute-Cost-Usd"] = f"{cost:.8f}"
    if cascade is not None:
        headers["X-Tierroute-Cascade"] = _header_safe(cascade)
    return headers


def _outcome_headers(outcome: Outcome, tier: str, cost: float | None) -> dict[str, str]:
    """The decision headers of an answered (or failed) request, with what happened on the
    way (tiers tried, skipped or failed, the cascade's note), and the model that answered
    in a tier of several (its key, tier/model)."""
    headers = _decision_headers(
        outcome.routed,
        tier,
        outcome.tried,
        cost,
        outcome.request_id,
        outcome.cascade,
        outcome.notes,
    )
    if "/" in outcome.booked_tier:  # tier names have no "/": a model of a tier of several
        headers["X-Tierroute-Model"] = outcome.booked_tier
    return headers


def _told(exc: Exception, tenant: bool) -> str:
    """What a client is told of the tiers' failure: all of it for the operator's keys (and
    an open gateway); for a virtual key, which tiers failed and their HTTP status, not the
    upstreams' own words, which can hold their URLs or an upstream's masked API key (its
    401 says "Incorrect API key provided: sk-...abcd"). The ledger row keeps the whole."""
    if not tenant:
        return str(exc)
    last = exc.last if isinstance(exc, AllTiersFailed) else exc
    tried = exc.tried if isinstance(exc, AllTiersFailed) else []
    status = getattr(last, "status", None)
    return (
        ("the tiers tried (" + ", ".join(tried) + ") failed" if tried else "the tier failed")
        + (f", the last with HTTP {status}" if status else "")
        + "; the gateway's operator finds why in its ledger under this request's id."
    )


def _tenant_or_key(call: ChatCall, key_id: str | None) -> ChatCall:
    """The tenant that personalisation learns for. With API keys, tenants belong to keys:
    `user` "alice" of key id K is tenant "K/alice", so no other key can rate answers as
    K's alice and move her routing; a request without a `user` is its key's own tenant.
    Without keys every caller is trusted and `user` is the tenant as sent."""
    if key_id is None:
        return call
    user = call.hints.tenant
    tenant = key_id if user is None else f"{key_id}/{user}"
    return replace(call, hints=replace(call.hints, tenant=tenant))


def create_app(
    settings: GatewaySettings,
    build: Callable[[GatewaySettings], Parts],
    metrics: Metrics | None = None,
) -> FastAPI:
    """The gateway app. `build` makes router, backends and ledger at start-up (in a thread,
    since local models take a while to load); they are closed again at shutdown."""
    state: dict[str, Engine] = {}
    auth: dict[str, Authoriser] = {}
    # `model` may name a tier by a model name its answers report (the smallest tier's
    # when two tiers serve one model; a tier of several models by any of them).
    aliases = {m.tier.model: s.name for s in reversed(settings.tiers) for m in (*s.models, s)}
    learners: dict[str, Learner] = {}
    # The local embedding model and its one worker thread, made on the first request.
    embedding: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts = await asyncio.to_thread(build, settings)
        engine = Engine(settings, parts.router, parts.backends, parts.ledger, metrics)
        engine.metrics.watch_ledger(parts.ledger.health)
        if settings.virtual_keys:
            auth["keys"] = Authoriser(
                KeyStore(parts.ledger),
                ttl_s=settings.key_cache_ttl_s,
                stale_s=settings.key_stale_s,
            )
        await attach_state(engine, auth["keys"].deny if "keys" in auth else None)
        state["engine"] = engine
        if settings.learning is not None:
            folder = parts.learned_folder()
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
            await detach_state(engine)
            engine.close()
            if engine.shadow is not None:
                await engine.shadow.aclose()
            for backend in parts.backends.values():
                await backend.aclose()
            if "pool" in embedding:
                embedding["pool"].shutdown(wait=True)
            # Rows it could not store are counted and logged by the ledger, not raised here.
            await parts.ledger.aclose(raise_failures=False)

    app = FastAPI(title="tierroute", version="0.1.0", lifespan=lifespan)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request bodies, which the handlers parse themselves
        (to give OpenAI-style errors) and so do not declare as parameters."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, FeedbackRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            chat = components["ChatCompletionRequest"]["properties"]
            chat["model"]["enum"] = ["auto", *(s.name for s in settings.tiers)]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def engine() -> Engine:
        return state["engine"]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        # A body left unread (too big, too slow) leaves nothing to reuse the connection for:
        # close it now rather than at the keep-alive timeout.
        unread = {"Connection": "close"} if exc.status in (408, 413) else {}
        headers = {**unread, **(exc.headers or {})} or None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(LedgerError)
    async def _ledger_error(request: Request, exc: LedgerError) -> JSONResponse:
        # a read the ledger could not answer (its PostgreSQL is unreachable): not the client's
        log.error("ledger read failed on %s: %s", request.url.path, exc)
        error = ApiError(
            503,
            "The gateway cannot read its ledger right now; retry shortly.",
            type="api_error",
            code="ledger_unavailable",
        )
        return JSONResponse(error.body(), status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(  # the headers carry Allow on a 405
            ApiError(exc.status_code, str(exc.detail), type=kind).body(),
            status_code=exc.status_code,
            headers=exc.headers,
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

    async def authorise(request: Request) -> str | None:
        """The caller's key id (a short hash), or 401 when keys are configured. A virtual
        key's policy is left on `request.state.caller` for the limits."""
        caller = await authenticate(
            settings, auth.get("keys"), request.headers.get("authorization", "")
        )
        request.state.caller = caller
        return caller.key_id

    async def admin(request: Request) -> None:
        """Authorise the caller, then refuse (403) any but the operator's keys."""
        await authorise(request)
        require_admin(request.state.caller)

    def tenant(request: Request) -> bool:
        """The caller holds a virtual key (a tenant's), not one of the operator's."""
        return getattr(request.state, "caller", None) is not None and not (
            request.state.caller.admin
        )

    def cache_scope(request: Request) -> str | None:
        """Whose decision cache entries the caller's requests may hit: its own key's (or
        key tenant's), so that no key learns what another asked; everyone's when the
        gateway is open."""
        caller: Caller = request.state.caller
        return caller.scope if caller.key_id is not None else None

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(
            413, f"The request body exceeds {limit} bytes.", code="request_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = b""
        try:
            # A client that trickles its body holds a connection: it gets client_timeout_s.
            async with asyncio.timeout(settings.client_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_big
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body did not arrive within {settings.client_timeout_s:g} s.",
                code="request_timeout",
            ) from None
        except ClientDisconnect:
            # The client hung up mid-body: nobody to answer, nothing worth a traceback.
            log.info("client disconnected while sending its request to %s", request.url.path)
            raise ApiError(499, "The client closed the connection.") from None
        return body

    async def read_json(request: Request) -> tuple[str | None, dict[str, Any]]:
        """The caller's key id and the body of a JSON endpoint. Only application/json is
        accepted, so that a browser cannot post here in a "simple" cross-origin request
        (text/plain, forms). The body is read before any refusal (401, 415, 400), so that
        the connection stays usable for the client's next request."""
        body = await read_body(request)
        key_id = await authorise(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415,
                "The request body must be sent as 'Content-Type: application/json'.",
                code="unsupported_media_type",
            )
        return key_id, parse_json(body)

    def headers_of(request: Request) -> dict[str, str]:
        return {k.lower(): v for k, v in request.headers.items()}

    async def paying(
        request: Request,
        parse: Callable[[dict[str, Any]], ChatCall],
        output_tokens: int | None = None,
        read: tuple[str | None, dict[str, Any]] | None = None,
    ) -> tuple[str | None, dict[str, Any], ChatCall, Ticket | None]:
        """The one way into an endpoint that spends money: the caller authorised, its
        body parsed (its tenant scoped to its key) and admitted under its key's limits
        and budget (a 429 otherwise). The ticket is settled when the request is booked
        (Engine.record), or given back by `routed_paid` / Engine.release when it is not.
        `read`: the caller and body when the endpoint has read them already."""
        key_id, doc = read or await read_json(request)
        ledger_writable()
        call = _tenant_or_key(parse(doc), request.state.caller.scope)
        policy = key_policy(settings, key_id, request.state)
        # The shared decision-cache read, started first, shares the limit check's round
        # trip to the shared store; `routed_paid` takes it up.
        if call.model == "auto":
            request.state.ahead = engine().look_ahead(call.request.messages, cache_scope(request))
        ticket = await gate(settings, engine().state, policy, call, output_tokens)
        return key_id, doc, call, ticket

    async def give_back(ticket: Ticket | None) -> None:
        if ticket is not None:  # refused before any tier was asked: nothing spent
            await settle(engine().state, ticket, 0, 0.0)

    async def routed_paid(request: Request, call: ChatCall, ticket: Ticket | None) -> Routed:
        """`_route` for an admitted call; a refusal there gives its reservation back."""
        try:
            pressure = ticket.pressure if ticket is not None else 0.0
            ahead = getattr(request.state, "ahead", None)
            return await _route(call, pressure, cache_scope(request), ahead)
        except ApiError:
            await give_back(ticket)
            raise

    def ledger_writable() -> None:
        """With `on_ledger_failure: refuse`, no answer while its row could not be written."""
        if settings.on_ledger_failure != "refuse":
            return
        health = engine().ledger.health()
        if not health.writable:
            raise ApiError(
                503,
                f"The gateway cannot record requests right now, so it answers none: "
                f"{health.problem}",
                type="api_error",
                code="ledger_unavailable",
            )

    @app.get(
        "/healthz",
        responses={
            200: {"description": "This replica answers requests (`status`: ok or degraded)"},
            503: {"description": "This replica refuses every request (`serving`: false)"},
        },
    )
    async def healthz() -> JSONResponse:
        """200 while this replica answers requests, degraded or not (the body says which
        and why); 503 only when it refuses every request, so that a load balancer moves
        traffic to a replica that can answer. Open breakers are every replica's outage
        (the tiers are shared): they show as degraded, not as 503, since a gateway taken
        out of rotation would turn its clear 502 into a load balancer's bare error."""
        e = engine()
        problems = e.health()
        ledger = e.ledger.health()
        if ledger.problem is not None:
            problems.append(f"ledger: {ledger.problem}")
        elif not ledger.ok:
            problems.append("ledger: degraded")
        # With on_ledger_failure: refuse, every request gets a 503 while rows cannot be written.
        serving = settings.on_ledger_failure != "refuse" or ledger.writable
        body: dict[str, Any] = {
            "status": "degraded" if problems else "ok",
            "serving": serving,
            "problems": problems,
            "tiers": {n: b.state for n, b in e.breakers.items()},  # and each model of a tier
            "ledger": {
                "writable": ledger.writable,
                "rows_spilled": ledger.rows_spilled,
                "rows_failed": ledger.rows_failed,
                "rows_dropped": ledger.rows_dropped,
            },
        }
        if ledger.problem is not None:
            body["reason"] = ledger.problem
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(401, 403))
    async def metrics_endpoint(request: Request) -> Response:
        # Per-key spend is no other key's business: the operator's keys, or a private scraper.
        if not settings.public_metrics:
            await admin(request)
        return Response(engine().metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> Response:
        from importlib import resources

        page = resources.files("tierroute.resources").joinpath("dashboard.html").read_text()
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/v1/dashboard/data", responses=_errors(400, 401, 403))
    async def dashboard_json(request: Request, since: str = "24h") -> JSONResponse:
        # The page itself holds no data; its numbers are the whole gateway's: the operator's.
        await admin(request)
        from tierroute.gateway.dashboard import dashboard_data
        from tierroute.ledger import parse_since

        try:
            start = parse_since(since)
        except LedgerError as exc:
            raise ApiError(400, str(exc), param="since") from None
        e = engine()
        # so the charts include the requests just answered; write failures go to /healthz
        await e.ledger.aflush(raise_failures=False)
        data = await asyncio.to_thread(dashboard_data, e.ledger, settings, start)
        return JSONResponse(data)

    @app.get("/v1/models", responses=_errors(401))
    async def models(request: Request) -> dict[str, Any]:
        await authorise(request)
        created = int(time.time())
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "tierroute"}]
        data += [
            {"id": s.name, "object": "model", "created": created, "owned_by": s.tier.model}
            for s in settings.tiers
        ]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/route",
        openapi_extra=_json_body(ChatCompletionRequest),
        responses={200: {"model": RouteDecision}, **_errors(*_BODY_ERRORS)},
    )
    async def route(request: Request) -> JSONResponse:
        _, doc = await read_json(request)
        call = parse_chat(
            doc,
            ["auto", *engine().tier_names],
            headers_of(request),
            settings.max_tokens_default,
            aliases,
        )
        call = _tenant_or_key(call, request.state.caller.scope)
        scope = cache_scope(request)
        # issued before the count, so both share one round trip to the shared store
        ahead = engine().look_ahead(call.request.messages, scope) if call.model == "auto" else None
        await side_gate(settings, engine().state, request.state.caller.policy)
        routed = await _route(call, scope=scope, ahead=ahead)
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

    async def _route(
        call: ChatCall,
        pressure: float = 0.0,
        scope: str | None = None,
        ahead: Lookahead | None = None,
    ) -> Routed:
        forced = None if call.model == "auto" else call.model
        max_tokens = call.request.limit or settings.max_tokens_default
        try:
            return await engine().route(
                call.request.messages, call.hints, max_tokens, forced, pressure, scope, ahead
            )
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    @app.post("/v1/router/rollback", responses=_errors(401, 403, 404, 409))
    async def rollback(request: Request) -> JSONResponse:
        """Serve the router before the continuous learner's last promotion again."""
        await admin(request)
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

    @app.post(
        "/v1/feedback",
        openapi_extra=_json_body(FeedbackRequest),
        responses={
            200: {"model": FeedbackRecorded},
            **_errors(*_BODY_ERRORS),
            404: {"model": ErrorBody, "description": "No such request (or another key's)"},
        },
    )
    async def feedback(request: Request) -> JSONResponse:
        """Rate an answer: {"request_id", "rating": 1 | 0 | a score in [0, 1], "comment"?}."""
        key_id, doc = await read_json(request)
        await side_gate(settings, engine().state, request.state.caller.policy)
        ledger_writable()
        request_id = doc.get("request_id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
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
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            # each rating is a ledger row: a key may not grow the ledger by the megabyte
            raise ApiError(
                400, f"'comment' must be at most {MAX_COMMENT_CHARS} characters.", param="comment"
            )
        owner = await engine().request_owner(request_id)
        # Another key's request is reported as unknown: its existence is not theirs to see.
        if owner is None or (key_id is not None and owner.api_key_id != key_id):
            raise ApiError(
                404,
                f"No request with id '{request_id}'.",
                type="not_found_error",
                param="request_id",
                code="request_not_found",
            )
        rater = key_id or ""
        engine().ledger.add_feedback(request_id, float(rating), comment, rater=rater)
        engine().feedback(owner, float(rating), (request_id, rater))
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
        tenant: bool = False,
    ) -> JSONResponse:
        """Record a request no tier could answer; return the error the client gets, with
        the tier headers of the tier that failed. `tenant`: the caller holds a virtual key,
        and is told which tiers failed but not their upstreams' words (see `_told`)."""
        status = 502 if isinstance(exc, AllTiersFailed) else (exc.status or 502)
        if status in (401, 403, 404):
            status = 502  # the tier's key or model is wrong, not the client's request
        if isinstance(exc, BackendError) and 400 <= status < 500:
            # The request's own mistake (a tier refused a parameter or a part): said as such.
            error = ApiError(status, str(exc), param=getattr(exc, "param", None))
        else:
            error = ApiError(
                status,
                f"No tier could answer: {_told(exc, tenant)}",
                type="api_error",
                code="upstream_error",
            )
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
        # The error body already names every tier's failure; the reason stays the decision's.
        headers = _decision_headers(
            outcome.routed,
            engine().settings.spec(outcome.booked_tier).name,
            outcome.tried,
            engine().spent_cost(outcome),
            outcome.request_id,
            outcome.cascade,
        )
        return JSONResponse(error.body(), status_code=status, headers=headers)

    async def passed_through(
        request: Request, path: str, read: tuple[str | None, dict[str, Any]] | None = None
    ) -> Response:
        """/v1/completions and /v1/embeddings (see gateway/passthrough.py)."""
        start = time.perf_counter()
        e = engine()
        models = ["auto", *e.tier_names]
        key_id, doc, call, ticket = await paying(
            request,
            lambda doc: passthrough.parse(doc, path, models, aliases, headers_of(request)),
            0 if path == passthrough.EMBEDDINGS else None,  # an embedding generates nothing
            read,
        )
        routed = await routed_paid(request, call, ticket)
        outcome = Outcome(
            request_id=new_request_id(), routed=passthrough.tagged(routed, path), ticket=ticket
        )
        try:
            passthrough.check_chain(outcome, e.backends, path)
        except ApiError:
            await give_back(ticket)
            raise
        prompt = routed.text if settings.keep_prompts else None
        try:
            data = await e.post(outcome, path, passthrough.body_for_tier(doc))
        except (AllTiersFailed, BackendError) as exc:
            return failed(
                outcome, call, key_id, start, prompt, exc, stream=False, tenant=tenant(request)
            )
        except asyncio.CancelledError:
            e.release(outcome)  # the client left: its reservation goes back
            raise
        tier = e.settings.spec(outcome.booked_tier).tier
        p, c = passthrough.usage(data)
        e.record(
            outcome,
            status=200,
            hints=call.hints,
            api_key_id=key_id,
            latency_ms=(time.perf_counter() - start) * 1000,
            prompt_tokens=p,
            completion_tokens=c,
            prompt_text=prompt,
        )
        body = passthrough.answer(data, outcome.request_id, tier.model)
        return JSONResponse(body, headers=_outcome_headers(outcome, tier.name, tier.cost(p, c)))

    @app.post("/v1/completions", responses={**_errors(*_BODY_ERRORS), **_UPSTREAM})
    async def completions(request: Request) -> Response:
        """A legacy text completion, routed like a chat request, from a remote tier."""
        return await passed_through(request, passthrough.COMPLETIONS)

    @app.post("/v1/embeddings", responses={**_errors(*_BODY_ERRORS), **_UPSTREAM})
    async def embeddings(request: Request) -> Response:
        """Embeddings from the local all-MiniLM-L6-v2 when `model` is one of
        `gateway.embedding_models`, else from the remote tier `model` names (never routed)."""
        start = time.perf_counter()
        key_id, doc = await read_json(request)
        model = doc.get("model")
        if not isinstance(model, str) or model not in settings.embedding_models:
            return await passed_through(request, passthrough.EMBEDDINGS, (key_id, doc))
        call = local_embeddings.parse(doc, model)

        def as_chat(doc: dict[str, Any]) -> ChatCall:  # what the key's limits count
            hints = hints_from(doc.get("metadata"), headers_of(request), doc.get("user"))
            text = "\n".join(call.texts or [])
            request_ = ChatRequest([{"role": "user", "content": text}])
            return ChatCall(model, request_, False, False, hints)

        key_id, doc, chat_call, ticket = await paying(request, as_chat, 0, (key_id, doc))
        e = engine()
        if "model" not in embedding:
            embedding["model"] = local_embeddings.shared_embedder(e.router)
            embedding["pool"] = ThreadPoolExecutor(1, thread_name_prefix="tierroute-embed")
        loop = asyncio.get_running_loop()
        try:
            vectors, tokens = await loop.run_in_executor(
                embedding["pool"], local_embeddings.embed, embedding["model"], call
            )
        except MissingDependencyError as exc:
            await give_back(ticket)
            raise ApiError(
                503,
                f"The local embedding model is not available here ({exc}).",
                type="api_error",
                code="embedding_model_missing",
            ) from None
        except BaseException:
            await give_back(ticket)
            raise
        if ticket is not None:
            await settle(e.state, ticket, tokens, 0.0)
        tenant = chat_call.hints.tenant
        request_id = f"embd-{uuid.uuid4().hex}"
        latency_ms = (time.perf_counter() - start) * 1000
        e.ledger.record(
            local_embeddings.ledger_row(
                request_id, e.clock(), model, tokens, latency_ms, key_id, tenant
            )
        )
        tier = local_embeddings.TIER
        e.metrics.requests.labels(tier, model, "200").inc()
        e.metrics.latency.labels(tier, model).observe(latency_ms / 1000)
        e.metrics.tokens.labels(tier, model, "prompt").inc(tokens)
        headers = {
            "X-Tierroute-Tier": tier,
            "X-Tierroute-Reason": f"'{model}' is the local embedding model",
            "X-Tierroute-Request-Id": request_id,
            "X-Tierroute-Cost-Usd": f"{0:.8f}",
        }
        return JSONResponse(local_embeddings.body(call, vectors, tokens), headers=headers)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_json_body(ChatCompletionRequest),
        responses={
            200: {
                "model": ChatCompletion,
                "description": "The answer; with `stream: true`, server-sent chunks",
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            },
            **_errors(*_BODY_ERRORS),
            **_UPSTREAM,
        },
    )
    async def chat(request: Request) -> Response:
        start = time.perf_counter()
        e = engine()
        key_id, _, call, ticket = await paying(
            request,
            lambda doc: parse_chat(
                doc,
                ["auto", *e.tier_names],
                headers_of(request),
                settings.max_tokens_default,
                aliases,
            ),
        )
        routed = await routed_paid(request, call, ticket)
        outcome = Outcome(request_id=new_request_id(), routed=routed, ticket=ticket)
        prompt = routed.text if settings.keep_prompts else None
        cascade = e.cascades(routed, forced=call.model != "auto")
        if call.stream:
            return await _stream(call, outcome, key_id, start, prompt, cascade, tenant(request))
        try:
            if cascade:
                result = await e.complete_cascade(outcome, call.request, call.hints)
            else:
                result = await e.complete(outcome, call.request)
        except (AllTiersFailed, BackendError) as exc:
            return failed(
                outcome, call, key_id, start, prompt, exc, stream=False, tenant=tenant(request)
            )
        except asyncio.CancelledError:
            e.release(outcome)  # the client left: its reservation goes back
            raise
        latency = (time.perf_counter() - start) * 1000
        tier = e.settings.spec(outcome.booked_tier).tier
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
            e.shadow.maybe_sample(outcome.request_id, call.request, tier.name, result.text, key_id)
        body = answer_body(outcome.request_id, tier.model, result)
        headers = _outcome_headers(outcome, tier.name, cost)
        return JSONResponse(body, headers=headers)

    async def _stream(
        call: ChatCall,
        outcome: Outcome,
        key_id: str | None,
        start: float,
        prompt: str | None,
        cascade: bool,
        tenant: bool = False,
    ) -> Response:
        e = engine()
        try:
            if cascade:
                first, rest = await e.open_cascade_stream(outcome, call.request, call.hints)
            else:
                first, rest = await e.open_stream(outcome, call.request)
        except (AllTiersFailed, BackendError) as exc:
            return failed(outcome, call, key_id, start, prompt, exc, stream=True, tenant=tenant)
        except asyncio.CancelledError:
            e.release(outcome)
            raise
        ttft = (time.perf_counter() - start) * 1000
        tier_name = outcome.booked_tier
        tier = e.settings.spec(tier_name).tier
        max_cost = tier.cost(
            estimate_tokens(outcome.routed.text),
            call.request.limit or settings.max_tokens_default,
        ) + e.spent_cost(outcome)
        headers = _outcome_headers(outcome, tier.name, max_cost)
        headers["X-Tierroute-Cost-Usd-Is"] = "upper-estimate"
        created = int(time.time())

        async def body() -> AsyncIterator[bytes]:
            status, error = 200, None
            usage = StreamDelta(text="", prompt_tokens=0, completion_tokens=0)
            tier_start = time.perf_counter()
            pieces: list[str] = []
            # A tier that streams OpenAI chunks has them forwarded (its role chunk too).
            finished = False  # a forwarded chunk carried the finish_reason
            try:
                if first.choices is None:
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
                    if delta.choices is not None:
                        yield sse(forwarded_chunk(outcome.request_id, tier.model, created, delta))
                        finished = finished or any(c.get("finish_reason") for c in delta.choices)
                    elif delta.text:
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
                        if not finished:
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
                            **usage_fields(usage.fields),
                            "id": outcome.request_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": tier.model,
                            "choices": [],
                            "usage": {
                                **usage.fields.get("usage", {}),
                                "prompt_tokens": p,
                                "completion_tokens": c,
                                "total_tokens": p + c,
                            },
                            "tierroute": {
                                "tier": tier.name,
                                "cost_usd": tier.cost(p, c) + e.spent_cost(outcome),
                            },
                        }
                    )
                yield sse("[DONE]")
                if e.shadow is not None:
                    e.shadow.maybe_sample(
                        outcome.request_id, call.request, tier.name, "".join(pieces), key_id
                    )
            except BackendError as exc:
                # Chunks already went out: we cannot switch tiers silently (see engine).
                status, error = 502, f"stream from tier {tier_name} broke: {exc}"
                told = f"stream from tier {tier_name} broke: {_told(exc, tenant)}"
                yield sse(ApiError(502, told, type="api_error", code="stream_broken").body())
            except (asyncio.CancelledError, GeneratorExit):
                status, error = 499, "client closed the stream"
                raise
            finally:
                if usage.finish_reason is None:
                    # Broken or abandoned: book the prompt and the part that went out.
                    usage = StreamDelta(
                        text="",
                        prompt_tokens=estimate_tokens(outcome.routed.text),
                        completion_tokens=estimate_tokens("".join(pieces)) if pieces else 0,
                    )
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

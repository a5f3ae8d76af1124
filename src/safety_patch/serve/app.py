"""OpenAI-compatible HTTP server for a base model and its safety-patch stacks (FastAPI).

Routes: ``POST /v1/chat/completions`` (JSON or ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /health``. The request's ``model`` names the unpatched ``base`` or
a patch stack; a gated patch routes each request as ``chat --patch`` does. Each answer says
how it was routed: the ``x-safety-patch-route`` header and a ``safety_patch`` object in the
body (in the first chunk when streaming), with every gate's logit, threshold and decision.

Differences from the OpenAI API, on purpose: an omitted ``temperature`` means greedy (as
``chat``); ``n`` must be 1; ``stop``, tools and logprobs are refused with a 400 rather than
silently ignored; the last message must be the user's. Every error is a JSON body in the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, never a traceback.

Backends: :class:`EmbeddedBackend` (the model in this process, micro-batched by
:mod:`.batcher`) and ``upstream.UpstreamBackend`` (gate here, answer from a vLLM server).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import SafetyPatchError, check_text, field_path
from ..generation import check_temperature
from .audit import AuditLog
from .batcher import Batcher, Job, QueueFull
from .engine import BASE, Engine, Route, Sampling

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-safety-patch-route"
MAX_BODY_BYTES = 4 * 1024 * 1024


VIA_HEADER = "x-safety-patch-via"
"""The servers a request passed through on its way here (their ids, comma-separated), sent on with
this server's id added when it asks an upstream. A request that reaches a server it already passed
through is a loop (``serve --upstream`` pointing back at itself, or at a server that points back):
answered 508 at once, where it would otherwise call itself until the upstream timeout (a user's
trial, 2026-12-05: 220 requests in 20 s from one). Chains of distinct servers pass; each app
(:func:`create_app`) has its own id, so two servers in one process are two servers."""
VIA: contextvars.ContextVar[str] = contextvars.ContextVar("safety_patch_via", default="")
"""The ``VIA_HEADER`` value a request's upstream call sends (set per request; tasks copy it)."""


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.route = None  # set where the request was routed before it failed (upstream mode): audited and in the header

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request schema


# strict: a JSON true is not max_tokens 1 nor "5" a 5 (pydantic's lax mode coerces both); OpenAI's API
# refuses them with a 400, and so does this server. An integer is still a valid float (temperature 0).
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request this server honours (a field outside it, UNSUPPORTED
    and IGNORED is refused in ``parse``; known ones must have their JSON type: no string or boolean read as
    a number)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    tools: list | None = None
    logprobs: bool | None = None
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


# OpenAI's request fields that change the answer or its form, which this server does not implement:
# a request setting one to anything but its neutral value gets a 400 (param named), never an answer
# that silently ignored it. Neutral values: what OpenAI does when the field is absent.
UNSUPPORTED: dict[str, tuple] = {
    "stop": (None, "", []), "tools": (None, []), "logprobs": (None, False), "top_logprobs": (None, 0),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "top_k": (None,), "min_p": (None,),
    "repetition_penalty": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "store": (None, False),
}
# Fields that do not change the answer, accepted and not acted on. Any other field (a misspelt one,
# or one of another API such as best_of, echo, suffix) is a 400 `unknown_parameter`: a request is
# never answered as if a field it set had been read.
IGNORED = frozenset({"metadata", "service_tier", "user"})


@dataclass
class ServeConfig:
    """Limits and options; every limit is checked before a request reaches the model."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_prompt_tokens: int | None = None  # None: only the model's context length bounds it
    audit_path: str | None = None
    log_prompts: bool = False


@dataclass
class Prepared:
    """A validated request: what the backend needs."""

    model: str
    messages: list[dict]
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool
    include_usage: bool
    views: list[list[int]] | None = None  # what the gates read, where the messages have a system prompt


SHUTTING_DOWN = "server shutting down"  # the error of an answer cut because the server stops


def _cut_reason(e: ApiError) -> dict:
    """The audit line's finish_reason of an answer the stopping server cut (503), as for one uvicorn cut,
    or of a client that left (499)."""
    return {"finish_reason": "cancelled"} if (e.status, e.message) == (503, SHUTTING_DOWN) or e.status == 499 else {}


def _plain_messages(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        # OpenAI's newer name for the system role; chat templates know only "system".
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _validation_message(e: ValidationError) -> tuple[str, str]:
    """(message, param) for the first error. A field of several accepted types (``content``: a string or a
    list of text parts) gets one error per type, each located under a tag naming the type
    (``content.str``, ``content.list[TextPart][0].type``): where every branch failed at the field
    itself, it is named with the types it accepts; where the input took one branch (a list) and failed
    inside it, that branch's error is given, located without the tag."""
    errs = e.errors()
    tags = ("str", "list[TextPart]")

    def untagged(loc: tuple) -> tuple:
        return tuple(x for x in loc if x not in tags)

    branch = [x for x in errs if any(t in x.get("loc", ()) for t in tags)]
    if branch:
        loc0 = tuple(branch[0]["loc"])
        at = loc0[:min(i for i, x in enumerate(loc0) if x in tags)]  # the field the union is at
        shallow = [x for x in branch if len(x["loc"]) == len(at) + 1]
        if len(shallow) == len(branch) > 1:  # every branch failed on the value itself: say what it may be
            where = field_path(at)
            names = [str(x["loc"][-1]) for x in branch]
            return f"{where}: must be one of {' | '.join(names)} (got {type(branch[0].get('input')).__name__})", where
        deep = [x for x in branch if len(x["loc"]) > len(at) + 1]  # the input's own branch, failed inside
        err = deep[0] if deep else branch[0]
        where = field_path(untagged(err["loc"]))
        return f"{where}: {err.get('msg', 'invalid value')}", where
    err = errs[0]
    where = field_path(tuple(err.get("loc", ())))
    if err.get("type") == "missing":
        missing = [field_path(tuple(x["loc"])) for x in errs if x.get("type") == "missing"
                   and tuple(x["loc"][:-1]) == tuple(err["loc"][:-1])]
        return f"missing required field{'s' * (len(missing) > 1)} {', '.join(missing)}", missing[0]
    return f"{where or 'body'}: {err.get('msg', 'invalid value')}", where


# ----------------------------------------------------------------------------- backends


class EmbeddedBackend:
    """The model in this process; requests go through the micro-batcher's worker thread."""

    def __init__(self, engine: Engine, batcher: Batcher):
        self.engine, self.batcher = engine, batcher

    @property
    def names(self) -> list[str]:
        return self.engine.names

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def describe(self, name: str) -> dict:
        return self.engine.describe(name)

    def prepare(self, messages: list[dict]) -> list[int]:
        return self.engine.encode(self.engine.render(messages))

    def views(self, messages: list[dict]) -> list[list[int]]:
        return self.engine.views(messages)

    def health(self) -> dict:
        b = self.batcher
        return {"mode": "embedded", "queued": b.queued, "running": b.running, "batches": b.batches,
                "max_batch": b.max_batch, "window_ms": round(b.window_s * 1000, 3)}

    async def events(self, p: Prepared, want_text: bool,
                     on_route: Callable[[Route], None] | None = None) -> AsyncIterator[tuple]:
        """Yields ("route", Route), ("text", answer so far) if ``want_text``, then ("done", text, finish, n_tokens).

        ``on_route`` (upstream mode's hook, see UpstreamBackend.events): here the route is the first
        event, known no earlier, so it is not called."""
        job = Job(p.model, p.prompt, p.max_tokens, p.sampling, asyncio.get_running_loop(), views=p.views)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", "rate_limit_error", code="queue_full") from None
        except RuntimeError as e:
            raise ApiError(503, str(e), "server_error") from None
        ids: list[int] = []
        finished = False
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "route":
                    yield ("route", value)
                elif kind == "token":
                    ids.append(value)
                    if want_text:
                        yield ("text", self.engine.decode(ids))
                elif kind == "done":
                    finished = True
                    yield ("done", self.engine.decode(value.tokens).strip(), value.finish_reason, len(value.tokens))
                    return
                else:  # ("error", why) or ("error", (status, why)): a server stopping answers 503
                    finished = True
                    status, why = value if isinstance(value, tuple) else (500, value)
                    raise ApiError(status, str(why), "server_error")
        finally:
            if not finished:  # the client went away (or the consumer stopped): free the batch row
                job.cancel()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    def cut_in_flight(self) -> None:
        """Answer every request in flight with 503 "server shutting down" (``serve``'s grace period ends)."""
        self.batcher.cut_all(503, SHUTTING_DOWN)


class _Deltas:
    """Turns successive full texts into stream deltas whose concatenation is the final ``text.strip()``.

    Leading whitespace is dropped, trailing whitespace and a trailing U+FFFD (half a UTF-8
    character) are held back until more text follows, as ``chat`` strips its answer.
    """

    def __init__(self):
        self.sent = ""

    def update(self, full: str, final: bool = False) -> str:
        text = full.strip() if final else full.lstrip().rstrip()
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ----------------------------------------------------------------------------- the app


def _error(e: ApiError, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(backend, config: ServeConfig = ServeConfig(), audit: AuditLog | None = None):
    """The FastAPI application over ``backend`` (embedded or upstream)."""
    server_id = uuid.uuid4().hex[:16]  # this app's id in VIA_HEADER
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    audit = audit or AuditLog(config.audit_path, config.log_prompts)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await backend.aclose()
        audit.close()

    app = FastAPI(title="safety-patch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend, app.state.audit, app.state.config = backend, audit, config
    app.state.stopping = False  # set when the server is asked to stop (serve): cut answers are not the client's doing

    def cut() -> tuple[int, str]:
        """The status and error an answer cut short is audited with."""
        return (503, SHUTTING_DOWN) if app.state.stopping else (499, "client disconnected")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = field_path(err.get("loc", ()))
        return _error(ApiError(400, f"{loc or 'request'}: {err.get('msg', 'invalid request')}"))

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.exception("internal error")
        return _error(ApiError(500, f"internal error ({type(exc).__name__})", "server_error"))

    @app.get("/health")
    async def health():
        h = backend.health()
        # upstream mode: the gates run here, the answers there; a server whose upstream failed is not "ok"
        return {"status": "degraded" if h.get("upstream_ok") is False else "ok", "models": backend.names, **h}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": started, "owned_by": "safety-patch",
                                            "safety_patch": backend.describe(n)} for n in backend.names]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name not in backend.names:
            raise ApiError(404, f"the model {name!r} does not exist; served: {', '.join(backend.names)}",
                           param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": started, "owned_by": "safety-patch",
                "safety_patch": backend.describe(name)}

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc)

    async def parse(request: Request, rec: dict) -> Prepared:
        from starlette.requests import ClientDisconnect

        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its body arrived: a 499 like any client that leaves, not a 500
            status, why = cut()
            raise ApiError(status, why, code="client_disconnected") from None
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        from ..jsonl import _no_duplicate_keys

        try:
            # a repeated key is refused, not read as its last value: a proxy or filter in front that reads
            # the first `model` would see another request than the one answered (as the data loader refuses)
            obj = json.loads(body, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        if isinstance(obj.get("model"), str):  # the audit line of a rejected request still says which model
            rec["model"] = obj["model"][:200]
        try:
            req = ChatRequest.model_validate(obj)
        except ValidationError as e:
            msg, loc = _validation_message(e)
            raise ApiError(400, msg, param=loc or None) from None
        if req.model not in backend.names:
            raise ApiError(404, f"the model {req.model!r} does not exist; served: {', '.join(backend.names)}",
                           param="model", code="model_not_found")
        unknown = sorted(set(obj) - set(ChatRequest.model_fields) - set(UNSUPPORTED) - IGNORED)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} in the request; this server reads the fields of "
                                "OpenAI's chat-completions API", param=unknown[0], code="unknown_parameter")
        for name, neutral in UNSUPPORTED.items():
            if name in obj and obj[name] not in neutral:
                raise ApiError(400, f"{name} is not supported by this server (got {json.dumps(obj[name])[:80]})",
                               param=name, code="unsupported_parameter")
        if req.stream_options is not None:
            if not req.stream:
                raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
            try:
                StreamOptions.model_validate(req.stream_options)
            except ValidationError as e:
                msg, loc = _validation_message(e)
                raise ApiError(400, f"stream_options.{msg}", param=f"stream_options.{loc}" if loc else None) from None
        for i, m in enumerate(req.messages):
            for j, text in enumerate([m.content] if isinstance(m.content, str) else [p.text for p in m.content]):
                where = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}].text")
                try:
                    check_text(text, where)
                except SafetyPatchError as e:
                    raise ApiError(400, str(e), param=where, code="invalid_messages") from None
        if req.temperature is not None:
            try:
                check_temperature(req.temperature)
            except SafetyPatchError as e:
                raise ApiError(400, str(e), param="temperature") from None
        if req.messages[-1].role != "user":
            raise ApiError(400, "the last message must have role 'user'", param="messages", code="invalid_messages")
        messages = _plain_messages(req)
        try:
            prompt = await asyncio.to_thread(backend.prepare, messages)
        except SafetyPatchError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_messages") from None
        n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n = config.default_max_tokens if n is None else n
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if n <= 0:
            raise ApiError(400, f"{param} must be at least 1 (got {n})", param=param)
        if n > config.max_tokens_limit:
            raise ApiError(400, f"{param} is {n}, over this server's limit of {config.max_tokens_limit}", param=param)
        if config.max_prompt_tokens is not None and len(prompt) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, over this server's limit of "
                                f"{config.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        if len(prompt) + n > backend.max_context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and {param} is {n}: over the model's context "
                                f"length of {backend.max_context} tokens", param="messages", code="context_length_exceeded")
        t = req.temperature or 0.0
        # an unseeded sampled request draws a fresh seed, as OpenAI's API samples anew; the audit
        # log records it, so any sampled answer can be reproduced
        seed = (secrets.randbits(63) if req.seed is None else req.seed) if t > 0 else 0
        sampling = Sampling(t, req.top_p if (t > 0 and req.top_p is not None) else 1.0, seed)
        opts = req.stream_options or {}
        # a system prompt is read by the gates with and without it (generation.gate_views): it can add
        # routing to the refusal adapter, never remove it
        views = await asyncio.to_thread(backend.views, messages) if any(m["role"] == "system" for m in messages) else None
        return Prepared(req.model, messages, prompt, n, sampling, bool(req.stream), bool(opts.get("include_usage")), views)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        rec: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "id": rid}

        def finish(status: int, **fields) -> None:
            rec.update(status=status, latency_s=round(time.monotonic() - t0, 4), **fields)
            audit.write(rec)

        try:
            return await answer(request, rec, rid, created, finish)
        except asyncio.CancelledError:  # the server stopping past its grace period (or the client gone)
            if "status" not in rec:
                status, why = cut()
                finish(status, finish_reason="cancelled", error=why)
            raise
        except Exception as exc:  # a bug: answered as the handler below answers it, and audited too
            if "status" in rec:  # already audited (a stream that failed after its first chunk)
                raise
            log.exception("internal error")
            e = ApiError(500, f"internal error ({type(exc).__name__})", "server_error")
            finish(e.status, error=e.message)
            return _error(e)

    async def answer(request: Request, rec: dict, rid: str, created: int, finish):
        via = [v.strip() for v in request.headers.get(VIA_HEADER, "").split(",") if v.strip()]
        if server_id in via:
            e = ApiError(508, "loop detected: this request already passed through this server (its --upstream leads "
                              "back to it); point --upstream at the engine that answers (e.g. vLLM)", "upstream_error",
                         code="loop_detected")
            finish(e.status, error=e.message)
            return _error(e)
        VIA.set(",".join([*via, server_id]))  # what this request's upstream call (a task copying this context) sends
        try:
            p = await parse(request, rec)
        except ApiError as e:
            finish(e.status, error=e.message, **_cut_reason(e))
            return _error(e)
        rec.update(model=p.model, stream=p.stream, prompt_tokens=len(p.prompt), max_tokens=p.max_tokens,
                   messages=p.messages, **({"temperature": p.sampling.temperature, "top_p": p.sampling.top_p,
                                             "seed": p.sampling.seed} if p.sampling.temperature > 0 else {}))
        known: list[Route] = []  # the route as soon as the gate has run, before the first event (upstream mode)
        events = backend.events(p, want_text=p.stream, on_route=known.append)
        first = asyncio.ensure_future(anext(events))
        try:
            # watched like an answer: in upstream mode the first event waits for the upstream's status line,
            # and a client that leaves meanwhile is a 499 now, not whenever the upstream gives up
            while not first.done():
                done, _ = await asyncio.wait({first}, timeout=0.25)
                if not done and await request.is_disconnected():
                    first.cancel()
                    with _suppress():
                        await first
                    status, why = cut()  # the gate may have run (upstream mode): say where it sent the request
                    finish(status, finish_reason="cancelled", error=why, **(route_fields(known[0]) if known else {}))
                    return JSONResponse({}, status_code=499)
            kind, route = first.result()
        except ApiError as e:  # refused, or cut at shutdown while queued (cancelled, as once routed)
            await events.aclose()
            routed = {ROUTE_HEADER: e.route.header()} if e.route is not None else None
            finish(e.status, error=e.message, **_cut_reason(e), **(route_fields(e.route) if routed else {}))
            return _error(e, routed)
        finally:
            if not first.done():
                first.cancel()
        assert kind == "route"
        rec.update(route_fields(route))
        headers = {ROUTE_HEADER: route.header()}
        if not p.stream:
            return await complete(request, p, events, route, rid, created, headers, rec, finish)
        return StreamingResponse(sse(p, events, route, rid, created, rec, finish), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    def route_fields(route: Route) -> dict:
        d = route.as_dict()
        return {"decision": d["decision"], "gates": d["gates"], "active_patches": d["active_patches"],
                "active_patch_ids": d["active_patch_ids"]}

    async def complete(request, p: Prepared, events, route: Route, rid, created, headers, rec, finish):
        result: dict = {}

        async def collect():
            async for ev in events:
                if ev[0] == "done":
                    result.update(text=ev[1], finish=ev[2], tokens=ev[3])

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    with _suppress():
                        await task
                    status, why = cut()  # completion_tokens left out: the collector never counted them
                    finish(status, finish_reason="cancelled", error=why)
                    return JSONResponse({}, status_code=499)
            task.result()
        except ApiError as e:
            finish(e.status, error=e.message, **_cut_reason(e))
            return _error(e, headers)
        finally:
            if not task.done():
                task.cancel()
        usage = {"prompt_tokens": len(p.prompt), "completion_tokens": result["tokens"],
                 "total_tokens": len(p.prompt) + result["tokens"]}
        finish(200, finish_reason=result["finish"], completion_tokens=result["tokens"], completion=result["text"])
        body = {"id": rid, "object": "chat.completion", "created": created, "model": p.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish"], "logprobs": None}],
                "usage": usage, "safety_patch": route.as_dict()}
        return JSONResponse(body, headers=headers)

    async def sse(p: Prepared, events, route: Route, rid, created, rec, finish):
        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": p.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        deltas = _Deltas()
        n_tokens, ended = 0, False
        try:
            yield chunk({"role": "assistant", "content": ""}, safety_patch=route.as_dict())
            async for ev in events:
                if ev[0] == "text":
                    n_tokens += 1
                    d = deltas.update(ev[1])
                    if d:
                        yield chunk({"content": d})
                elif ev[0] == "done":
                    _, text, reason, n_tokens = ev
                    d = deltas.update(text, final=True)
                    if d:
                        yield chunk({"content": d})
                    yield chunk({}, reason)
                    if p.include_usage:
                        usage = {"prompt_tokens": len(p.prompt), "completion_tokens": n_tokens,
                                 "total_tokens": len(p.prompt) + n_tokens}
                        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": p.model,
                             "choices": [], "usage": usage}
                        yield f"data: {json.dumps(c)}\n\n"
                    yield "data: [DONE]\n\n"
                    ended = True
                    finish(200, finish_reason=reason, completion_tokens=n_tokens, completion=text)
        except ApiError as e:
            ended = True
            finish(e.status, error=e.message, completion_tokens=n_tokens, **_cut_reason(e))
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as exc:  # a bug mid-stream: the status line has gone, so an error event, audited
            ended = True
            log.exception("internal error")
            e = ApiError(500, f"internal error ({type(exc).__name__})", "server_error")
            finish(e.status, error=e.message, completion_tokens=n_tokens)
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            if not ended:  # the client went away, or the server is stopping (the events generator cancels the job)
                await events.aclose()
                status, why = cut()
                finish(status, finish_reason="cancelled", completion_tokens=n_tokens, error=why)

    return app


class _suppress:
    """``contextlib.suppress`` for the exceptions a cancelled collector may end with."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (asyncio.CancelledError, ApiError))


# ----------------------------------------------------------------------------- running it


def build_embedded(model: str, stacks: dict[str, list[str]], device: str = "auto", dtype: str = "auto",
                   force: bool = False, window_ms: float = 15.0, max_batch: int = 16, max_queue: int = 1024):
    """Load the base and stacks and start the batcher; returns an EmbeddedBackend. Raises SafetyPatchError."""
    engine = Engine.load(model, stacks, device, dtype, force)
    return EmbeddedBackend(engine, Batcher(engine, window_ms / 1000.0, max_batch, max_queue).start())


def parse_stacks(patches: list[str] | None, stacks: list[str] | None) -> dict[str, list[str]]:
    """Model names for ``--patch P`` (the folder's name as given, links not followed:
    ``patches.folder_name``, the name its routes carry) and ``--stack NAME=P1,P2``; raises SafetyPatchError."""
    from ..patches import folder_name

    out: dict[str, list[str]] = {}

    def add(name: str, paths: list[str], flag: str) -> None:
        if not name or name == BASE or name in out or any(c.isspace() or c == "/" for c in name):
            why = "reserved" if name == BASE else "already used" if name in out else "not a valid name"
            raise SafetyPatchError(f"{flag}: model name {name!r} is {why}")
        out[name] = paths

    for p in patches or []:
        add(folder_name(str(p)), [str(p)], f"--patch {p}")
    for s in stacks or []:
        name, sep, rest = s.partition("=")
        paths = [x for x in rest.split(",") if x.strip()]
        if not sep or not paths:
            raise SafetyPatchError(f"--stack {s!r}: expected NAME=PATCH[,PATCH...]")
        add(name.strip(), [x.strip() for x in paths], f"--stack {s}")
    return out


def bind(host: str, port: int):
    """A socket bound to host:port (before the model loads: a busy port is one line, exit code 2).

    Raises SafetyPatchError if the address cannot be bound."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise SafetyPatchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(backend, host: str, port: int, config: ServeConfig, sock=None, shutdown_timeout: float = 30.0) -> None:
    """Run the server until SIGINT or SIGTERM (uvicorn); ``sock`` an already bound socket (tests).

    Either signal is the normal way to stop a service (``docker stop`` and systemd send SIGTERM): no
    new connection is accepted, answers in flight get up to ``shutdown_timeout`` seconds to finish,
    those still running then are cut and audited as 503 "server shutting down" (not as a client
    that went away), and the call returns, so the command ends with its summary line and exit 0.
    A second SIGINT stops at once."""
    sock = sock if sock is not None else bind(host, port)
    server = make_server(create_app(backend, config), host, port, shutdown_timeout)
    server.run(sockets=[sock])


def make_server(app, host: str, port: int, shutdown_timeout: float):
    """A uvicorn server for ``app`` (from ``create_app``) that stops on a signal as ``serve`` says: the
    app learns that it is stopping (answers cut then are audited as 503), and the caught signal is
    not raised again after the shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not app.state.stopping:
                # shortly before the grace period ends, answers still running are cut by the app itself,
                # as 503 in the OpenAI error shape (a stream gets an error event), not left to uvicorn's
                # bare "Internal Server Error" for the connections it cancels
                cut = getattr(app.state.backend, "cut_in_flight", None)
                if cut is not None:
                    t = threading.Timer(max(0.0, shutdown_timeout - min(1.0, shutdown_timeout / 2)), cut)
                    t.daemon = True
                    t.start()
            app.state.stopping = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # uvicorn raises the caught signal again once it has shut down, which kills the
                # process (exit 143 for SIGTERM) or raises KeyboardInterrupt: the stop was asked for
                self._captured_signals.clear()

    logging.getLogger("uvicorn.error").addFilter(_CutAtShutdown(app))
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 timeout_graceful_shutdown=shutdown_timeout))


class _CutAtShutdown(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" traceback for an answer cut because the server
    is stopping: uvicorn has already said how many it cut, and the audit log has each one."""

    def __init__(self, app):
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (self.app.state.stopping and isinstance(exc, asyncio.CancelledError))

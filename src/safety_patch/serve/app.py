"""OpenAI-compatible HTTP server for a base model and its safety-patch stacks (FastAPI).

Routes: ``POST /v1/chat/completions`` (JSON or ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /health``. The request's ``model`` names the unpatched ``base`` or
a patch stack; a gated patch routes each request as ``chat --patch`` does. Each answer says
how it was routed: the ``x-safety-patch-route`` header and a ``safety_patch`` object in the
body (in the first chunk when streaming), with every gate's logit, threshold and decision.

The request schema and its differences from the OpenAI API: :mod:`.protocol`. Backends:
:class:`.embedded.EmbeddedBackend` (the model in this process) and
:class:`.upstream.UpstreamBackend` (gate here, answer from a vLLM server). Running it:
:mod:`.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from ..errors import SafetyPatchError, check_text, field_path
from ..generation import check_temperature
from .audit import AuditLog
from .engine import Route, Sampling
from .protocol import (
    IGNORED,
    MAX_BODY_BYTES,
    ROUTE_HEADER,
    SHUTTING_DOWN,
    UNSUPPORTED,
    VIA,
    VIA_HEADER,
    ApiError,
    ChatRequest,
    Prepared,
    ServeConfig,
    StreamOptions,
    cut_reason,
    plain_messages,
    validation_message,
)

log = logging.getLogger(__name__)



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
            msg, loc = validation_message(e)
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
                msg, loc = validation_message(e)
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
        messages = plain_messages(req)
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
            finish(e.status, error=e.message, **cut_reason(e))
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
            finish(e.status, error=e.message, **cut_reason(e), **(route_fields(e.route) if routed else {}))
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
            finish(e.status, error=e.message, **cut_reason(e))
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
            finish(e.status, error=e.message, completion_tokens=n_tokens, **cut_reason(e))
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


"""Upstream mode: the gate runs here, the answer comes from an OpenAI-compatible engine (vLLM).

The upstream serves the base and each patch as a LoRA module named like the stack here::

    vllm serve BASE --enable-lora --max-lora-rank 64 --lora-modules safety=patches/safety

For a request to model ``safety`` this server renders the chat with the base's template,
reads the patch's gate on a copy of the base truncated after the gate's layer
(:class:`~.engine.GateProbe`), and forwards the request to the upstream's LoRA module
``safety`` if the gate fires, else to the upstream base; ``base`` always goes to the
upstream base. Answers are streamed back (the upstream is always asked to stream), stripped
like ``chat``'s, with the route header, body field and audit line of embedded mode.

Failures of the upstream (unreachable, non-200, malformed stream, no finish) are answered
502 in the OpenAI error shape; a request is never answered by the base when its gate fired.
When the server stops (``serve``'s grace period ends), the answers still being relayed are cut
by :meth:`UpstreamBackend.cut_in_flight` as 503 "server shutting down", a JSON error or a
stream's error event, as in embedded mode (not uvicorn's bare 500 for a cancelled handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import httpx

from .engine import BASE, GateProbe, Route, upstream_patches
from .protocol import SHUTTING_DOWN, VIA, VIA_HEADER, ApiError, Prepared


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


CONNECT_TIMEOUT_S = 10.0  # how long the upstream gets to accept the connection (--upstream-timeout is for answers)


class UpstreamBackend:
    """Backend for ``serve --upstream URL`` (see the module docstring)."""

    def __init__(self, probe: GateProbe, url: str, upstream_model: str, timeout_s: float = 600.0):
        self.probe, self.url, self.upstream_model = probe, _api_base(url), upstream_model
        self.timeout_s = timeout_s
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, learnt from the first request
        self._cut = asyncio.Event()  # set (on that loop) when the server cuts the answers in flight
        self.last_error: str | None = None  # why the last request got no answer started upstream (health)

    def cut_in_flight(self) -> None:
        """Answer every request being relayed with 503 "server shutting down" (``serve``'s grace
        period ends). Called from another thread (a timer); requests after it are refused the same way."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cut.set)

    async def _or_cut(self, aw):
        """The result of awaitable ``aw``, unless the server cuts answers first (then ApiError 503 and
        ``aw`` is cancelled). A race of two tasks rather than a cancellation of the request's own task,
        whose CancelledError would end the response without an answer."""
        if self._cut.is_set():
            raise ApiError(503, SHUTTING_DOWN, "server_error")
        task, cut = asyncio.ensure_future(aw), asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not task.done():
                task.cancel()  # takes effect at the task's next step: it is not done yet
        if task not in done:
            raise ApiError(503, SHUTTING_DOWN, "server_error")
        return task.result()

    @property
    def names(self) -> list[str]:
        return self.probe.names

    @property
    def max_context(self) -> int:
        return self.probe.max_context

    def target(self, name: str, patched: bool) -> str:
        """The upstream model name a request goes to: the LoRA module ``name`` or the base."""
        return name if (patched and name != BASE) else self.upstream_model

    def describe(self, name: str) -> dict:
        p = self.probe.patches.get(name)
        return {"patches": [str(p.path)] if p else [], "patch_ids": [p.id] if p else [],
                "gated": name in self.probe.gates, "base": self.probe.name,
                "upstream": self.url, "upstream_models": sorted({self.target(name, False), self.target(name, True)})}

    def prepare(self, messages: list[dict]) -> list[int]:
        return self.probe.encode(self.probe.render(messages))

    def views(self, messages: list[dict]) -> list[list[int]]:
        return self.probe.views(messages)

    def health(self) -> dict:
        """``upstream_ok`` false, with ``upstream_error``, when the last request could not get an answer
        started upstream (unreachable, or an error status): `/health` then says ``degraded``."""
        return {"mode": "upstream", "upstream": self.url, "gate_layers_loaded": self.probe.layers_loaded,
                "layers_total": self.probe.layers_total, "upstream_ok": self.last_error is None,
                **({"upstream_error": self.last_error} if self.last_error else {})}

    async def events(self, p: Prepared, want_text: bool,
                     on_route: Callable[[Route], None] | None = None) -> AsyncIterator[tuple]:
        """Yields ("route", Route), ("text", answer so far) if ``want_text``, then ("done", text, finish, n_tokens).

        ``on_route(route)`` is called as soon as the gate has run, before the upstream is asked: a client
        that leaves while the upstream has not answered yet is audited with the route (the route event
        itself waits for the upstream's first stream event).

        The upstream answers its status line before the route is yielded, so an upstream that cannot be
        reached or refuses the request is a 502 for a streamed request too (nothing has been sent yet);
        so is one that answers 200 without a stream event (the route waits for the first event); only a
        failure after that becomes the stream's error event."""
        if self._loop is not asyncio.get_running_loop():  # an asyncio.Event belongs to the loop it first waits on
            self._loop, self._cut = asyncio.get_running_loop(), asyncio.Event()
        route = (await asyncio.to_thread(self.probe.read, p.model, [p.prompt], [p.views] if p.views else None))[0]
        if on_route is not None:
            on_route(route)
        target = self.target(p.model, bool(route.active))
        body = {"model": target, "messages": p.messages, "max_tokens": p.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": p.sampling.temperature}
        if p.sampling.temperature > 0:
            body.update(top_p=p.sampling.top_p, seed=p.sampling.seed)
        text, finish, n_tokens, chunks = "", None, None, 0
        async with contextlib.AsyncExitStack() as stack:
            try:
                r = await self._or_cut(self.client.send(self.client.build_request(
                    "POST", "/chat/completions", json=body, headers={VIA_HEADER: VIA.get()} if VIA.get() else None), stream=True))
                stack.push_async_callback(r.aclose)
                if r.status_code != 200:
                    raw = (await r.aread()).decode("utf-8", "replace")
                    try:
                        why = json.loads(raw)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        why = raw[:200]
                    raise ApiError(502, f"upstream {self.url} answered {r.status_code} for model {target!r}: {why}",
                                   "upstream_error", code="upstream_error")
                # Wait for the first stream event before the route goes out: the route starts the client's
                # 200, and a 200 that is no stream at all (an HTML page, `{}`) must be a 502, as the audit says.
                lines = r.aiter_lines()
                first = await self._next_event(lines)
                if first is None:
                    content_type = r.headers.get("content-type", "")
                    raise ApiError(502, f"upstream {self.url} answered 200 but sent no stream events (content-type "
                                        f"{content_type or 'none'!r}); it must speak OpenAI's streaming chat completions",
                                   "upstream_error", code="upstream_error")
            except httpx.HTTPError as e:
                self.last_error = f"cannot reach upstream: {self._why(e)}"
                err = ApiError(502, f"cannot reach upstream {self.url}: {self._why(e)}", "upstream_error",
                               code="upstream_error")
                err.route = route  # the gate ran: the audit line and the header say where it sent the request
                raise err from None
            except ApiError as e:
                if e.status == 502:  # not a cut at shutdown (503)
                    self.last_error = e.message
                e.route = route
                raise
            self.last_error = None
            yield ("route", route)
            line = first
            try:
                while line is not None:
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise ApiError(502, f"upstream {self.url} sent a malformed stream event", "upstream_error",
                                       code="upstream_error") from None
                    if "error" in chunk:
                        raise ApiError(502, f"upstream {self.url} failed: {chunk['error']}", "upstream_error",
                                       code="upstream_error")
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            text += piece
                            chunks += 1
                            if want_text:
                                yield ("text", text)
                        finish = choice.get("finish_reason") or finish
                    if chunk.get("usage"):
                        n_tokens = chunk["usage"].get("completion_tokens")
                    line = await self._next_event(lines)
            except httpx.HTTPError as e:
                raise ApiError(502, f"upstream {self.url} failed mid-answer: {self._why(e)}", "upstream_error",
                               code="upstream_error") from None
        if finish is None:
            raise ApiError(502, f"upstream {self.url} ended the answer without a finish_reason", "upstream_error",
                           code="upstream_error")
        yield ("done", text.strip(), finish, n_tokens if n_tokens is not None else chunks)

    async def _next_event(self, lines) -> str | None:
        """The next ``data:`` line of the SSE stream ``lines`` (comments and blank lines skipped), or None at its
        end; raises ApiError 503 when the server cuts answers meanwhile, httpx.HTTPError as the stream does."""
        while True:
            try:
                line = await self._or_cut(anext(lines))
            except StopAsyncIteration:
                return None
            if line.startswith("data:"):
                return line

    def _why(self, e: httpx.HTTPError) -> str:
        if isinstance(e, httpx.TimeoutException):  # a bare "ReadTimeout: " says neither what nor how long
            phase = f"connect within {CONNECT_TIMEOUT_S:g} s" if isinstance(e, httpx.ConnectTimeout) else \
                f"answer within --upstream-timeout {self.timeout_s:g} s"
            return f"it did not {phase} ({type(e).__name__})"
        return f"{type(e).__name__}: {e}"

    async def aclose(self) -> None:
        await self.client.aclose()


STARTUP_CHECK_TIMEOUT_S = 5.0


def check_upstream(url: str, upstream_model: str, names, timeout: float = STARTUP_CHECK_TIMEOUT_S) -> str | None:
    """Check ``--upstream`` before the gate model loads. Found by a user's trial: ``--upstream notaurl``
    started and said ``ok`` until the first request, and ``--model default`` sent every request upstream
    as model "default", a name vLLM does not serve.

    Raises SafetyPatchError when ``url`` is not an http(s) URL with a host, and when the upstream
    answers ``GET /v1/models`` without the base (``upstream_model``) or without a LoRA module for each
    served name in ``names`` (every request there would be a 502). Returns why the upstream could not
    be checked (unreachable, an error status, not an OpenAI model list), or None: an upstream that is
    not up yet is no reason to refuse to start (the engine may start after the gate); its requests
    are 502s and ``/health`` says ``degraded`` until one gets an answer started."""
    from ..errors import SafetyPatchError

    example = "e.g. http://127.0.0.1:8001/v1"
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise SafetyPatchError(f"--upstream {url!r} is not a URL ({e}; {example})") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise SafetyPatchError(f"--upstream {url!r} is not an http(s) URL with a host ({example})")
    base = _api_base(url)
    try:
        r = httpx.get(base + "/models", timeout=timeout)
    except httpx.HTTPError as e:
        return f"not reachable at start-up: {type(e).__name__}: {e}"
    if r.status_code != 200:
        return f"answered {r.status_code} to GET {base}/models at start-up"
    try:
        served = {m["id"] for m in r.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return f"GET {base}/models did not answer an OpenAI model list; the served names were not checked"
    missing = []
    if upstream_model not in served:
        missing.append(f"the base {upstream_model!r} (--upstream-model: the name the engine serves the base under, "
                       "`vllm serve` BASE or its --served-model-name)")
    missing += [f"a LoRA module {n!r} (`vllm serve BASE --enable-lora --lora-modules {n}=PATCH_FOLDER`)"
                for n in sorted(set(names)) if n != BASE and n not in served]
    if missing:
        raise SafetyPatchError(f"upstream {base} serves {sorted(served)}, without " + "; ".join(missing))
    return None


def build_upstream(model: str, stacks: dict[str, list[str]], url: str, upstream_model: str, device: str = "auto",
                   dtype: str = "auto", force: bool = False, timeout_s: float = 600.0,
                   on_warning: Callable[[str], None] | None = None) -> UpstreamBackend:
    """Check ``url`` (:func:`check_upstream`), load the truncated gate model(s) and point at it; raises
    SafetyPatchError. ``on_warning(line)``: told when the upstream could not be checked at start-up."""
    patches = upstream_patches(stacks)  # what can be served at all, before asking the upstream for it
    unchecked = check_upstream(url, upstream_model, stacks)
    backend = UpstreamBackend(GateProbe(model, stacks, device, dtype, force, patches), url, upstream_model, timeout_s)
    if unchecked:
        backend.last_error = unchecked  # /health says degraded until a request gets an answer started
        if on_warning is not None:
            on_warning(f"upstream {backend.url} {unchecked}; its requests are answered 502 until it answers")
    return backend

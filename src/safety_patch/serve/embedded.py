"""The embedded backend of ``serve``: the base model and its patch stacks in this process, requests
micro-batched by :mod:`.batcher` (the other backend, ``upstream.UpstreamBackend``, gates here and
answers from a vLLM server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from ..errors import SafetyPatchError
from .batcher import Batcher, Job, QueueFull
from .engine import BASE, Engine, Route
from .protocol import SHUTTING_DOWN, ApiError, Prepared


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


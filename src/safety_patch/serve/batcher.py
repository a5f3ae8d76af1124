"""Micro-batching: requests for the same model arriving within a short window share one forward pass.

torch is not async, so one worker thread owns the :class:`~.engine.Engine` and runs one batch
at a time; the asyncio side submits :class:`Job` objects and reads each job's events from an
``asyncio.Queue`` that the worker fills through ``loop.call_soon_threadsafe``.

Policy: the oldest waiting job opens a window of ``window_s`` seconds (default 15 ms); every
waiting job with the same model name, temperature and top-p joins it (seeds may differ: each
row samples from its own generator), up to ``max_batch``
(a full batch starts at once). ``max_batch=1`` serves one request at a time (the benchmark's
baseline). A cancelled job (client gone) is dropped if it has not started, and stops at the
next decoding step if it has, so it frees its row and the batch ends without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import SafetyPatchError
from .engine import Engine, Result, Route, Sampling

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More jobs are waiting than ``max_queue`` allows."""


@dataclass(eq=False)
class Job:
    """One chat completion waiting for or in the worker.

    Events, in order: ``("route", Route)``, ``("token", int)`` per answer token, then
    ``("done", Result)`` or ``("error", str)``.
    """

    model: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    views: list[list[int]] | None = None  # what the gates read (Engine.views); None: the prompt alone
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        # the seed is the request's own (Engine.run draws each row from its own generator), so
        # requests with different seeds share a batch
        return (self.model, self.sampling.temperature, self.sampling.top_p)

    def post(self, kind: str, value) -> None:
        """Thread-safe: deliver an event to the job's asyncio consumer (dropped if its loop is closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has shut down: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    """Owns the engine's worker thread; see the module docstring for the batching policy."""

    def __init__(self, engine: Engine, window_s: float = 0.015, max_batch: int = 16, max_queue: int = 1024):
        if max_batch < 1 or window_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
        self.engine, self.window_s, self.max_batch, self.max_queue = engine, window_s, max_batch, max_queue
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self.running = 0  # jobs in the batch being generated now
        self._running: list[Job] = []  # that batch (cut_all reaches it)
        self.batches = 0
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._work, name="safety-patch-engine", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            for j in self._pending:
                j.post("error", "the server is shutting down")
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def cut_all(self, status: int, message: str) -> None:
        """Answer every waiting and running job now with the error ``(status, message)`` and stop the
        running rows at their next step: a server about to stop says so in the API's own error shape,
        before its grace period ends and the framework cuts the connections with a bare 500."""
        with self._cond:
            jobs = list(self._pending) + list(self._running)
            self._pending.clear()
            self._cond.notify_all()
        for j in jobs:
            j.cancelled.set()
            j.post("error", (status, message))

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when ``max_queue`` jobs already wait, RuntimeError after stop."""
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                for j in [j for j in self._pending if j.cancelled.is_set()]:
                    self._pending.remove(j)
                    j.post("done", Result([], "cancelled"))
                if self._stop:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key and not j.cancelled.is_set()]
                wait = first.created + self.window_s - time.monotonic()
                if len(same) >= self.max_batch or wait <= 0:
                    batch = same[: self.max_batch]
                    for j in batch:
                        self._pending.remove(j)
                    self.running = len(batch)
                    self._running = list(batch)
                    return batch
                self._cond.wait(wait)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            self.batches += 1
            self.batch_sizes.append(len(batch))
            try:
                results = self.engine.run(
                    batch[0].model, [j.prompt for j in batch], [j.max_tokens for j in batch], batch[0].sampling,
                    on_route=lambda i, r, b=batch: b[i].post("route", r),
                    on_token=lambda i, t, b=batch: b[i].post("token", t),
                    cancelled=lambda i, b=batch: b[i].cancelled.is_set(), seeds=[j.sampling.seed for j in batch],
                    views=[j.views or [j.prompt] for j in batch])
                for j, res in zip(batch, results, strict=True):
                    j.post("done", res)
            except Exception as e:  # noqa: BLE001 - a failed batch must answer its requests, not kill the worker
                log.exception("generation failed for a batch of %d", len(batch))
                # A SafetyPatchError is a one-line, user-facing reason (e.g. a gate that cannot decide: fail closed).
                why = str(e) if isinstance(e, SafetyPatchError) else f"generation failed ({type(e).__name__})"
                for j in batch:
                    j.post("error", why)
            finally:
                with self._cond:
                    self.running = 0
                    self._running = []
        self.engine.release()


__all__ = ["Batcher", "Job", "QueueFull", "Route", "Result", "Sampling"]

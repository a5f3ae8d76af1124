"""One progress style for every step that can take more than a few seconds.

On a terminal: a tqdm bar with rate and ETA, redrawn in place. When stderr is a file or a
pipe (CI logs, ``nohup``, ``2> log``): the same tqdm status as one plain line every
``SAFETY_PATCH_PROGRESS_SECONDS`` seconds (default 10) and a last line when the step ends,
so a log shows where a long command is and how fast it goes, and no line is buffered.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

from tqdm import tqdm

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_every() -> float:
    """Seconds between progress lines when stderr is not a terminal ($SAFETY_PATCH_PROGRESS_SECONDS, default 10)."""
    try:
        return max(float(os.environ.get("SAFETY_PATCH_PROGRESS_SECONDS", "10")), 0.1)
    except ValueError:
        return 10.0


class _Lines:
    """A text stream for tqdm that turns each in-place redraw into one finished, flushed line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        text = _ANSI.sub("", s).replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None) -> tqdm:
    """A progress bar over ``total`` units (None: unknown), labelled ``desc``; call ``.update(n)`` and ``.close()``.

    Returns a ``tqdm``; use it as a context manager or close it in ``finally``."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=False)
    every = log_every()
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=every, maxinterval=every,
                miniters=1, ncols=100, ascii=True, leave=True)


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 05 s``, ``1 h 02 min``: how a summary line says how long a command took."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m} min {s:02d} s"
    h, m = divmod(int(round(seconds)) // 60, 60)
    return f"{h} h {m:02d} min"


def trainer_callback(desc: str = "[train] steps"):
    """A transformers ``TrainerCallback`` drawing the optimiser steps with :func:`bar` (for logs that are
    not a terminal, where the trainer's own tqdm would write one carriage-return redraw per step)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = bar(state.max_steps, desc, unit="step")
                self.bar.update(state.global_step)  # a resumed run starts where its checkpoint was

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()

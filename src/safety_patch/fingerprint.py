"""Stable identity of a model: sha256 over its weights and tokenizer.

Patches record the fingerprint of the base they were trained on and refuse to attach to
another. The hash covers tensor names, shapes and values; values are hashed as fp32 so
that a bf16 checkpoint loaded in bf16 or fp32 has one identity (the cast is exact), while
genuinely different weights (one changed entry, or a lossy fp32->bf16 cast) differ. Tied
tensors are hashed once, under their first name.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 24
"""Elements per piece a tensor is hashed in (64 MB as fp32): bounds the host memory a GPU
tensor's copy takes, and lets the copy of one piece overlap the hashing of the one before."""


def _fp32_pieces(t: torch.Tensor):
    """``t``'s values as fp32 in row-major order, as CPU tensors of at most :data:`CHUNK` elements.

    The cast happens where ``t`` lives (on a GPU, before the copy to the host); a CPU fp32
    tensor's pieces are views, so nothing is copied. The bytes are exactly those of
    ``t.float().contiguous()``, which the fingerprint has always hashed.
    """
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        yield flat[i:i + CHUNK].to(dtype=torch.float32).to(device="cpu")


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's name, shape (JSON) and fp32 bytes, in the order given.

    One worker thread hashes while the caller's thread casts and copies the next piece
    (``hashlib`` releases the GIL on large buffers): on a GPU model the device-to-host copy is
    hidden behind the hash instead of added to it. At most two pieces are in flight.
    """
    h = hashlib.sha256()
    seen: set = set()
    with ThreadPoolExecutor(max_workers=1) as worker:  # one worker: updates run in submission order
        in_flight: deque = deque()

        def feed(data) -> None:
            in_flight.append(worker.submit(h.update, data))
            while len(in_flight) > 2:
                in_flight.popleft().result()

        for name, t in named:
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride())) if t.device.type != "meta" else id(t)
            if key in seen:  # tied weights (e.g. lm_head == embed_tokens): hash once
                continue
            seen.add(key)
            feed(name.encode())
            feed(json.dumps(list(t.shape)).encode())
            for piece in _fp32_pieces(t):
                feed(piece.numpy())  # the buffer itself: no bytes() copy
        while in_flight:
            in_flight.popleft().result()
    return h.hexdigest()


def tokenizer_signature(tokenizer) -> str:
    """Hash of vocabulary, special tokens and chat template: what changes the prompt's tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = {
        "vocab": vocab,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fingerprint(model: torch.nn.Module, tokenizer=None) -> str:
    """sha256 over the model's (untied) weights and, if given, its tokenizer."""
    h = hashlib.sha256()
    h.update(hash_tensors(model.state_dict(keep_vars=False).items()).encode())
    if tokenizer is not None:
        h.update(tokenizer_signature(tokenizer).encode())
    return h.hexdigest()

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
from collections.abc import Iterable

import torch


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride())) if t.device.type != "meta" else id(t)
        if key in seen:  # tied weights (e.g. lm_head == embed_tokens): hash once
            continue
        seen.add(key)
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(_tensor_bytes(t))
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

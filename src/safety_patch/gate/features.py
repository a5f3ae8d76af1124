"""Gate features: token ids to the hidden state at the last prompt token of the layers a gate reads.

The pass stops after the deepest layer read and batches by shared prefix (``shared_prefix``),
by length, or in rows of 8 (``config.Batching``). Features are cached on disk under
``$SAFETY_PATCH_HOME/gate-features/``, keyed by base fingerprint, the code that computes them
(``feature_code_key``), layer, batching, device, dtype, threads and torch version, so a refit
with another threshold or L2 costs no forward pass. ``FeatureBank`` reads each prompt once
across a report's lists."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SafetyPatchError
from .config import BATCHING, MAX_BATCH, SHARED_PREFIX, Batching
from .probe import layer_states


def pool_features(model, tokenizer, harmful: Sequence, benign: Sequence, counts: dict, layer: int | Sequence[int],
                  batching: Batching = BATCHING, fingerprint: str | None = None,
                  bank: FeatureBank | None = None) -> torch.Tensor:
    """Features of the gate pool ``harmful + benign`` ([n, hidden]): the hand-written positives
    (the last ``counts["written_harmful"]`` harmful prompts) and look-alikes (the last
    ``counts["written_lookalikes"]`` benign ones) are read apart from the rest, so the rest reuses
    the cache of a fit without them (:func:`cached_features`). Always read as a fit reads them
    (the refits must see the fit's own features); with ``bank``, also deposited in it, so a
    report's later lists skip the pool prompts they hold."""
    ids_h, ids_b = encode(tokenizer, list(harmful)), encode(tokenizer, list(benign))
    n_w, n_l = counts.get("written_harmful", 0), counts.get("written_lookalikes", 0)
    if not n_w and not n_l:
        out = cached_features(model, tokenizer, ids_h + ids_b, layer, batching, fingerprint)
    else:
        k, j = len(harmful) - n_w, len(benign) - n_l
        base = cached_features(model, tokenizer, ids_h[:k] + ids_b[:j], layer, batching, fingerprint)
        parts = [base[:k]]
        if n_w:
            parts.append(cached_features(model, tokenizer, ids_h[k:], layer, batching, fingerprint))
        parts.append(base[k:])
        if n_l:
            parts.append(cached_features(model, tokenizer, ids_b[j:], layer, batching, fingerprint))
        out = torch.cat(parts)
    if bank is not None:
        bank.add(ids_h + ids_b, out, layer)
    return out


class FeatureBank:
    """Gate features by prompt (token ids) for one model, layer set, batching and feature cache:
    what :func:`evaluate_gate`'s lists read, so that a prompt is read once however many of them
    hold it. They overlap: a split's benign and wrapped prompts are in every leave-one-source-out
    comparison, a source's train requests and the hand-written look-alikes are in the gate's pool,
    the prefill attack reads the split's own prompts: on the ``reproduce --quick`` gate stage the
    report read 2,132 prompts (195k tokens) on its own lists and 994 (114k) through a bank, 1.76x
    faster (bench/gate_eval.py, session 29). :meth:`read` reads a list's prompts not yet held in one
    :func:`cached_features` pass and assembles the list from the bank; :meth:`add` deposits a
    list read elsewhere (the pool, as the fit read it). A prompt keeps the features of the first
    list that read it, which equal any other list's read to float rounding (:func:`features`);
    within one command the order of the reads, and so every value, is fixed."""

    def __init__(self, model, tokenizer, layers: int | Sequence[int], batching: Batching = BATCHING,
                 fingerprint: str | None = None):
        self.model, self.tokenizer, self.batching, self.fingerprint = model, tokenizer, batching, fingerprint
        self.layers = _layer_tuple(layers)
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, prompts: Sequence[Sequence[int]], x: torch.Tensor, layers: int | Sequence[int]) -> None:
        """Hold ``x``'s rows ([len(prompts), k·hidden]) for ``prompts``, read at ``layers`` (ignored
        unless they are the bank's); a prompt already held keeps its first features."""
        if _layer_tuple(layers) != self.layers:
            return
        for p, row in zip(prompts, x, strict=True):
            self.rows.setdefault(tuple(p), row)

    def read(self, prompts: Sequence[Sequence[int]], layers: int | Sequence[int]) -> torch.Tensor:
        """:func:`cached_features` of ``prompts`` at ``layers`` ([n, k·hidden]), reading only the
        prompts not held (once each, in first-seen order); at other layers than the bank's, a
        plain :func:`cached_features` call."""
        if _layer_tuple(layers) != self.layers:
            return cached_features(self.model, self.tokenizer, prompts, layers, self.batching, self.fingerprint)
        missing = list(dict.fromkeys(tuple(p) for p in prompts if tuple(p) not in self.rows))
        if missing:
            x = cached_features(self.model, self.tokenizer, [list(p) for p in missing], self.layers, self.batching,
                                self.fingerprint)
            self.add(missing, x, self.layers)
        if not prompts:
            return torch.zeros(0, len(self.layers) * getattr(self.model.config, "hidden_size", 0))
        return torch.stack([self.rows[tuple(p)] for p in prompts])


def _layer_tuple(layers: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, int) else tuple(int(v) for v in layers)


def _read(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int | Sequence[int], batching: Batching,
          fingerprint: str | None, bank: FeatureBank | None) -> torch.Tensor:
    """:func:`cached_features`, through ``bank`` when one is given."""
    if bank is not None:
        return bank.read(prompts, layer)
    return cached_features(model, tokenizer, prompts, layer, batching, fingerprint)


# ----------------------------------------------------------------------------- features


def encode(tokenizer, convs: Sequence[Sequence[dict]], prefills: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each conversation's rendered chat prompt (assistant header included), as the
    gate reads it; with ``prefills``, each prompt continued by its prefill (where routing reads
    when an answer is prefilled: generation renders the prompt, then appends the prefill)."""
    from ..generation import render

    texts = [render(tokenizer, m) for m in convs]
    if prefills is not None:
        texts = [t + p for t, p in zip(texts, prefills, strict=True)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def length_buckets(lengths: Sequence[int], token_budget: int = 8192, max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped into batches of similar length: sorted by length (stable), each batch
    as many prompts as fit ``token_budget`` (rows x the batch's longest prompt), at most
    ``max_batch``, at least one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:  # ascending: the prompt being added is the batch's widest
        if cur and ((len(cur) + 1) * lengths[i] > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def features(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int,
             batching: Batching = BATCHING, batch_size: int = 8) -> torch.Tensor:
    """Hidden state after decoder layer ``layer`` at each prompt's last token: [n, hidden] fp32.

    ``batching`` (:data:`Batching`): ``"shared-prefix"`` reads shared beginnings once
    (:func:`.shared_prefix.last_token_states`); None: length-sorted batches of ``batch_size``
    (``gate.prompt_states``, the path of gates written before session 18); an int:
    length-bucketed batches under that token budget. Each stops after ``layer`` and runs under
    inference mode; they agree to float rounding. Raises SafetyPatchError for an unknown
    ``batching``, a layer the model lacks or an empty prompt.
    """
    return features_at(model, tokenizer, prompts, [layer], batching, batch_size)[layer]


def features_at(model, tokenizer, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                batching: Batching = BATCHING, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """:func:`features` at each of ``layers`` in one pass that stops after the deepest:
    {layer: [n, hidden] fp32}, each equal to what :func:`features` reads for that layer alone."""
    from ..progress import bar

    if not (batching is None or batching == SHARED_PREFIX or (isinstance(batching, int) and not isinstance(batching, bool)
                                                              and batching > 0)):
        raise SafetyPatchError(f"gate feature batching {batching!r}: expected {SHARED_PREFIX!r}, None or a positive "
                               "token budget")
    layers = sorted(set(layers))
    what = f"layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
    with torch.inference_mode(), bar(len(prompts), f"[gate] {what} states", unit="prompt") as b:
        if batching is None:
            return layer_states(model, tokenizer, prompts, layers, batch_size, progress=b.update)
        if batching == SHARED_PREFIX:
            from ..shared_prefix import last_token_states_at

            return last_token_states_at(model, prompts, layers, progress=b.update)
        dim = getattr(model.config, "hidden_size", 0)
        out = {li: torch.zeros(len(prompts), dim) for li in layers}
        for idx in length_buckets([len(p) for p in prompts], batching):
            got = layer_states(model, tokenizer, [prompts[i] for i in idx], layers, len(idx))
            for li in layers:
                out[li][idx] = got[li]
            b.update(len(idx))
        return out


@functools.cache
def feature_code_key() -> str:
    """Identity of the code that computes gate features: the source of the functions on the path
    from token ids to a layer's last-token state, and the transformers version (the model's
    forward). Keyed on these rather than on the whole package, so that an edit elsewhere (a pool
    default, a report) does not throw away a ~10-minute pool read; the base weights, prompts,
    layer, batching, device, dtype, threads and torch version are keyed beside it. Computed once
    per process, from the code as imported."""
    import hashlib
    import inspect

    import transformers

    from .. import shared_prefix
    from ..prompt_pass import PREFILL_PASS_COST
    from . import probe

    # layer_states batches by prompt_pass.length_groups: where a batch is cut changes features by rounding
    parts = [inspect.getsource(f) for f in (probe.layer_states, probe.left_padded, probe.length_groups,
                                            probe.decoder_layers, probe._Stop, features, features_at, length_buckets)]
    parts.append(inspect.getsource(shared_prefix))
    parts += [f"MAX_BATCH={MAX_BATCH}", f"PREFILL_PASS_COST={PREFILL_PASS_COST}", transformers.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _feature_cache_path(model, prompts: Sequence[Sequence[int]], layer: int, batching: Batching, fingerprint: str):
    import hashlib
    import json

    from ..models import home

    p = next(model.parameters())
    key = hashlib.sha256(json.dumps({
        "fingerprint": fingerprint, "code": feature_code_key(), "torch": torch.__version__, "layer": layer,
        "batching": batching, "device": str(p.device), "dtype": str(p.dtype), "threads": torch.get_num_threads(),
        "prompts": [list(map(int, x)) for x in prompts]}).encode()).hexdigest()
    return home() / "gate-features" / f"{key[:32]}.safetensors"


def cached_features(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int | Sequence[int],
                    batching: Batching = BATCHING, fingerprint: str | None = None) -> torch.Tensor:
    """:func:`features`, reused from ``$SAFETY_PATCH_HOME/gate-features/`` when the same prompts
    were read before on the same base (``fingerprint``), feature code (:func:`feature_code_key`), layer, batching, device, dtype,
    thread count and torch version: a refit with another threshold, target FPR or L2, or
    ``gate fit`` after ``train`` with the same gate settings, skips the forward passes. The
    cached value is that earlier computation of exactly these batches. ``fingerprint`` None: no
    cache. A cache file that is unreadable, of the wrong shape or not finite is recomputed; one
    that cannot be written is skipped (the cache never fails a fit). ``layer`` a sequence: each
    layer's features (cached apart; the layers not cached read in one pass, :func:`features_at`),
    concatenated in its order: [n, k·hidden]."""
    import os
    import tempfile

    from safetensors.torch import load_file, save_file

    layers = _layer_tuple(layer)
    dim = getattr(model.config, "hidden_size", 0)
    got: dict[int, torch.Tensor] = {}
    paths = {}
    if fingerprint is not None:
        for li in set(layers):
            paths[li] = path = _feature_cache_path(model, prompts, li, batching, fingerprint)
            if path.is_file():
                try:
                    x = load_file(str(path))["features"]
                    if tuple(x.shape) == (len(prompts), dim) and x.dtype == torch.float32 and bool(torch.isfinite(x).all()):
                        got[li] = x
                except Exception:  # a damaged cache entry: recompute (and rewrite) it
                    pass
    missing = sorted(set(layers) - set(got))
    if missing:
        fresh = features_at(model, tokenizer, prompts, missing, batching)
        for li in missing:
            got[li] = x = fresh[li]
            if li not in paths:
                continue
            try:
                paths[li].parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=paths[li].parent)
                os.close(fd)
                save_file({"features": x.contiguous()}, tmp)
                os.replace(tmp, paths[li])  # atomic: a reader sees the old file or the whole new one
            except OSError:
                pass
    return got[layers[0]] if len(layers) == 1 else torch.cat([got[li] for li in layers], 1)


def check_context(model, ids: Sequence[Sequence[int]], where: str | Path) -> None:
    """Refuse prompts the model cannot read: longer than its positions (hidden states past them are not
    what the gate was fit on; generation refuses them too) or empty. Raises SafetyPatchError naming
    ``where`` and the first such prompt (1-based)."""
    from ..generation import context_length, over_context

    bad = sorted(over_context(model, [len(r) for r in ids]) + [i for i, r in enumerate(ids) if not r])
    if bad:
        i = bad[0]
        raise SafetyPatchError(f"{where}: prompt {i + 1} is empty" if not ids[i] else
                               f"{where}: prompt {i + 1} has {len(ids[i])} tokens, over the model's context length "
                               f"of {context_length(model)}: the gate cannot read it")

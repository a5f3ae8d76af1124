"""Decoding loops over a left-padded batch: greedy and sampling, each row leaving the batch when
its answer ends (:func:`greedy`, :func:`sample`), and the checks that say when they are exactly
what transformers' ``generate`` would do for a model's generation config (:func:`plain_greedy`,
:func:`sampling_warpers`). The prompt pass they start from is :mod:`.prompt_pass`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .prompt_pass import cache_argument, prefill

_GREEDY_NEUTRAL = frozenset({
    # token ids and lengths (passed or read the same way by both decoders)
    "_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length",
    "max_new_tokens", "transformers_version",
    # sampling settings: greedy calls override do_sample/temperature/top_p/top_k, the rest act only when sampling
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    # caches, compilation, outputs and assisted decoding: how a step is computed or returned, not which token wins
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "continuous_batching_config", "output_attentions", "output_hidden_states", "output_logits",
    "output_scores", "return_dict_in_generate", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size",
    "assistant_early_exit", "assistant_ensemble_weight", "speculation_type", "use_mtp",
    # beam-search settings, inert while num_beams (checked) is 1
    "early_stopping", "length_penalty",
})


def plain_greedy(generation_config) -> bool:
    """Whether ``generate(do_sample=False)`` with this model's generation config is plain argmax
    decoding, the only thing :func:`greedy` does: every field outside a list known not to change
    which token wins (ids, lengths, sampling-only settings, caches, outputs) equals transformers'
    default. A repetition penalty, beams, suppressed or forced tokens, a minimum length, or a
    field this code does not know yet make it False, and generation then calls ``generate``
    (fail closed: the decoder never silently drops a setting the model's card asks for)."""
    from transformers import GenerationConfig as HFGenerationConfig

    if generation_config is None:
        return True
    default = HFGenerationConfig().to_dict()
    mine = generation_config.to_dict()
    return all(k in _GREEDY_NEUTRAL or mine.get(k) == default.get(k) for k in set(default) | set(mine))


_SAMPLING_SETTINGS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
"""Fields :func:`plain_greedy` may pass over (they act only when sampling) and :func:`sampling_warpers` builds no warper for."""


def sampling_warpers(generation_config, temperature: float, top_p: float):
    """The logits processors ``generate(do_sample=True, temperature=temperature, top_p=top_p)`` applies
    under this model's generation config, as a ``LogitsProcessorList`` in ``generate``'s order
    (transformers' ``GenerationMixin._get_logits_processor``: temperature where it is not 1, top-k
    with the config's ``top_k`` or, where it is unset, transformers' global default (50), top-p
    where it is under 1, computed by :class:`TopPAfterTopK` after a top-k); None where the config
    asks for anything else (a repetition penalty, min-p, typical or η sampling, any field
    :func:`plain_greedy` does not know), and sampling then calls ``generate`` (fail closed).
    Raises ValueError for a temperature that is not positive."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if not temperature > 0:
        raise ValueError(f"sampling_warpers: temperature must be > 0, got {temperature}")
    default = HFGenerationConfig()
    config = generation_config if generation_config is not None else default
    if not plain_greedy(generation_config) or any(getattr(config, k, None) != getattr(default, k, None)
                                                  for k in _SAMPLING_SETTINGS):
        return None
    top_k = config.top_k
    if top_k is None:  # generate fills an unset field from transformers' global defaults (top_k 50 in 5.x)
        defaults = getattr(HFGenerationConfig, "_get_default_generation_params", lambda: {})()
        if "top_k" not in defaults:
            return None  # a transformers that fills it otherwise: let generate sample
        top_k = defaults["top_k"]
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append((_top_p_after_top_k() if top_k else TopPLogitsWarper)(top_p=top_p, min_tokens_to_keep=1))
    return warpers


@functools.cache
def _top_p_after_top_k() -> type:
    """The :class:`TopPAfterTopK` class, built on first use (it subclasses a transformers class)."""
    from transformers.generation import TopPLogitsWarper

    class TopPAfterTopK(TopPLogitsWarper):
        """transformers' ``TopPLogitsWarper`` for scores that top-k has already cut to a few finite
        entries per row (the rest ``-inf``), computed without sorting the whole vocabulary: a sort of
        32 rows x 49,152 logits took 23 ms, about a fifth of a sampling step on the embedded model
        (bench/sampling_speed.py's workload).

        The ascending row the warper's softmax and cumulative sum read is rebuilt exactly: ``-inf``
        everywhere but its last m places, which hold the m largest scores in ascending order
        (``torch.topk``; m the most finite entries of any row). Its values equal ``torch.sort``'s
        element for element, so the fp32 softmax and cumulative sum over the full row, and the
        tokens removed, are the same. Where two finite scores of a row are exactly equal, which
        of them the cut removes depends on how ``torch.sort`` orders ties, so such scores take
        the sort, as do scores with more than a quarter of the vocabulary finite."""

        def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
            m = int(torch.isfinite(scores).sum(-1).max())
            if scores.ndim != 2 or m * 4 > scores.shape[-1] or m < self.min_tokens_to_keep:
                return super().__call__(input_ids, scores)
            top, index = scores.topk(m, dim=-1)
            if (top[:, 1:] == top[:, :-1]).logical_and_(top[:, 1:].isfinite()).any():
                return super().__call__(input_ids, scores)  # tied scores: the sort's own order decides
            top, index = top.flip(-1), index.flip(-1)  # ascending, as the sort leaves the row's end
            row = scores.new_full(scores.shape, -math.inf)
            row[:, -m:] = top
            cumulative = row.softmax(dim=-1).cumsum(dim=-1)[:, -m:]
            remove = cumulative <= (1 - self.top_p)
            remove[:, -self.min_tokens_to_keep :] = False
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, remove)
            return scores.masked_fill(mask, self.filter_value)

    return TopPAfterTopK


@torch.inference_mode()
def greedy(module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | Sequence[int], eos_ids: set[int],
           adapter_names: Sequence[str] | None = None, on_token: Callable[[int, int], None] | None = None,
           cancelled: Callable[[int], bool] | None = None) -> list[list[int]]:
    """Greedy decoding of a left-padded batch in which each row leaves the batch once it is done:
    new token ids per row, up to and including its EOS token, [n][<= its budget].

    ``ids``/``mask``: [n, width] (:func:`left_padded`). ``max_new_tokens``: one budget for every
    row or one per row. ``adapter_names``: PEFT's per-row adapter for a mixed batch (kept aligned
    as rows leave). ``on_token(row, id)``: called for each new token but an EOS, as it is made;
    ``cancelled(row)``: checked after each of the row's tokens, a true value ends the row there.
    Raises ValueError for budgets of another length than the batch, SafetyPatchError where the
    model did not fill the KV cache it was handed (a transformers that names the argument
    otherwise: decoding on would ignore the prompt).

    The same steps as transformers' ``generate(do_sample=False)`` with no logits processors
    (argmax of the fp32 last-position logits; positions from the attention mask, pads at 1; one
    KV cache holding the values a ``DynamicCache`` would, filled by :func:`prefill` in length
    groups and grown in place), except that ``generate`` keeps computing finished rows until the whole
    batch has stopped: in an evaluation batch of 32, one 96-token answer beside 31 short
    refusals cost 32 rows x 96 steps. Here a row costs its own length
    (``Cache.batch_select_indices`` shrinks the cache). Removing rows changes only the shapes of
    the remaining rows' matmuls; tests compare the answers with ``generate``'s token for token,
    and bench/generation_speed.py on the embedded model. Callers use it only where
    :func:`plain_greedy` holds for the model's generation config."""
    return _decode(module, ids, mask, max_new_tokens, eos_ids, lambda logits, alive: logits.float().argmax(-1),
                   adapter_names, on_token, cancelled)


@torch.inference_mode()
def sample(module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | Sequence[int], eos_ids: set[int], warpers,
           adapter_names: Sequence[str] | None = None, on_token: Callable[[int, int], None] | None = None,
           cancelled: Callable[[int], bool] | None = None,
           generators: Sequence[torch.Generator] | None = None) -> list[list[int]]:
    """Sampling of a left-padded batch in which each row leaves the batch once it is done: new
    token ids per row, up to and including its EOS token, [n][<= its budget].

    Draws, for one RNG state, exactly what transformers' ``generate(do_sample=True)`` draws with the
    same ``warpers`` (:func:`sampling_warpers`: the logits processors ``generate`` builds), up to
    float rounding of the logits. Each step applies the warpers to the fp32 logits of the rows
    still running, takes their softmax, and calls ``torch.multinomial`` on all ``n`` rows, as
    ``generate`` does; the finished rows' slots hold a uniform distribution whose draw is
    discarded. ``multinomial`` draws one exponential variate per element of its [n, vocab] input,
    whatever the values (Gumbel-max), so every row sees the random numbers it sees in
    ``generate``, and the RNG ends where ``generate`` leaves it. What is saved is the compute of
    finished rows, which ``generate`` runs on until the batch's longest sample ends
    (bench/sampling_speed.py: 1.29x on `data build`'s self-written requests, every sample the same).
    ``ids``, ``mask``, budgets, ``adapter_names``, ``on_token`` and ``cancelled`` as in
    :func:`greedy` (a row whose budget or cancellation ends it is finished, as a stopping
    criterion ends it in ``generate``). Callers use it only where :func:`sampling_warpers`
    returned warpers.

    ``generators``: one ``torch.Generator`` per row, on the batch's device. Each row then draws
    from its own stream, so what it samples does not depend on the rows beside it (the server: a
    request's seed gives its answer whatever else shares its batch, up to float rounding of the
    batch's matmuls); these are not ``generate``'s draws. Raises ValueError for another number
    of generators than rows."""
    n = ids.shape[0]
    if generators is not None and len(generators) != n:
        raise ValueError(f"sample: {len(generators)} generators for a batch of {n}")

    def pick(logits: torch.Tensor, alive: list[int]) -> torch.Tensor:
        probs = torch.softmax(warpers(None, logits.float()), dim=-1)  # these warpers never read the ids
        if generators is not None:
            return torch.cat([torch.multinomial(probs[j], 1, generator=generators[r]) for j, r in enumerate(alive)])
        full = probs.new_ones(n, probs.shape[-1])
        rows = torch.tensor(alive, device=probs.device)
        full[rows] = probs
        return torch.multinomial(full, num_samples=1).squeeze(1)[rows]

    return _decode(module, ids, mask, max_new_tokens, eos_ids, pick, adapter_names, on_token, cancelled)


def _decode(module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | Sequence[int], eos_ids: set[int],
            pick: Callable[[torch.Tensor, list[int]], torch.Tensor], adapter_names: Sequence[str] | None = None,
            on_token: Callable[[int, int], None] | None = None,
            cancelled: Callable[[int], bool] | None = None) -> list[list[int]]:
    """The decode loop of :func:`greedy` and :func:`sample`; ``pick(logits [alive, vocab], the
    batch rows still running)`` chooses each running row's next token id [alive]."""
    n = ids.shape[0]
    budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"greedy: {len(budgets)} budgets for a batch of {n}")
    new: list[list[int]] = [[] for _ in range(n)]
    alive = [r for r in range(n) if budgets[r] > 0]
    if not alive:
        return new
    names = list(adapter_names) if adapter_names is not None else None
    if len(alive) < n:
        k = torch.tensor(alive, device=ids.device)
        ids, mask = ids[k], mask[k]
        names = [names[r] for r in alive] if names is not None else None
    kv = cache_argument(module)
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)  # as generate's prepare_inputs_for_generation
    extra = {"adapter_names": names} if names is not None else {}
    cache, logits = prefill(module, ids, mask, pos, names, room=max(budgets))
    last = pos[:, -1:]
    while True:
        nxt = pick(logits, alive)
        keep = []
        for j, (r, t) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            new[r].append(t)
            if t in eos_ids:
                continue
            if on_token is not None:
                on_token(r, t)
            if len(new[r]) < budgets[r] and not (cancelled is not None and cancelled(r)):
                keep.append(j)
        if not keep:
            return new
        if len(keep) < len(alive):
            k = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(k)
            mask, last, nxt = mask[k], last[k], nxt[k]
            alive = [alive[j] for j in keep]
            if names is not None:
                names = [names[j] for j in keep]
                extra = {"adapter_names": names}
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=-1)
        last = last + 1
        logits = module(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                        **{kv: cache}, **extra).logits[:, -1, :]


def __getattr__(name: str):
    if name == "TopPAfterTopK":  # PEP 562: the class without importing transformers at module import
        return _top_p_after_top_k()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Chat prompts and batched generation.

Prompts are rendered with the tokenizer's own chat template; batches are left-padded and
sorted by length, and a batch's prompt pass runs in groups of similar length
(:func:`length_groups`, :func:`prefill`) so that padding waste stays small. Greedy by default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Message = dict[str, str]


MIN_TEMPERATURE = 1e-3
"""The smallest sampling temperature taken (0 is greedy). Below it a sample is the greedy token
but for near-ties, and logits scaled by 1/t overflow: at 1e-300 every logit is inf and sampling
fails on NaN probabilities (found by a user's trial); half precision overflows from ~1e-4."""


def check_temperature(t: float, name: str = "temperature") -> float:
    """``t`` if it is 0 (greedy) or a finite number in [MIN_TEMPERATURE, 2]; else SafetyPatchError."""
    if not (t == 0 or (math.isfinite(t) and MIN_TEMPERATURE <= t <= 2)):
        from .errors import SafetyPatchError

        raise SafetyPatchError(f"{name} must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {t!r}")
    return t


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Raises SafetyPatchError for a temperature ``check_temperature`` refuses."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 32
    """Prompts per batch (length-sorted, left-padded). On the embedded model 32 decodes 2.4x the
    tokens/s of 8, and greedy answers were identical on all 64 prompts measured
    (bench/generation_speed.py, 2026-12-01): batching changes only the last bits of a matmul."""
    seed: int = 0

    def __post_init__(self):
        check_temperature(self.temperature)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def conversation(prompt: str, system: str | None = None, history: Sequence[Message] = ()) -> list[Message]:
    msgs: list[Message] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.extend(history)
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The exact text the model sees; templates without a system role fold it into the user turn."""
    if not getattr(tokenizer, "chat_template", None):
        # Base models without a template: a plain transcript is the least surprising choice.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")
    try:
        return _apply_template(tokenizer, messages, add_generation_prompt)
    except _TemplateRejected as first:
        if not messages or messages[0]["role"] != "system":
            raise _template_error(tokenizer, messages, first) from None
        folded = fold_system(messages)
        try:  # the documented fallback: templates without a system role get it folded into the first user turn
            return _apply_template(tokenizer, folded, add_generation_prompt)
        except _TemplateRejected as second:
            raise _template_error(tokenizer, folded, second) from None


class _TemplateRejected(Exception):
    pass


def _apply_template(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The one call of ``apply_chat_template`` for conversations; a template's refusal becomes _TemplateRejected."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, KeyError, TypeError, IndexError) as e:  # raise_exception() or a template bug
        raise _TemplateRejected(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


def fold_system(messages: Sequence[Message]) -> list[Message]:
    """A leading system message merged into the first user turn (blank line between), for templates without one."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def gate_views(tokenizer, messages: Sequence[Message]) -> list[str]:
    """The rendered texts a gate reads for one conversation: the conversation as the model sees it
    and, when it has system messages, the same conversation without them (the template's default
    system prompt, which gates are fit under). A gated patch applies when its gate fires on either:
    a one-line system prompt ("Answer in French.") once moved the default gate's catch of validation
    harmful requests from 92.6% to 13.7% (experiments/gate_system_prompt.py), so a system prompt can
    add routing but never take it away."""
    views = [render(tokenizer, messages)]
    if any(m.get("role") == "system" for m in messages):
        rest = [m for m in messages if m.get("role") != "system"]
        if rest:
            views.append(render(tokenizer, rest))
    return views


def _template_error(tokenizer, messages: Sequence[Message], why: Exception):
    from .errors import SafetyPatchError

    name = getattr(tokenizer, "name_or_path", "") or "the model"
    roles = ", ".join(m.get("role", "?") for m in messages)
    return SafetyPatchError(f"the chat template of {name} rejects a conversation with roles [{roles}]: {why} "
                            "(templates that require alternating user/assistant turns accept no two in a row)")


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    config: GenerationConfig = GenerationConfig(),
    prefill: Sequence[str] | None = None,
    progress=None,
    gate_logits: list | None = None,
) -> list[str]:
    """Complete each conversation; returns the new text only. ``prefill`` starts each answer.
    ``gate_logits``: see :func:`complete_texts`.

    Gates read the rendered conversation *without* the prefill: a prefilled answer is text the
    requester wrote, and reading the gate after it would let the requester choose where the gate
    reads ("Sure, here is" moved the default gate's logit below its threshold on every harmful
    validation request; docs/gate.md)."""
    views = [gate_views(tokenizer, c) for c in conversations]
    prompts = [v[0] for v in views]
    texts = prompts
    if prefill is not None:
        texts = [t + p for t, p in zip(prompts, prefill, strict=True)]
    return [t for t, _ in complete_texts(model, tokenizer, texts, config, progress, route_texts=views,
                                         gate_logits=gate_logits)]


def context_length(model) -> int | None:
    """The longest prompt + answer the model's positions allow (``config.max_position_embeddings``),
    or None where the config does not say."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def over_context(model, lengths: Sequence[int], reserve: int = 0) -> list[int]:
    """Indices of the prompts (token counts ``lengths``) that with ``reserve`` more tokens (the
    answer's ``max_new_tokens``; 0 for a pass that only reads the prompt, as a gate does) run past
    the model's positions: past them hidden states and answers are garbage. [] where the model's
    config does not say its context length."""
    n = context_length(model)
    return [] if n is None else [i for i, k in enumerate(lengths) if k + reserve > n]


@torch.inference_mode()
def complete_texts(model, tokenizer, texts: Sequence[str], config: GenerationConfig = GenerationConfig(),
                   progress=None, route_texts: Sequence[str] | None = None,
                   gate_logits: list | None = None) -> list[tuple[str, bool]]:
    """Continue raw, already rendered ``texts``; returns (new text, whether it stopped at an EOS token).

    ``route_texts``: what each prompt's gates read (default: ``texts``): a text, or a sequence of
    texts whose highest gate logit decides (:func:`gate_views`); :func:`generate` passes the rendered
    prompts without their prefills. Raises ValueError when its length differs.

    ``gate_logits``: a list this call extends with one {gated item: probe logit} per text, the
    logits its routing used (an item's adapter answered where its logit is above its gate's
    threshold); ``{}`` per text for a stack without gates.

    ``model``: a ``patched.PatchedModel`` (its gates route each prompt) or a plain model (the
    base). The raw form serves callers that need a turn the chat template cannot express, such
    as a user turn left open for the model to write (data/selfinstruct.py)."""
    from .errors import SafetyPatchError, check_text
    from .patched import as_patched

    pm = as_patched(model)
    enc = [tokenizer(check_text(t, f"prompt {i}"), add_special_tokens=False)["input_ids"] for i, t in enumerate(texts)]
    too_long = over_context(pm, [len(e) for e in enc], config.max_new_tokens)
    if too_long:  # past the model's positions the answer is garbage, not an answer: refused, never run
        i = too_long[0]
        raise SafetyPatchError(f"prompt {i + 1} of {len(enc)} (counted from 1) has {len(enc[i])} tokens and "
                               f"max_new_tokens is {config.max_new_tokens}: "
                               f"over the model's context length of {context_length(pm)} tokens"
                               + (f" ({len(too_long)} prompts in all)" if len(too_long) > 1 else ""))
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]), reverse=True)
    out: list[tuple[str, bool] | None] = [None] * len(enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(pm.generation_config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id])
    gen_kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=pad)
    if config.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
        torch.manual_seed(config.seed)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    exact_greedy = plain_greedy(pm.generation_config)
    warpers = sampling_warpers(pm.generation_config, config.temperature, config.top_p) if config.temperature > 0 else None

    def run(module, members: list[int], adapter_names: list[str] | None = None) -> None:
        member_set = set(members)
        sub = [i for i in order if i in member_set]
        for b in range(math.ceil(len(sub) / config.batch_size)):
            idx = sub[b * config.batch_size : (b + 1) * config.batch_size]
            ids, mask = left_padded([enc[i] for i in idx], pad)
            names = [adapter_names[i] for i in idx] if adapter_names is not None else None
            if warpers is not None:  # draws what generate draws for the seed, without computing finished rows
                news = sample(module, ids.to(pm.device), mask.to(pm.device), config.max_new_tokens, eos_ids, warpers, names)
            # HF's own sampler or greedy search where the model's generation config asks for more
            # than these warpers or argmax (a repetition penalty, beams, …)
            elif config.temperature > 0 or not exact_greedy:
                extra = {"adapter_names": names} if names is not None else {}
                if (kv := growing_cache(module, config.max_new_tokens)) is not None:
                    extra[cache_argument(module)] = kv
                gen = module.generate(input_ids=ids.to(pm.device), attention_mask=mask.to(pm.device), **gen_kwargs, **extra)
                news = [gen[row, ids.shape[1]:].tolist() for row in range(len(idx))]
            else:
                news = greedy(module, ids.to(pm.device), mask.to(pm.device), config.max_new_tokens, eos_ids, names)
            for row, i in enumerate(idx):
                new = news[row]
                stopped = any(int(t) in eos_ids for t in new)
                out[i] = (tokenizer.decode(new, skip_special_tokens=True).strip(), stopped)
            if progress is not None:
                progress(len(idx))

    # Gated patches (patched.py): each prompt runs with the patches its gates chose, in one
    # mixed batch where PEFT can (one gated adapter), else one group of prompts per route.
    if route_texts is None or not pm.gates:  # nothing reads them without gates
        route_enc = enc
    else:
        if len(route_texts) != len(texts):
            raise ValueError(f"route_texts has {len(route_texts)} items for {len(texts)} texts")
        route_enc = [[tokenizer(v, add_special_tokens=False)["input_ids"] for v in ([t] if isinstance(t, str) else t)]
                     for t in route_texts]
    scores = (pm.gate_scores_max(tokenizer, route_enc, config.batch_size) if route_texts is not None and pm.gates
              else pm.gate_scores(tokenizer, route_enc, config.batch_size))
    routes = pm.routes_from(scores, len(route_enc))
    if gate_logits is not None:
        gate_logits.extend({n: float(z[i]) for n, z in scores.items()} for i in range(len(route_enc)))
    if pm.can_mix:
        with pm.mixed() as module:
            run(module, list(range(len(enc))), pm.adapter_names(routes))
    else:
        for members, on in pm.groups(routes):
            with pm.using(on) as module:
                run(module, members)
    return [o or ("", False) for o in out]


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
    cache, logits, mask = prefill(module, ids, mask, pos, names, room=max(budgets))
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


PREFILL_PASS_COST = 64
"""What one more forward pass costs, in prompt positions, when :func:`length_groups` weighs
splitting a batch (the fixed per-pass work: kernel launches, Python, the layers' small ops). A
chosen round figure, not a tuned one: where prompt lengths differ by hundreds of tokens, as
jailbreak templates beside direct requests do, the cuts hardly depend on it."""


def length_groups(lengths: Sequence[int], max_rows: int, pass_cost: int = PREFILL_PASS_COST) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches for left-padded forward passes, longest first:
    [[i, ...], ...], every index once, at most ``max_rows`` per batch.

    A padded batch computes (rows x its longest length) positions; an evaluation batch that mixes
    550-token jailbreak prompts with 40-token direct requests computes three times the positions it
    needs (bench/generation_speed.py). The cut points minimise the total positions plus
    ``pass_cost`` per pass, by dynamic programming over the sorted lengths (O(n x max_rows)).
    Raises ValueError for ``max_rows`` < 1."""
    if max_rows < 1:
        raise ValueError(f"length_groups: max_rows must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: cost of the j longest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):  # rows i..j-1 share a pass padded to the longest, lengths[order[i]]
            c = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


SHARED_PREFIX_MIN = 16
"""The fewest tokens every prompt of a batch must start with before :func:`prefill` reads them
once for the batch: below that a pass of its own costs about what it saves (``PREFILL_PASS_COST``)."""


def shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many tokens every row of a left-padded batch (``ids``/``mask`` [n, width]) starts with,
    leaving each row at least one token of its own (the prompt pass needs each row's last logits).
    The chat template's system turn (24 tokens on the embedded model) is such a prefix in every
    batch; prompts in one jailbreak template share the template's opening too."""
    lengths = mask.sum(-1).tolist()
    width = ids.shape[1]
    rows = [ids[r, width - n:] for r, n in enumerate(lengths)]
    most = min(lengths) - 1
    if most <= 0 or len(rows) < 2:
        return 0
    same = torch.stack([r[:most] for r in rows]).eq(rows[0][:most]).all(0)
    return int(most if bool(same.all()) else int(same.long().argmin()))


def prefill(module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, adapter_names: Sequence[str] | None = None,
            room: int = 0):
    """The prompt pass of :func:`greedy`: (a ``DynamicCache`` holding every layer's keys and values
    [n, kv heads, width', head dim], the last position's logits [n, vocab], the attention mask
    [n, width'] the decode steps extend).

    Rows of a left-padded batch whose lengths differ widely are passed in groups
    (:func:`length_groups`), each only as wide as its longest prompt, and their keys and values are
    padded back to the batch's width on the left, where the attention mask hides them. Tokens that
    several rows share are read once, in a pass of one row per adapter the batch routes to (an
    adapter changes the keys and values): the batch's common start where every row has the same
    ``SHARED_PREFIX_MIN`` or more tokens (:func:`shared_prefix_length`: the chat template's system
    turn), then an opening of that many or more tokens that several rows share after it (a
    jailbreak or rule template around different requests); each row's own tokens are passed on
    top of its shared ones, and the cache then holds [padding][shared][padding][row's tokens], the
    returned mask saying so (positions ``pos`` are unchanged). Either way
    the decode steps see the keys and values one padded pass would have left, up to float rounding
    (bench/generation_speed.py compares the answers with the unshared pass's: ``--decoders
    pruned,unshared``). Models whose cache has other than plain full-attention layers (sliding
    windows, linear attention) take one pass. Raises SafetyPatchError where the model did not fill
    the cache it was handed (a transformers that names the argument otherwise: decoding on would
    ignore the prompt)."""
    from transformers import DynamicCache

    from .errors import SafetyPatchError

    kv = cache_argument(module)
    n, width = ids.shape
    cache = DynamicCache(config=module.config)
    plain = _plain(cache)

    def one_pass(rows, cols, into, inputs=None, names=None):
        """Rows ``rows`` of the batch (or of ``inputs``: ids, mask, positions) from column ``cols`` on
        into the cache ``into``; ``names``: their adapters where not the rows' own."""
        ids_, mask_, pos_ = inputs if inputs is not None else (ids[:, cols:], mask[:, cols:], pos[:, cols:])
        if names is None and adapter_names is not None:
            names = [adapter_names[r] for r in rows]
        extra = {"adapter_names": names} if names is not None else {}
        k = torch.tensor(rows, device=ids.device)
        before = into.get_seq_length()
        out = module(input_ids=ids_[k], attention_mask=mask_[k], position_ids=pos_[k], use_cache=True,
                     logits_to_keep=1, **{kv: into}, **extra)
        if into.get_seq_length() != before + ids_.shape[1]:  # a transformers that ignored `cache=` would decode without context
            raise SafetyPatchError(f"generation: the model did not fill the KV cache it was given ({into.get_seq_length()} "
                                   f"of {before + ids_.shape[1]} positions, passed as `{kv}=`); "
                                   "this model's forward names it differently")
        return out.logits[:, -1, :]

    if not plain:
        return cache, one_pass(list(range(n)), 0, cache), mask
    if (done := _prefill_shared(module, ids, mask, adapter_names, room, one_pass)) is not None:
        return done
    lengths = mask.sum(-1).tolist()
    groups = length_groups(lengths, n)
    if len(groups) == 1:
        logits = one_pass(list(range(n)), 0, cache)
        for li, layer in enumerate(cache.layers):
            cache.layers[li] = _growing_layer()(layer.keys, layer.values, room)
        return cache, logits, mask
    keys: list[list] = [[None] * n for _ in cache.layers]
    values: list[list] = [[None] * n for _ in cache.layers]
    logits = [None] * n
    for rows in groups:
        wide = max(lengths[r] for r in rows)
        sub = DynamicCache(config=module.config)
        got = one_pass(rows, width - wide, sub)
        for li, layer in enumerate(sub.layers):
            k_, v_ = (torch.nn.functional.pad(t, (0, 0, width - wide, 0)) for t in (layer.keys, layer.values))
            for j, r in enumerate(rows):
                keys[li][r], values[li][r] = k_[j], v_[j]
        for j, r in enumerate(rows):
            logits[r] = got[j]
    for li in range(len(cache.layers)):
        cache.layers[li] = _growing_layer()(torch.stack(keys[li]), torch.stack(values[li]), room)
    return cache, torch.stack(logits), mask


def _prefill_shared(module, ids, mask, adapter_names, room, one_pass):
    """:func:`prefill` where tokens are shared, or None where nothing is (the caller's passes).

    Each row's context (tokens read once for several rows) is the batch's common start where it
    has ``SHARED_PREFIX_MIN`` or more tokens, read once per adapter, then, for rows that share
    their next ``SHARED_PREFIX_MIN`` or more tokens with other rows under the same adapter (one
    jailbreak or rule template around different requests), those rows' common run, read once
    after it. Each row's remaining tokens are then passed in length groups on top of its
    context. The cache holds [padding][context][padding][row's tokens] per row, and the returned
    mask says so (positions as in the left-padded batch)."""
    from transformers import DynamicCache

    n, width = ids.shape
    dev = ids.device
    lengths = mask.sum(-1).tolist()
    tokens = [ids[r, width - lengths[r]:] for r in range(n)]
    names = list(adapter_names) if adapter_names is not None else [None] * n
    shared = shared_prefix_length(ids, mask)
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    by_run: dict = {}  # rows whose next SHARED_PREFIX_MIN tokens agree, under one adapter
    for r in range(n):
        if lengths[r] - shared > SHARED_PREFIX_MIN:
            by_run.setdefault((names[r], tuple(tokens[r][shared: shared + SHARED_PREFIX_MIN].tolist())), []).append(r)
    by_run = {key: rows for key, rows in by_run.items() if len(rows) > 1}
    if not shared and not by_run:
        return None

    def read(run: torch.Tensor, start: int, under, name):
        """Keys and values per layer [1, kv heads, start + len(run), head dim] of ``run`` read after
        ``under`` (the same for its first ``start`` positions), under adapter ``name``."""
        head = DynamicCache(config=module.config)
        if under is not None:
            for li, layer in enumerate(head.layers):
                layer.update(*under[li])
        c = len(run)
        one_pass([0], 0, head, (run[None], mask.new_ones(1, start + c), torch.arange(start, start + c, device=dev)[None]),
                 names=None if adapter_names is None else [name])
        return [(layer.keys, layer.values) for layer in head.layers]

    first = {name: read(tokens[0][:shared], 0, None, name) if shared else None for name in dict.fromkeys(names)}
    context, used = [first[names[r]] for r in range(n)], [shared] * n
    for (name, _), rows in by_run.items():
        more = shared + shared_prefix_length(*left_padded([tokens[r][shared:].tolist() for r in rows], 0))
        kv = read(tokens[rows[0]][shared:more], shared, first[name], name)
        for r in rows:
            context[r], used[r] = kv, more
    some = next(c for c in context if c is not None)
    empty = [tuple(t[:, :, :0] for t in kv) for kv in some]  # the context of a row that shares nothing
    context = [c if c is not None else empty for c in context]
    own = [lengths[r] - used[r] for r in range(n)]
    ctx_w, own_w = max(used), max(own)
    full_mask = mask.new_zeros(n, ctx_w + own_w)  # [padding][context][padding][row's own tokens]
    for r in range(n):
        full_mask[r, ctx_w - used[r]: ctx_w] = 1
        full_mask[r, ctx_w + own_w - own[r]:] = 1
    keys: list[list] = [[None] * n for _ in some]
    values: list[list] = [[None] * n for _ in some]
    logits = [None] * n
    for rows in length_groups(own, n):
        c, w = max(used[r] for r in rows), max(own[r] for r in rows)
        sub = DynamicCache(config=module.config)
        for li, layer in enumerate(sub.layers):  # each row's context, left-padded to the group's widest
            layer.update(*(torch.cat([torch.nn.functional.pad(context[r][li][k], (0, 0, c - used[r], 0)) for r in rows])
                           for k in (0, 1)))
        tail = ids.new_zeros(len(rows), w)  # a padding slot's id is never attended to
        for j, r in enumerate(rows):
            tail[j, w - own[r]:] = tokens[r][used[r]:]
        seen = torch.cat([full_mask[rows][:, ctx_w - c: ctx_w], full_mask[rows][:, ctx_w + own_w - w:]], dim=-1)
        at = torch.stack([torch.arange(used[r] - w + own[r], used[r] + own[r], device=dev) for r in rows])
        at = at.masked_fill(seen[:, c:] == 0, 1)  # positions as generate's for padding
        got = one_pass(list(range(len(rows))), 0, sub, (tail, seen, at), names=None if adapter_names is None
                       else [names[r] for r in rows])
        for li, layer in enumerate(sub.layers):
            k_, v_ = (torch.cat([t.new_zeros(*t.shape[:2], ctx_w - c, t.shape[-1]), t[:, :, :c],
                                 t.new_zeros(*t.shape[:2], own_w - w, t.shape[-1]), t[:, :, c:]], dim=-2)
                      for t in (layer.keys, layer.values))
            for j, r in enumerate(rows):
                keys[li][r], values[li][r] = k_[j], v_[j]
        for j, r in enumerate(rows):
            logits[r] = got[j]
    cache = DynamicCache(config=module.config)
    for li in range(len(cache.layers)):
        cache.layers[li] = _growing_layer()(torch.stack(keys[li]), torch.stack(values[li]), room)
    return cache, torch.stack(logits), full_mask


def _plain(cache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention ``DynamicLayer``: the only kind a
    :class:`GrowingLayer` stands in for (a sliding-window layer drops old positions)."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@functools.cache
def _growing_layer() -> type:
    """The :class:`GrowingLayer` class, built on first use: it subclasses transformers'
    ``DynamicLayer``, and importing transformers here would add ~0.4 s to every command that
    imports this module (the CLI's start)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values sit in a buffer with ``room`` free positions: a
        decode step copies its one new position in and hands attention a view, where
        ``DynamicLayer.update`` concatenates, i.e. copies the whole cache, at every step (41% of a
        32-row evaluation batch's decode time on the embedded model, torch.profiler). The views hold
        exactly the values a ``DynamicLayer`` would; the buffer doubles when full."""

        def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, room: int):
            super().__init__()
            self.room, self.length = max(room, 1), 0
            if keys is not None:  # else empty: the first update (transformers' own prompt pass) sizes it
                self._allocate(keys, values)

        def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            n, heads, length, dim = keys.shape
            self._k = keys.new_empty(n, heads, length + self.room, dim)
            self._v = values.new_empty(n, values.shape[1], length + self.room, values.shape[-1])
            self._k[:, :, :length] = keys
            self._v[:, :, :length] = values
            self.length = length
            self.device = keys.device
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self._allocate(key_states, value_states)
                return self.keys, self.values
            t = key_states.shape[-2]
            if self.length + t > self._k.shape[-2]:
                grow = max(self._k.shape[-2], t)
                self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[-1])], dim=-2)
                self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[-1])], dim=-2)
            self._k[:, :, self.length : self.length + t] = key_states
            self._v[:, :, self.length : self.length + t] = value_states
            self.length += t
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]
                self._views()

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            if self.is_initialized:
                self.batch_select_indices(beam_idx.to(self.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self._views()

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._views()

        def crop(self, max_length: int) -> None:
            self.length = self.length - abs(max_length) if max_length < 0 else min(self.length, max_length)
            if self.is_initialized:
                self._views()

    return GrowingLayer


def growing_cache(module, room: int):
    """An empty ``DynamicCache`` for ``module`` whose layers are :class:`GrowingLayer` s, each sized
    by its first update (the prompt pass) with ``room`` free positions, for transformers' own
    ``generate`` (the sampler, and greedy search under a generation config that asks for more than
    argmax): the same keys and values its default cache holds, without copying the whole cache at
    every step. None where the model's cache has other than plain full-attention layers (sliding
    windows, linear attention) or its generation config names a cache of its own
    (``cache_implementation``, which ``generate`` refuses beside a given cache): ``generate`` then
    builds its own."""
    from transformers import DynamicCache

    if getattr(getattr(module, "generation_config", None), "cache_implementation", None) is not None:
        return None
    cache = DynamicCache(config=module.config)
    if not _plain(cache):
        return None
    grow = _growing_layer()
    for li in range(len(cache.layers)):
        cache.layers[li] = grow(None, None, room)
    return cache


def __getattr__(name: str):
    if name == "GrowingLayer":  # PEP 562: the classes without importing transformers at module import
        return _growing_layer()
    if name == "TopPAfterTopK":
        return _top_p_after_top_k()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def forward_parameters(module) -> frozenset[str]:
    """The keyword names a causal LM's ``forward`` takes. ``module`` may be a PEFT wrapper (its
    ``forward`` takes ``**kwargs``): the base model's signature decides."""
    import inspect

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return frozenset(inspect.signature(base.forward).parameters)


def cache_argument(module) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache by: ``cache`` (transformers ≥ 5.24,
    where ``past_key_values`` is deprecated, to be removed in 5.40) or ``past_key_values`` (before)."""
    return "cache" if "cache" in forward_parameters(module) else "past_key_values"


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, width] and attention mask [n, width], left-padded: every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p))
        mask[row, width - len(p) :] = 1
    return ids, mask


class GenerationCache:
    """On-disk cache of completions keyed by (model fingerprint, patches, exact prompt text, config).

    SQLite so that concurrent readers and a killed writer are safe: each batch commits, so a
    re-run after an interruption only generates what is missing. Batch size is not part of
    the key (it does not change greedy outputs beyond float noise).
    """

    def __init__(self, path):
        import sqlite3
        from pathlib import Path

        from .errors import SafetyPatchError

        path = Path(path)
        self.path = path
        try:  # a read-only $SAFETY_PATCH_HOME: one line naming the folder and the way out
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS gen (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS verdict (key TEXT PRIMARY KEY, json TEXT NOT NULL)")
            # a gated stack's answers: the gate logits their routing used, keyed as the answer is
            self.db.execute("CREATE TABLE IF NOT EXISTS route (key TEXT PRIMARY KEY, json TEXT NOT NULL)")
            self.db.commit()
        except (OSError, sqlite3.Error) as e:
            raise SafetyPatchError(f"generation cache {path} is not writable ({getattr(e, 'strerror', None) or e}); "
                                   "set SAFETY_PATCH_HOME to a writable folder or pass --no-cache") from None

    @staticmethod
    def key(fingerprint: str, stack_key: str, prompt_text: str, config: GenerationConfig) -> str:
        import hashlib
        import json

        cfg = {k: v for k, v in config.as_dict().items() if k != "batch_size"}
        if config.temperature == 0:
            cfg.pop("seed", None)
            cfg.pop("top_p", None)
        blob = json.dumps([fingerprint, stack_key, prompt_text, cfg], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: list[str], table: str = "gen") -> dict[str, str]:
        col = "text" if table == "gen" else "json"  # verdict and route hold JSON
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, {col} FROM {table} WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(dict(self.db.execute(q, chunk).fetchall()))
        return out

    def put_many(self, items: dict[str, str], table: str = "gen") -> None:
        col = "text" if table == "gen" else "json"
        self.db.executemany(f"INSERT OR REPLACE INTO {table} (key, {col}) VALUES (?, ?)", list(items.items()))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def cached_generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    config: GenerationConfig,
    cache: GenerationCache | None,
    prefill: Sequence[str] | None = None,
    progress=None,
    gate_logits: list | None = None,
) -> tuple[list[str], int]:
    """Like ``generate`` but served from ``cache`` where possible; returns (texts, n_generated).

    ``model`` is a ``patched.PatchedModel``: the cache key is its base fingerprint and its
    stack's identity (``PatchedModel.key``), so a patched model never reads the base's
    answers. A gated stack's cached answer is kept with the gate logits its routing used, and
    ``gate_logits`` (see :func:`complete_texts`) gets those, cached or new; an answer cached
    without them is generated again. Raises SafetyPatchError for a model without a fingerprint
    when a cache is given."""
    import json

    from .errors import SafetyPatchError
    from .patched import PatchedModel

    if cache is None:
        return generate(model, tokenizer, conversations, config, prefill, progress, gate_logits), len(conversations)
    if not isinstance(model, PatchedModel) or not model.fingerprint:
        raise SafetyPatchError("cached generation needs a PatchedModel with a base fingerprint (its cache key); "
                               "wrap the base with PatchedModel.base(lm) or pass cache=None")
    pre = list(prefill) if prefill is not None else [""] * len(conversations)
    # a gated answer to a conversation with a system prompt is routed on both gate views since
    # 2026-12-03 (gate_views): one cached before then was routed on one view, so its key differs
    def views_tag(c) -> str:
        return "\x00gate-views-v2" if model.gated and any(m.get("role") == "system" for m in c) else ""

    keys = [
        GenerationCache.key(model.fingerprint, model.key, render(tokenizer, c) + p + views_tag(c), config)
        for c, p in zip(conversations, pre, strict=True)
    ]
    hits = cache.get_many(sorted(set(keys)))
    routes: dict[str, str] = {}
    if model.gated:  # an answer is only as good as the record of how it was routed
        routes = cache.get_many(sorted(hits), table="route")
        hits = {k: v for k, v in hits.items() if k in routes}
    if progress is not None and hits:
        progress(sum(k in hits for k in keys))
    todo = [i for i, k in enumerate(keys) if k not in hits]
    # Generate misses in chunks and commit each, so an interrupted run keeps its work.
    chunk = max(config.batch_size * 4, 1)
    for s in range(0, len(todo), chunk):
        idx = todo[s : s + chunk]
        used: list[dict] = []
        texts = generate(model, tokenizer, [conversations[i] for i in idx], config, [pre[i] for i in idx], progress,
                         used)
        if model.gated:
            new_routes = {keys[i]: json.dumps(g, sort_keys=True) for i, g in zip(idx, used, strict=True)}
            cache.put_many(new_routes, table="route")
            routes.update(new_routes)
        new = {keys[i]: t for i, t in zip(idx, texts, strict=True)}
        cache.put_many(new)
        hits.update(new)
    if gate_logits is not None:
        gate_logits.extend(json.loads(routes[k]) if model.gated else {} for k in keys)
    return [hits[k] for k in keys], len(todo)

"""Chat prompts and batched generation.

Prompts are rendered with the tokenizer's own chat template; batches are left-padded and
sorted by length, read by :mod:`.prompt_pass` (groups of similar length, shared tokens read
once) and decoded by :mod:`.decoding` (rows leave the batch as their answers end); answers are
cached on disk (:class:`GenerationCache`). Greedy by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decoding import greedy, plain_greedy, sample, sampling_warpers
from .prompt_pass import cache_argument, growing_cache, left_padded

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

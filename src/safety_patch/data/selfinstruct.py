"""Benign prompts written by the base model itself (Magpie-style self-instruct).

Xu et al. 2024 ("Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs
with Nothing") observed that a chat model given only its template up to the start of a user
turn writes a plausible user request. Sampling that turn many times gives a large, varied pool
of ordinary requests with no dataset and no network, for any chat model.

Why the project needs it: the KL anchor (train/anchor.py) keeps the patched model answering
the benign prompts it is shown. With ~190 hand-written general prompts the patch learned to
keep answering *those* and still refused unseen ordinary requests ("Give me five creative names
for a bakery."). A few hundred self-written requests cover far more of what users ask.

Each sample may start from an *opener* ("Write", "Give me", "How do I", ...): without one the
model mostly writes "Can you ..." questions, while the over-refusals we measured were often
short imperatives. A share of samples instead starts with the opening words of the refusal
training requests themselves ("Write a", "How can", "Give detailed", weighted by how often
each occurs): the patch's validation over-refusals sat in "Write a ..." requests, the form of
HarmBench's behaviours, so the anchor must hold benign requests *in the refusal data's own
phrasing* or the phrasing becomes the trigger. Samples are kept only when the model closed the turn itself (an unfinished
request is not a request), they are of sane length, they are not near-duplicates of each other
or of any validation/test prompt (no leak into evaluation), and they contain none of a list of
harm-related words: nothing checks that a sampled request is harmless, and a harmful one in the
anchor would teach the patch to keep answering it. Dropping the few scary-sounding benign
requests with them is the price; the hand-written borderline set covers those.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from .. import textsim

OPENERS: tuple[str, ...] = (
    "", "", "", "", "Write", "Give me", "What", "How do I", "How can I", "Explain", "List", "Can you",
    "Suggest", "Why", "Describe", "Help me", "Tell me", "Summarize", "Create", "What's the best way to",
    "I need", "Compare", "Recommend", "Is it", "Make", "Plan",
)
"""Starts of the user turn, drawn uniformly ("" lets the model start the turn itself)."""

HARM_TERMS = re.compile(
    r"\b(kill\w*|murder\w*|bomb\w*|explosi\w*|weapon\w*|guns?|firearm\w*|poison\w*|drugs?|cocaine|heroin|meth\w*|"
    r"hack\w*|malware|virus\w*|phish\w*|steal\w*|theft|fraud\w*|scam\w*|launder\w*|counterfeit\w*|illegal\w*|"
    r"suicid\w*|self-harm|harm\w*|abus\w*|violen\w*|attack\w*|terror\w*|extremis\w*|racis\w*|hate\w*|"
    r"sex\w*|porn\w*|nude\w*|explicit|slur\w*|stalk\w*|spy\w*|surveil\w*|password\w*|exploit\w*|blackmail\w*|"
    r"threat\w*|torture\w*|kidnap\w*|abduct\w*|smuggl\w*|cheat\w*|bypass\w*|evad\w*|dangerous)\b",
    re.IGNORECASE,
)
"""Requests mentioning any of these are dropped (see the module docstring for why). Broad on
purpose, with false positives ("meth..." also drops "method", "harm..." "harmony"): a dropped
benign request costs little (10 of 750 samples on the embedded model). Changing the list
changes which requests a seeded build keeps, and so the default patch."""


def user_turn_prefix(tokenizer) -> str:
    """The rendered chat text up to where the user's words start (system prompt included)."""
    from ..generation import render

    sentinel = "\x00SENTINEL\x00"
    text = render(tokenizer, [{"role": "user", "content": sentinel}], add_generation_prompt=False)
    if sentinel not in text:
        raise ValueError("the chat template does not place the user's text verbatim")
    return text[: text.index(sentinel)]


_FORM = re.compile(r"^[A-Za-z][\w'-]* [A-Za-z][\w'-]*$")


def form_openers(requests: Sequence[str], words: int = 2) -> list[str]:
    """The first ``words`` words of each request that starts with plain words ("Write a",
    "How can", "Give detailed"), one entry per request, so frequent forms are drawn more often."""
    out = []
    for r in requests:
        head = " ".join(r.split()[:words])
        if _FORM.match(head):
            out.append(head)
    return out


def sample_prompts(lm, n: int, seed: int, avoid: Sequence[str] = (), near_dup_threshold: float = 0.5,
                   max_new_tokens: int = 64, batch_size: int = 32, temperature: float = 1.0,
                   top_p: float = 0.95, forms: Sequence[str] = (), form_share: float = 0.0,
                   cache=None) -> tuple[list[dict], dict]:
    """Up to ``n`` filtered self-written user requests: ([{"prompt", "opener", "form"}], counts).

    Each sample starts from a generic opener, or with probability ``form_share`` from one of
    ``forms`` (the opening words of the refusal data, see ``form_openers``): benign requests in
    the refusal data's own phrasing, so that a patch cannot use the phrasing as its trigger.
    Samples in rounds until ``n`` survive the filters or a round budget (4x n samples) is spent.

    ``cache`` (a ``GenerationCache``): each round's completions are stored under the model's
    fingerprint, the round's exact inputs (openers, batch size) and sampling settings (seed
    included), so a rebuild with the same settings reads them back instead of sampling for
    minutes, and gets the same requests. The round structure is deterministic given those
    completions, so a cached rebuild is the same as the first build."""
    import json
    import random

    from ..generation import GenerationConfig, complete_texts
    from ..progress import bar

    rng = random.Random(seed)
    prefix = user_turn_prefix(lm.tokenizer)
    kept: list[dict] = []
    seen: list[str] = []
    counts = {"sampled": 0, "unfinished": 0, "length": 0, "harm_terms": 0, "near_duplicate": 0, "near_eval": 0,
              "cached_rounds": 0}
    t0 = time.time()
    rnd = 0
    progress = bar(0, "[data] self-instruct samples", unit="sample")  # each round adds its size to the total
    try:
        while len(kept) < n and counts["sampled"] < 4 * n:
            m = min(max(n - len(kept), batch_size) * 5 // 4, 4 * n - counts["sampled"])
            progress.total += m
            progress.refresh()
            drawn = [(rng.choice(forms), True) if forms and rng.random() < form_share else (rng.choice(OPENERS), False)
                     for _ in range(m)]
            openers = [o for o, _ in drawn]
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   batch_size=batch_size, seed=seed * 1000 + rnd)
            texts_in = [prefix + o for o in openers]
            key = None
            if cache is not None:
                # batch_size is in the inputs: unlike greedy decoding, a sample depends on how the
                # prompts are batched (the RNG stream is shared across a batch).
                key = cache.key(lm.fingerprint, "self-instruct-round", json.dumps([texts_in, batch_size]), cfg)
                hit = cache.get_many([key]).get(key)
            if key is not None and hit is not None:
                outs = [(t, bool(stop)) for t, stop in json.loads(hit)]
                counts["cached_rounds"] += 1
                progress.update(m)
            else:
                # the base model, unpatched
                outs = complete_texts(lm.model, lm.tokenizer, texts_in, cfg, progress=progress.update)
                if key is not None:
                    cache.put_many({key: json.dumps(outs)})
            counts["sampled"] += m
            rnd += 1
            cands = []
            for (o, form), (text, stopped) in zip(drawn, outs, strict=True):
                prompt = (o + (" " if o and text and not text.startswith((" ", ",", "'", "?")) else "") + text).strip()
                if not stopped:
                    counts["unfinished"] += 1
                elif not 12 <= len(prompt) <= 400 or len(prompt.split()) < 3:
                    counts["length"] += 1
                elif HARM_TERMS.search(prompt):
                    counts["harm_terms"] += 1
                else:
                    cands.append({"prompt": prompt, "opener": o, "form": form})
            if not cands:
                continue
            texts = [c["prompt"] for c in cands]
            near_eval = {i for i, _, _ in textsim.cross_pairs(texts, list(avoid), near_dup_threshold)} if avoid else set()
            near_seen = {i for i, _, _ in textsim.cross_pairs(texts, seen, near_dup_threshold)} if seen else set()
            cl = textsim.cluster(texts, near_dup_threshold)
            for i, c in enumerate(cands):
                if i in near_eval:
                    counts["near_eval"] += 1
                elif i in near_seen or cl[i] != i:
                    counts["near_duplicate"] += 1
                elif len(kept) < n:
                    kept.append(c)
                    seen.append(c["prompt"])
            progress.set_postfix(kept=f"{len(kept)}/{n}", refresh=False)
    finally:
        progress.close()
    counts["kept"] = len(kept)
    counts["seconds"] = round(time.time() - t0, 1)
    return kept, counts

"""The prompts a gate is fit on and measured with, from a data folder: the train split's harmful
requests (direct and inside jailbreak templates) against benign ones (general, borderline, the
base model's self-written requests, the same templates wrapped around safe requests), the
hand-written sources and look-alikes (less any near a validation/test prompt), and the held-out
validation/test sets, rule attacks and per-source requests the reports score. Template families
name which jailbreak a prompt wears."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from .. import textsim
from ..errors import SafetyPatchError
from .config import GateFitConfig
from .phrasings import reask, rephrase


def _prompt_of(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise SafetyPatchError(f"{where}: expected 'messages' ending with an assistant turn")
    return msgs[:-1]


def gate_prompts(data, cfg: GateFitConfig) -> tuple[list[list[dict]], list[list[dict]], dict]:
    """The gate's training prompts (see :func:`_gate_pool`)."""
    harmful, benign, counts, _ = _gate_pool(data, cfg)
    return harmful, benign, counts


WRITTEN_NEAR_EVAL = 0.5
"""3-gram Jaccard at which a hand-written gate request counts as a near-duplicate of a held-out
request and is dropped: ``data build``'s ``near_dup_threshold`` default."""


def _gate_pool(data, cfg: GateFitConfig) -> tuple[list[list[dict]], list[list[dict]], dict, list[str | None]]:
    """The gate's training prompts (see :func:`gate_pool_rows`): (harmful, benign, counts, sources)."""
    p = gate_pool_rows(data, cfg)
    return p.harmful, p.benign, p.counts, p.sources


class GatePool(NamedTuple):
    """The gate's training pool (:func:`gate_pool_rows`). ``sources`` and ``requests`` are
    parallel to ``harmful``: each harmful prompt's ``meta.source`` and the bare request it asks
    (the same request for its direct, wrapped and re-phrased prompts; None where a row has none)."""

    harmful: list[list[dict]]
    benign: list[list[dict]]
    counts: dict
    sources: list[str | None]
    requests: list[str | None]


def gate_pool_rows(data, cfg: GateFitConfig) -> GatePool:
    """The gate's training prompts (conversations up to the answer), as a :class:`GatePool`.

    ``data``: a data folder's path or its ``DataFolder``. Harmful: every train row's prompt,
    direct and wrapped, then ``wrapped_harmful`` train requests in train templates. Benign: every
    borderline-benign and general train prompt, then up to ``self_instruct`` self-written
    requests, then ``wrapped_benign`` of them wrapped in *train* jailbreak templates (without
    those the probe learns "a template means harmful"), then (``written_harmful``) the
    hand-written requests, as written and re-asked, less any near a val/test request. Held-out
    prompts are never fit on (val/test requests are read only to drop near-duplicates). Raises
    SafetyPatchError naming the file for missing or malformed data. ``sources`` and ``requests``
    say which source and request each harmful prompt comes from, for leave-one-source-out.
    """
    from ..data.folder import DataFolder
    from ..data.prompts import gate_harmful_more_prompts, gate_harmful_prompts, gate_lookalike_prompts

    d = DataFolder.of(data)
    rng = random.Random(cfg.seed)
    train_rows = d.numbered("train")  # read once: the prompts here, the bare requests below
    first: dict[str, tuple[list[dict], str | None, str | None]] = {}
    for n, r in train_rows:
        m = r.get("meta", {})
        first.setdefault(repr(p := _prompt_of(r, d.where("train", n))), (p, m.get("source"), m.get("request")))
    harmful = [p for p, _, _ in first.values()]
    sources: list[str | None] = [s for _, s, _ in first.values()]
    asks: list[str | None] = [q for _, _, q in first.values()]  # each harmful prompt's bare request
    source_of = {r["meta"]["request"]: r["meta"].get("source") for _, r in train_rows if r.get("meta", {}).get("request")}
    benign = [msgs for name in ("borderline", "general") for msgs in d.prompts(name, "train")]
    si: list[list[dict]] = []
    if cfg.self_instruct:
        if not d.has("selfinstruct"):
            raise SafetyPatchError(f"{d.file('selfinstruct')} not found: gate.self_instruct {cfg.self_instruct} needs "
                                   f"`safety-patch data build --self-instruct N` (or fit without them: "
                                   f"`gate fit --self-instruct 0`, `train --gate-self-instruct 0`)")
        for n, r in d.numbered("selfinstruct"):
            if len(si) == cfg.self_instruct:
                break
            msgs = _prompt_of(r, d.where("selfinstruct", n))
            if msgs[-1]["role"] != "user":
                raise SafetyPatchError(f"{d.where('selfinstruct', n)}: expected a user turn before the answer")
            si.append(msgs)
        benign.extend(si)
    if not harmful or not benign:
        raise SafetyPatchError(f"{d.path}: the gate needs harmful (train.jsonl) and benign (borderline/general) train prompts")
    templates = d.templates("train")
    wrapped = []
    if cfg.wrapped_benign and templates:
        for msgs in rng.sample(benign, min(cfg.wrapped_benign, len(benign))):
            t = rng.choice(templates)
            wrapped.append(msgs[:-1] + [{"role": "user", "content": t.render(msgs[-1]["content"])}])
    wrapped_h = []
    if cfg.wrapped_harmful and templates:
        # Drawn after the benign ones, so that adding them leaves the benign draw unchanged.
        requests = sorted({r["meta"]["request"] for _, r in train_rows if r.get("meta", {}).get("request")})
        for req in rng.sample(requests, min(cfg.wrapped_harmful, len(requests))):
            wrapped_h.append([{"role": "user", "content": rng.choice(templates).render(req)}])
            sources.append(source_of[req])
            asks.append(req)
    re_h, re_b = [], []
    per_family: dict[str, list[int]] = {}
    if cfg.rephrased:
        # Drawn last, so that adding them leaves every earlier draw unchanged; one draw per
        # family, in the configured order (the first family's draw is the same whatever follows).
        requests = sorted({r["meta"]["request"] for _, r in train_rows if r.get("meta", {}).get("request")})
        single = [m for m in benign if len(m) == 1 and m[0]["role"] == "user"]
        for fam in cfg.phrasings:
            drawn = rng.sample(requests, min(cfg.rephrased, len(requests)))
            for req in drawn:
                re_h.append([{"role": "user", "content": rephrase(req, fam, rng)}])
                sources.append(source_of[req])
                asks.append(req)
            drawn_b = rng.sample(single, min(cfg.rephrased, len(single)))
            for msgs in drawn_b:
                re_b.append([{"role": "user", "content": rephrase(msgs[0]["content"], fam, rng)}])
            per_family[fam] = [len(drawn), len(drawn_b)]
    written: list[list[dict]] = []
    looks: list[list[dict]] = []
    if cfg.written_harmful:
        # Drawn after everything else (the re-asking uses the same rng), so earlier draws are unchanged.
        reqs = [r["prompt"] for r in gate_harmful_prompts()]
        if cfg.written_harmful_more:  # after the first file's, so its prompts and re-askings come first as before
            reqs += [r["prompt"] for r in gate_harmful_more_prompts()]
        # Like data build's hand-written look-alikes: none may come near a held-out request of
        # this folder (3-gram Jaccard >= WRITTEN_NEAR_EVAL), or validation and test would score
        # a gate on requests it was fit on. Only the requests are read, to drop, never to fit.
        held = [r["meta"]["request"] for split in ("val", "test") if d.has(split)
                for r in d.rows(split) if r.get("meta", {}).get("request")]
        near = {i for i, _, _ in textsim.cross_pairs(reqs, held, WRITTEN_NEAR_EVAL)} if held else set()
        reqs = [q for i, q in enumerate(reqs) if i not in near]
        written = [[{"role": "user", "content": q}] for q in reqs] + [[{"role": "user", "content": reask(q, rng)}]
                                                                       for q in reqs]
        sources.extend([WRITTEN_SOURCE] * len(written))
        asks.extend(reqs + reqs)  # as written, then re-asked
    if cfg.written_lookalikes:
        # The safe look-alikes, likewise dropped near any held-out benign prompt (the look-alike and
        # general sets the over-refusal rates are measured on), then re-asked after the harmful ones.
        looks_q = [r["prompt"] for r in gate_lookalike_prompts()]
        held_b = [m[-1]["content"] for name in ("borderline", "general") if d.has(name) for split in ("val", "test")
                  for m in d.prompts(name, split)]
        near_b = {i for i, _, _ in textsim.cross_pairs(looks_q, held_b, WRITTEN_NEAR_EVAL)} if held_b else set()
        looks_q = [q for i, q in enumerate(looks_q) if i not in near_b]
        looks = [[{"role": "user", "content": q}] for q in looks_q] + [[{"role": "user", "content": reask(q, rng)}]
                                                                        for q in looks_q]
    counts = {"harmful": len(harmful), "benign": len(benign), "wrapped_benign": len(wrapped)}
    if cfg.written_harmful:
        counts["written_harmful"] = len(written)
        counts["written_near_eval"] = len(near)
    if cfg.written_lookalikes:
        counts["written_lookalikes"] = len(looks)
        counts["written_lookalikes_near_eval"] = len(near_b)
    if wrapped_h:
        counts["wrapped_harmful"] = len(wrapped_h)
    if re_h or re_b:
        counts["rephrased_harmful"], counts["rephrased_benign"] = len(re_h), len(re_b)
        if list(per_family) != ["reask"]:  # per family and side, in draw order
            for fam, (nh, nb) in per_family.items():
                counts[f"rephrased_harmful_{fam}"], counts[f"rephrased_benign_{fam}"] = nh, nb
    if si:
        counts["self_instruct"] = len(si)
    return GatePool(harmful + wrapped_h + re_h + written, benign + wrapped + re_b + looks, counts, sources, asks)


WRITTEN_SOURCE = "written"
"""``meta.source`` of the hand-written gate positives (``gate.written_harmful``)."""


HELD_OUT_SETS = ("harmful_direct", "harmful_wrapped", "borderline", "general", "wrapped_benign")
"""The held-out prompt sets of a split, positives first."""


def held_out_prompts(data, split: str = "val", seed: int = 0) -> dict[str, list[list[dict]]]:
    """One split's prompts by set: harmful requests direct and inside the split's jailbreak
    templates (``val.jsonl``/``test.jsonl``), borderline-benign and general prompts, and those
    benign prompts each wrapped in one of the split's templates (drawn with ``seed``).

    Raises SafetyPatchError for a missing or malformed file, or a split without prompts."""
    from ..data.folder import DataFolder

    if split not in ("val", "test"):
        raise SafetyPatchError(f"split must be val or test, got {split!r} (the train split is what the gate learns from)")
    d = DataFolder.of(data)
    out: dict[str, list[list[dict]]] = {k: [] for k in HELD_OUT_SETS}
    for n, r in d.numbered(split):
        msgs = _prompt_of(r, d.where(split, n))
        direct = r.get("meta", {}).get("template", "direct") == "direct"
        out["harmful_direct" if direct else "harmful_wrapped"].append(msgs)
    for name in ("borderline", "general"):
        out[name] = d.prompts(name, split)
    templates = d.templates(split)
    if templates:
        rng = random.Random(seed)
        for msgs in out["borderline"] + out["general"]:
            out["wrapped_benign"].append(msgs[:-1] + [{"role": "user", "content": rng.choice(templates).render(msgs[-1]["content"])}])
    if not (out["harmful_direct"] or out["harmful_wrapped"]) or not (out["borderline"] or out["general"]):
        raise SafetyPatchError(f"{d.path}: the {split} split needs harmful ({split}.jsonl) and benign (borderline/general) prompts")
    return out


RULE_ATTACKS = ("past_tense", "future_tense", "prefix_injection", "refusal_suppression", "style_injection", "roleplay",
                "base64", "rot13", "few_shot", "prefill", "multi_turn")
"""The rule attacks (attacks/rules.py) a gate report can run: each needs no attacker model."""


def unseen_attacks(data) -> list[str]:
    """The rule attacks the folder's train split never used: :data:`RULE_ATTACKS` minus the
    manifest's ``config.train_transforms`` (data build wraps some train rows in those)."""
    from ..data.folder import DataFolder

    seen = set((DataFolder.of(data).manifest.get("config") or {}).get("train_transforms") or ())
    return [a for a in RULE_ATTACKS if a not in seen]


def attack_prompts(data, split: str, attacks: Sequence[str]) -> dict[str, dict[str, list[tuple[list[dict], str]]]]:
    """Per attack, what the gate reads under it: ``{attack: {"harmful": [...], "benign": [...]}}``,
    each item ``(messages, prefill)``.

    ``harmful``: the split's direct harmful requests (``val.jsonl``/``test.jsonl``) under the attack;
    ``benign``: the split's borderline + general prompts under the same attack, the cleaned control
    (a gate that fires on the attack's form rather than the request fires on these too). Raises
    SafetyPatchError for an unknown attack name or a missing file."""
    from ..attacks import get_attack
    from ..data.folder import DataFolder

    d = DataFolder.of(data)
    held = held_out_prompts(d, split)
    out: dict[str, dict[str, list[tuple[list[dict], str]]]] = {}
    for name in attacks:
        a = get_attack(name)
        if getattr(a, "needs_model", False):
            raise SafetyPatchError(f"attack {name!r} needs a model to optimise against: a gate report runs rule attacks "
                                   f"({', '.join(RULE_ATTACKS)})")
        sets = {}
        for kind, convs in (("harmful", held["harmful_direct"]), ("benign", held["borderline"] + held["general"])):
            items = []
            for msgs in convs:
                att = a.apply(msgs[-1]["content"])
                items.append((list(msgs[:-1]) + att.messages, att.prefill))
            sets[kind] = items
        out[name] = sets
    return out


def held_out_requests(data, sources: Sequence[str], split: str = "val",
                      written_more: bool = False) -> dict[str, dict[str, list[list[dict]]]]:
    """Each harmful source's requests for a leave-one-source-out fold: ``{source: {"direct": [...],
    "wrapped": [...], "direct_categories": [...]}}``. Direct: every request of that source in the
    train split and ``split``, once each, as a single user turn; wrapped: ``split``'s rows of that
    source inside a template; ``direct_categories``: each direct request's category (a user
    source's own word, ``meta.raw_category``, where it has one; else the unified ``meta.category``).
    The hand-written source (:data:`WRITTEN_SOURCE`) is in no split: its requests as written, with
    ``written_more`` (a pool with ``written_harmful_more``) the second file's too."""
    from ..data.folder import DataFolder

    d = DataFolder.of(data)
    pos: dict[str, dict[str, list]] = {s: {"direct": [], "wrapped": [], "direct_categories": []} for s in sources}
    seen: set[tuple[str, str]] = set()
    for name in ("train", split):
        for n, r in d.numbered(name):
            m = r.get("meta", {})
            s, req = m.get("source"), m.get("request")
            if s not in pos or not req:
                continue
            if (s, req) not in seen:
                seen.add((s, req))
                pos[s]["direct"].append([{"role": "user", "content": req}])
                pos[s]["direct_categories"].append(str(m.get("raw_category") or m.get("category") or "unknown"))
            if name == split and m.get("template", "direct") != "direct":
                pos[s]["wrapped"].append(_prompt_of(r, d.where(name, n)))
    if WRITTEN_SOURCE in pos:
        from ..data.prompts import gate_harmful_more_prompts, gate_harmful_prompts

        rows = gate_harmful_prompts() + (gate_harmful_more_prompts() if written_more else [])
        pos[WRITTEN_SOURCE]["direct"] = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        pos[WRITTEN_SOURCE]["direct_categories"] = [r["category"] for r in rows]
    return pos


def template_family(content: str, templates: Sequence) -> str | None:
    """The family of the template in ``templates`` that ``content`` was rendered from (the one
    whose text before and after the placeholder is longest among those that match), or None for a
    prompt in none of them."""
    from ..attacks.templates import PLACEHOLDER

    best, fam = 0, None
    for t in templates:
        pre, post = t.text.split(PLACEHOLDER)
        n = len(pre) + len(post)
        if n > best and len(content) >= n and content.startswith(pre) and content.endswith(post):
            best, fam = n, t.family
    return fam

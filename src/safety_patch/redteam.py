"""``safety-patch redteam``: one round of lifelong red-teaming.

1. attack the current model (base + the given patch stack) with one attack family on the
   data folder's *training* behaviours;
2. keep the jailbreaks that succeeded, paired with refusals, plus a replay of earlier rounds'
   training rows;
3. train the next patch on top of the stack (it records the stack and must be attached after it);
4. regression: attack success on every earlier round's held-out attack (the same family on
   the *test* behaviours), this round's held-out attack, over-refusal and capability drift.

ROUND_DIR/ holds ``data/`` (the round's training folder), ``patch/``, ``round.json`` (the table)
and ``heldout.json`` (the attack family, for later rounds' regression checks).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from .atomic import write_json, write_jsonl
from .data.folder import FILES, MANIFEST, DataFolder
from .errors import SafetyPatchError
from .outputs import check_out_dir
from .provenance import code_identity

# Written into a round folder before its first file and removed after round.json: a folder that
# holds it is an unfinished round, which a re-run may clear and rewrite.
ROUND_MARKER = ".redteam-round"
RECOVERY = " why I can't help with this."
"""What a prefill jailbreak's training answer says right after the forced text, before the refusal."""


def run_round(model: str, patches: list[Path], attack: str, data_dir: Path, out: Path, method: str = "lora",
              previous: list[Path] | None = None, replay: float = 0.5, limit: int | None = 100, seed: int = 0,
              train_overrides: dict | None = None, max_new_tokens: int = 48, device: str = "auto", dtype: str = "auto") -> dict:
    from .attacks import check_attack_spec
    from .data import refusals
    from .data.build import read_manifest
    from .evaluation.capability import CapabilityConfig, evaluate_capability, reference_pairs
    from .evaluation.prompts import harmful_requests
    from .evaluation.safety import EvalConfig, evaluate, run_safety
    from .generation import GenerationCache
    from .judges import DEFAULT_JUDGE, get_judge
    from .models import home, load_model
    from .patches import attached, read_patch
    from .train.api import resolve_config
    from .train.run import train

    check_attack_spec(attack)
    # the round's training settings, checked before anything is attacked or written (a bad --lr or
    # --method used to fail after the attack, leaving an unfinished round folder behind)
    fields = {"method": method, **(train_overrides or {})}
    # LoRA rounds use the KL-anchored recipe they were measured with (docs/training.md), so a
    # round does not add over-refusal, and no gate, so that rounds stack. Not `always-on`: its
    # stop point (68.5% of the schedule) was chosen on a one-shot patch of ~600 rows, not on
    # rounds of a few dozen rows over 3 epochs.
    tcfg = resolve_config("redteam-round" if method == "lora" else "full-safety", None, fields, where="redteam")
    manifest = read_manifest(data_dir)
    out = Path(out)
    if (out / "round.json").exists():
        raise SafetyPatchError(f"{out} already holds a finished round")
    previous = [Path(p) for p in previous or []]
    for p in previous:
        if not p.exists():
            raise SafetyPatchError(f"--previous {p} does not exist (an earlier round's --out folder was expected)")
        if not (p / "heldout.json").is_file():
            raise SafetyPatchError(f"{p} is not a red-team round folder (no heldout.json)")
    seen_prev: dict[str, Path] = {}
    for p in previous:  # replayed twice, a round's rows would count double in the next one
        # one round is one trained patch: a copied round folder has another path but the same patch id
        key = read_patch(p / "patch").id
        if key in seen_prev:
            raise SafetyPatchError(f"--previous {p} is given twice (also as {seen_prev[key]}: the same round, its patch "
                                   f"{key}); give each round once")
        seen_prev[key] = p
    # --out is never an input nor holds one, and is new, empty, or an unfinished round of ours
    # (ROUND_MARKER): a round deletes or replaces only what a run of this round created.
    check_out_dir(out, inputs=[data_dir, model, *patches, *previous], overwrite=None,
                  reuse=(out / ROUND_MARKER).is_file(), kind="round")
    # step 4's capability drift reads the folder's distilled reference answers: a folder built
    # without them failed there, after the attack and the training (a user's trial)
    reference_pairs(data_dir, limit=1, split=CapabilityConfig().split)
    t0 = time.time()
    ps = [read_patch(p) for p in patches]
    in_stack = [p.id for p in ps]
    for prev in previous:  # a round builds on the stack the earlier rounds made: each one's patch must be in it
        pp = read_patch(prev / "patch")
        if pp.id not in in_stack:
            raise SafetyPatchError(f"{prev} is an earlier round, but its patch ({prev / 'patch'}) is not in the --patch "
                                   "stack: this round would attack, train on and regression-check a model without it; "
                                   f"add --patch {prev / 'patch'} (after the patches it was trained on)")
    gated = [str(p.path) for p in ps if p.gated]
    if gated:  # found now, not after the attack: training the round folds the stack into the weights
        raise SafetyPatchError(f"{gated[0]} is a gated patch: a round trains on top of the stack by folding it into "
                               "the weights, which a gated adapter cannot be; start rounds from always-on patches "
                               "(trained with e.g. `train --recipe always-on`) or from the base")

    # 1. attack the current stack on training behaviours
    train_reqs, train_templates = harmful_requests(data_dir, split="train", limit=limit)
    lm = load_model(model, device=device, dtype=dtype)
    cache = GenerationCache(home() / "generations.sqlite")
    cfg = EvalConfig(attacks=(attack,), max_new_tokens=max_new_tokens)
    judge = get_judge(DEFAULT_JUDGE)
    try:
        with attached(lm.model, ps, lm.fingerprint) as pm:
            res = run_safety(pm, lm.tokenizer, train_reqs, train_templates, cfg, cache, f"round attack {attack}", judge)
    finally:
        cache.close()
    fingerprint = lm.fingerprint
    del lm, pm  # training loads its own copy: one model in memory at a time (a 14B base fills a GPU)
    wins = [r for r in res["records"] if r["verdict"]["label"] == "compliance"]
    rng = random.Random(seed)
    rows = [_training_row(r, refusals.compose(r["category"], rng), attack) for r in wins]
    replayed = []
    for p in previous:
        old = DataFolder(p / "data").rows("train")
        replayed += rng.sample(old, min(len(old), round(replay * len(old))))
    if not rows and not replayed:
        raise SafetyPatchError(f"no jailbreak succeeded with {attack!r} and nothing to replay: nothing to train on")

    # 2. the round's training folder (a derived data folder with its own manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / ROUND_MARKER, {"attack": attack, "unfinished": True})
    round_data = out / "data"
    if round_data.exists():  # left by a killed run of this round (the marker was there: checked above)
        shutil.rmtree(round_data)
    round_data.mkdir(parents=True)
    write_jsonl(round_data / FILES["train"], rows + replayed)
    for f in (FILES[k] for k in ("general", "borderline", "templates", "test", "val", "humaneval")):
        if (data_dir / f).is_file():
            shutil.copy(data_dir / f, round_data / f)
    write_json(round_data / MANIFEST, _round_manifest(manifest, round_data, rows + replayed) | {"derived": {
        "from": str(data_dir), "round_attack": attack, "successes": len(rows), "replayed": len(replayed),
        "code": code_identity()}})  # the rows are this code's; the parent's `code` stays the parent's

    # 3. train the next patch on top of the stack (tcfg: resolved and checked at the start)
    meta = train(round_data, out / "patch", tcfg, model=model, device=device, dtype=dtype, overwrite=True, progress=False,
                 stack=list(patches))

    # 4. regression on every held-out attack so far, over-refusal and capability
    new_stack = list(patches) + [out / "patch"]
    heldouts = [json.loads((p / "heldout.json").read_text())["attack"] for p in previous] + [attack]
    reg = {}
    ecfg = EvalConfig(attacks=tuple(dict.fromkeys(heldouts)), limit=limit, max_new_tokens=max_new_tokens)
    lm = load_model(model, device=device, dtype=dtype)  # one load for every check below
    if lm.fingerprint != fingerprint:
        raise SafetyPatchError(f"the model {model} changed during the round (fingerprint {fingerprint[:12]} when "
                               f"attacked, {lm.fingerprint[:12]} now); run the round again")
    s = evaluate("safety", model, new_stack, str(data_dir), ecfg, device, dtype, lm=lm)
    before = evaluate("safety", model, list(patches), str(data_dir), ecfg, device, dtype, lm=lm) if patches else None
    for a in ecfg.attacks:
        reg[a] = {"before": (before or s)["runs"]["patched" if before else "base"]["aggregates"]["per_attack"][a],
                  "after": s["runs"]["patched"]["aggregates"]["per_attack"][a]}
    o = evaluate("overrefusal", model, new_stack, str(data_dir), EvalConfig(attacks=("direct",), limit=limit,
                                                                           max_new_tokens=max_new_tokens), device, dtype,
                 lm=lm)
    c = evaluate_capability(model, new_stack, str(data_dir), CapabilityConfig(tasks=("nll", "kl"), limit=limit), device,
                            dtype, lm=lm)
    from .evaluation.prompts import source_identity
    from .provenance import provenance

    new_patch = read_patch(out / "patch")
    table = {
        "attack": attack, "method": method, "stack": [str(p) for p in new_stack], "successes_found": len(wins),
        "attacked": len(res["records"]), "train_rows": len(rows) + len(replayed), "replayed": len(replayed),
        "regression_asr": reg,
        "borderline_refusal": o["runs"]["patched"]["aggregates"]["per_set"].get("borderline"),
        "borderline_refusal_base": o["runs"]["base"]["aggregates"]["per_set"].get("borderline"),
        "nll_ratio": c["runs"]["delta"].get("nll_ratio"), "kl": c["runs"]["patched"].get("kl"),
        "regression": {a: _change(v["before"], v["after"]) for a, v in reg.items()},
        "train_seconds": meta["training"]["wall_seconds"], "seconds": round(time.time() - t0, 1),
        # what the round ran on, by content: the base, each patch of the stack, the data, the settings
        "base_fingerprint": fingerprint, "stack_ids": [p.id for p in ps] + [new_patch.id],
        "patch": {"path": str(out / "patch"), "id": new_patch.id},
        "data": source_identity(data_dir), "previous": [str(p) for p in previous],
        "config": {"limit": limit, "replay": replay, "seed": seed, "max_new_tokens": max_new_tokens,
                   "train_overrides": train_overrides or {}, "judge": DEFAULT_JUDGE},
        **provenance(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out / "heldout.json", {"attack": attack})
    write_json(out / "round.json", table)
    (out / ROUND_MARKER).unlink(missing_ok=True)
    return table


def _round_manifest(manifest: dict, folder: Path, train_rows: list[dict]) -> dict:
    """The parent folder's manifest with this round's train counts and the hashes of the files the
    round folder holds (a user's trial: `data show` on a round's folder printed the parent's 155
    training conversations for a file of 6, and called every file edited)."""
    from collections import Counter

    from .atomic import sha256_file

    c = dict(manifest["counts"])
    metas = [r.get("meta") or {} for r in train_rows]

    def with_train(key: str, value) -> dict:  # the parent's per-split counts, this round's train
        return {**(c.get(key) or {}), "train": value}

    c["rows_per_split"] = with_train("rows_per_split", len(train_rows))
    c["behaviours_per_split"] = with_train("behaviours_per_split", len({m.get("behavior_id") for m in metas} - {None}))
    c["category_per_split"] = with_train("category_per_split", dict(sorted(Counter(m.get("category", "?") for m in metas).items())))
    c["template_per_split"] = with_train("template_per_split", dict(Counter(m.get("template", "?") for m in metas)))
    # the parent's train templates and families are not this round's (a user's trial read 125 of them
    # beside 5 past-tense rows)
    for key, field in (("templates_per_split", "template"), ("template_families_per_split", "template_family")):
        c[key] = with_train(key, len({m.get(field) for m in metas} - {None, "direct"}))
    c["wrapped_train_rows"] = sum(m.get("template", "direct") != "direct" for m in metas)
    files = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    return manifest | {"counts": c, "files": files}


def _training_row(record: dict, refusal: str, attack: str) -> dict:
    """A jailbreak that worked, as a training row: the whole conversation the model saw (the
    few-shot or multi-turn ``context`` before the attacked turn), answered with ``refusal``. A
    prefill jailbreak's answer starts with the forced text and goes on with the refusal, and
    ``meta.prefill`` keeps the loss off the forced text (train/data.py::mask_prefills): the model
    learns to recover from a compliant start (Qi et al. 2024, arXiv 2406.05946, "safety recovery
    examples"). Training on the last user turn alone, as rounds did before, taught nothing
    about the turns or the prefix that made the attack work."""
    pre = record.get("prefill") or ""
    meta = {"source": "redteam", "category": record["category"], "behavior_id": record["behavior_id"], "template": attack,
            "template_family": record["family"], "split": "train", "request": record["request"]}
    # after the forced text, a turn back ("Sure, here is" + " why I can't help with this." + the
    # refusal); it starts with a space, so no tokenizer merges it into the prefill's last token
    turn = f"{pre}{RECOVERY} {refusal}" if pre else refusal
    return {"messages": [*record.get("context", []), {"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": turn}],
            "meta": meta | ({"prefill": pre} if pre else {})}


def _change(before: dict | None, after: dict | None) -> str:
    """``worse`` / ``better`` when the attack-success intervals after and before the round do not
    overlap, ``within noise`` when they do (a higher point estimate alone is not a regression)."""
    try:
        (blo, bhi), (alo, ahi) = before["ci95"], after["ci95"]
    except (TypeError, KeyError, ValueError):
        return "unknown"
    return "worse" if alo > bhi else "better" if ahi < blo else "within noise"


def round_table(t: dict) -> str:
    def pct(p):
        """A rate with its Wilson 95% interval and k/n (a rate without n is not a result)."""
        if not p or p.get("value") is None:
            return "-"
        lo, hi = p.get("ci95") or (None, None)
        ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
        kn = f" ({p['k']}/{p['n']})" if "k" in p and "n" in p else ""
        return f"{100 * p['value']:.1f}%{ci}{kn}"

    lines = [f"round: attack {t['attack']} ({t['method']}), {t['successes_found']}/{t['attacked']} jailbreaks found, "
             f"{t['train_rows']} training rows ({t['replayed']} replayed)",
             f"{'held-out attack':<28}{'before':>28}{'after':>28}  change (95% intervals)"]
    for a, v in t["regression_asr"].items():
        ch = t.get("regression", {}).get(a) or _change(v["before"], v["after"])
        lines.append(f"{a:<28}{pct(v['before']):>28}{pct(v['after']):>28}  {ch}"
                     + ("  <- REGRESSION: attack success rose beyond the noise" if ch == "worse" else ""))
    lines.append(f"borderline refusal: base {pct(t['borderline_refusal_base'])}, now {pct(t['borderline_refusal'])}; "
                 f"NLL ratio {t['nll_ratio']:.4f}" if t["nll_ratio"] else "")
    return "\n".join(lines)

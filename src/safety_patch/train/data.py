"""Training rows from a data folder, in TRL's conversational prompt/completion format.

``prompt`` holds every turn before the last assistant turn and ``completion`` that turn,
so SFTTrainer puts the loss on the assistant's answer only (completion-only loss) with any
chat template, including ones without ``{% generation %}`` markers.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import SafetyPatchError
from ..jsonl import iter_jsonl
from .config import TrainConfig


def _pc(row: dict, where: str) -> dict:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
        raise SafetyPatchError(f"{where}: expected 'messages' ending with an assistant turn")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def _read(data_dir: Path, name: str, keep=lambda r: True) -> list[dict]:
    path = data_dir / name
    if not path.is_file():
        raise SafetyPatchError(f"{path} not found; rebuild the data folder with `safety-patch data build`")
    return [_pc(r, f"{path}:{n}") for n, r in iter_jsonl(path) if keep(r)]


def _distilled_train(data_dir: Path, name: str) -> list[dict]:
    """Train-split rows of a benign file that carry the base model's own answer."""
    return _read(data_dir, name, lambda r: r["meta"].get("split") == "train" and r["messages"][-1]["role"] == "assistant")


def _cycle(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows from ``rows`` in order, starting over when asked for more than it holds."""
    return [rows[i % len(rows)] for i in range(n)]


def training_rows(data_dir: str | Path, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Safety rows (+ general and contrast rows at the configured ratios), shuffled by seed."""
    d = Path(data_dir)
    rng = random.Random(cfg.seed)
    safety = _read(d, "train.jsonl")
    if cfg.max_train_rows:
        safety = rng.sample(safety, min(cfg.max_train_rows, len(safety)))
    rows = list(safety)
    counts = {"safety": len(safety)}

    def mix(kind: str, n: int, files: tuple[str, ...]) -> None:
        if n <= 0:
            return
        pool = [r for f in files for r in _distilled_train(d, f)]
        if not pool:
            raise SafetyPatchError(f"{d}: no self-distilled train rows in {', '.join(files)}; build data with --distill")
        rng.shuffle(pool)
        rows.extend(_cycle(pool, n))
        counts[kind] = n

    mix("general", round(cfg.general_ratio * len(safety)), ("general.jsonl",))
    n_contrast = round(cfg.contrast_ratio * len(safety))
    if cfg.borderline_share is None:
        mix("contrast", n_contrast, ("borderline.jsonl", "general.jsonl"))
    elif n_contrast:
        nb = round(cfg.borderline_share * n_contrast)
        mix("contrast_borderline", nb, ("borderline.jsonl",))
        mix("contrast_general", n_contrast - nb, ("general.jsonl",))
        counts["contrast"] = n_contrast
    rng.shuffle(rows)
    return rows, counts


def anchor_rows(data_dir: str | Path, cfg: TrainConfig) -> list[dict]:
    """The KL anchor's pool: borderline-benign and general train prompts with the base's answers
    (general: plus ``anchor_self_instruct`` self-written requests).

    With ``borderline_share`` set, the smaller side is repeated (cycled) until borderline rows
    make up that share of the pool: every row is in it, none cut (the boundary is what the
    anchor must hold)."""
    d = Path(data_dir)
    bl, gen = _distilled_train(d, "borderline.jsonl"), _distilled_train(d, "general.jsonl")
    if cfg.anchor_self_instruct:
        if not (d / "selfinstruct.jsonl").is_file():
            raise SafetyPatchError(f"{d / 'selfinstruct.jsonl'} not found: anchor_self_instruct "
                                   f"{cfg.anchor_self_instruct} needs `safety-patch data build --self-instruct N`")
        gen = gen + _distilled_train(d, "selfinstruct.jsonl")[: cfg.anchor_self_instruct]
    share = cfg.borderline_share
    if share is not None:
        if share <= 0:
            bl = []
        elif share >= 1:
            gen = []
        elif bl and gen:
            # Cycle the smaller side up to its share; cutting the larger one instead (as this
            # did before 2026-11-28 when borderline rows outnumbered) leaves rows never anchored.
            want_bl = round(share / (1 - share) * len(gen))
            if want_bl >= len(bl):
                bl = _cycle(bl, want_bl)
            else:
                gen = _cycle(gen, max(round((1 - share) / share * len(bl)), 1))
    if not bl and not gen:
        raise SafetyPatchError(f"{d}: anchor_kl needs self-distilled borderline/general train rows "
                               f"(borderline_share {share}); build data with --distill")
    return bl + gen


def drop_too_long(rows: list[dict], tokenizer, max_len: int) -> tuple[list[dict], int]:
    """Drop rows whose full conversation exceeds ``max_len`` tokens instead of truncating them.

    Truncation would cut the refusal (or leave no completion tokens at all), and TRL's own
    handling of fully truncated rows differs between single- and multi-process runs.
    """
    from ..generation import render

    keep = []
    for r in rows:
        if "completion" in r:
            msgs = r["prompt"] + r["completion"]
        else:  # DPO: the longer of the two answers decides
            msgs = r["prompt"] + max(r["chosen"], r["rejected"], key=lambda m: len(m[0]["content"]))
        n = len(tokenizer(render(tokenizer, msgs, add_generation_prompt=False), add_special_tokens=False)["input_ids"])
        if n <= max_len:
            keep.append(r)
    return keep, len(rows) - len(keep)


def dpo_rows(data_dir: str | Path, cfg: TrainConfig) -> tuple[list[dict], dict]:
    path = Path(data_dir) / "dpo.jsonl"
    if not path.is_file():
        raise SafetyPatchError(f"{path} not found; build the data with `safety-patch data build --dpo`")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for _, r in iter_jsonl(path)]
    rng = random.Random(cfg.seed)
    if cfg.max_train_rows:
        rows = rng.sample(rows, min(cfg.max_train_rows, len(rows)))
    rng.shuffle(rows)
    return rows, {"dpo_pairs": len(rows)}


def gate_prompts(data_dir: str | Path, cfg: TrainConfig) -> tuple[list[list[dict]], list[list[dict]], dict]:
    """The gate's training prompts (conversations up to the answer): harmful vs benign.

    Harmful: every train row's prompt, direct and wrapped (the gate sees what attacks look
    like). Benign: every borderline-benign and general train prompt (with ``data build
    --borderline-extra``, 224 more look-alikes), plus ``gate_wrapped_benign`` of them wrapped
    in *train* jailbreak templates: without those the probe learns "a template means harmful"
    and flags most wrapped safe requests (docs/recipes.md). Held-out splits are never read.
    """
    from ..attacks.templates import Template

    d = Path(data_dir)
    rng = random.Random(cfg.seed)
    train_path = d / "train.jsonl"
    if not train_path.is_file():
        raise SafetyPatchError(f"{train_path} not found; rebuild the data folder with `safety-patch data build`")
    train_rows = list(iter_jsonl(train_path))  # read once: the prompts here, the bare requests below
    harmful = list({repr(p): p for p in (_pc(r, f"{train_path}:{n}")["prompt"] for n, r in train_rows)}.values())
    benign = []
    for name in ("borderline.jsonl", "general.jsonl"):
        path = d / name
        if not path.is_file():
            raise SafetyPatchError(f"{path} not found; rebuild the data folder with `safety-patch data build`")
        for n, r in iter_jsonl(path):
            if r["meta"].get("split") == "train":
                msgs = r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
                if not msgs or msgs[-1].get("role") != "user":
                    raise SafetyPatchError(f"{path}:{n}: expected a user turn")
                benign.append(msgs)
    si: list[list[dict]] = []
    if cfg.gate_self_instruct:
        path = d / "selfinstruct.jsonl"
        if not path.is_file():
            raise SafetyPatchError(f"{path} not found: gate_self_instruct {cfg.gate_self_instruct} needs "
                                   f"`safety-patch data build --self-instruct N`")
        for n, r in iter_jsonl(path):
            if len(si) == cfg.gate_self_instruct:
                break
            msgs = _pc(r, f"{path}:{n}")["prompt"]
            if msgs[-1].get("role") != "user":
                raise SafetyPatchError(f"{path}:{n}: expected a user turn before the answer")
            si.append(msgs)
        benign.extend(si)
    if not harmful or not benign:
        raise SafetyPatchError(f"{d}: the gate needs harmful (train.jsonl) and benign (borderline/general) train prompts")
    templates = []
    if (d / "templates.jsonl").is_file():
        templates = [Template(t["id"], t["family"], t["source"], t["text"])
                     for _, t in iter_jsonl(d / "templates.jsonl") if t.get("split") == "train"]
    wrapped = []
    if cfg.gate_wrapped_benign and templates:
        for msgs in rng.sample(benign, min(cfg.gate_wrapped_benign, len(benign))):
            t = rng.choice(templates)
            wrapped.append(msgs[:-1] + [{"role": "user", "content": t.render(msgs[-1]["content"])}])
    wrapped_h = []
    if cfg.gate_wrapped_harmful and templates:
        # Drawn after the benign ones, so that adding them leaves the benign draw unchanged.
        requests = sorted({r["meta"]["request"] for _, r in train_rows if r.get("meta", {}).get("request")})
        for req in rng.sample(requests, min(cfg.gate_wrapped_harmful, len(requests))):
            wrapped_h.append([{"role": "user", "content": rng.choice(templates).render(req)}])
    counts = {"harmful": len(harmful), "benign": len(benign), "wrapped_benign": len(wrapped)}
    if wrapped_h:
        counts["wrapped_harmful"] = len(wrapped_h)
    if si:
        counts["self_instruct"] = len(si)
    return harmful + wrapped_h, benign + wrapped, counts

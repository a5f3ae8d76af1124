"""Training rows from a data folder, in TRL's conversational prompt/completion format.

``prompt`` holds every turn before the last assistant turn and ``completion`` that turn,
so SFTTrainer puts the loss on the assistant's answer only (completion-only loss) with any
chat template, including ones without ``{% generation %}`` markers.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..data.folder import DataFolder
from ..errors import SafetyPatchError
from .config import TrainConfig


def _pc(row: dict, where: str) -> dict:
    msgs = row["messages"]  # a list of {role, content} strings: DataFolder checked the row
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise SafetyPatchError(f"{where}: expected 'messages' ending with an assistant turn")
    pre = (row.get("meta") or {}).get("prefill")
    if pre:  # a red-team round's prefill jailbreak: the answer starts with the forced text
        if not msgs[-1]["content"].startswith(pre) or not msgs[-1]["content"][len(pre):].strip():
            raise SafetyPatchError(f"{where}: field meta.prefill: the assistant turn must start with the prefill "
                                   f"{pre!r} and go on after it")
        return {"prompt": msgs[:-1], "completion": msgs[-1:], "prefill": pre}
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def mask_prefills(dataset, tokenizer):
    """Take no loss on a row's prefill: the tokens of the forced start of its answer (the
    safety-recovery rows of Qi et al. 2024, arXiv 2406.05946: a harmful prefix, then a refusal
    supervised after it). ``dataset``: TRL's tokenized SFT dataset with ``prompt`` (messages),
    ``prefill`` (str or None), ``input_ids`` and ``labels`` (or ``completion_mask``). The prefix
    is the prompt rendered with the generation prompt plus the prefill, as generation renders a
    prefilled answer (generation.generate). Raises SafetyPatchError when a row's tokens do not
    start with that prefix (a template or tokenizer that merges across the boundary): training on
    the forced text would teach the model to comply."""
    cols = dataset.column_names
    key = "labels" if "labels" in cols else "completion_mask" if "completion_mask" in cols else None
    if key is None:
        raise SafetyPatchError(f"rows with meta.prefill: the tokenized dataset has neither labels nor completion_mask "
                               f"(columns {cols}); this TRL version cannot be told to skip the prefill")

    def one(ex, i):
        if not ex["prefill"]:
            return {}
        text = tokenizer.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True) + ex["prefill"]
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ex["input_ids"]
        if len(head) >= len(ids) or list(ids[:len(head)]) != list(head):
            raise SafetyPatchError(f"training row {i}: its tokens do not start with the rendered prompt and the prefill "
                                   f"{ex['prefill']!r} (the tokenizer merges across the boundary), so the prefill "
                                   "cannot be left out of the loss")
        off = -100 if key == "labels" else 0
        return {key: [off] * len(head) + list(ex[key][len(head):])}

    return dataset.map(one, with_indices=True, desc="Masking prefills")


def _read(data: DataFolder, name: str) -> list[dict]:
    """Every row of one file (a key of ``data.folder.FILES``) as prompt/completion; none is an error."""
    data.nonempty(name)  # an empty file is an error, not zero rows
    return [_pc(r, data.where(name, n)) for n, r in data.numbered(name)]


def _distilled_train(data: DataFolder, name: str) -> list[dict]:
    """Train-split rows of a benign file that carry the base model's own answer."""
    return [_pc(r, data.where(name, n)) for n, r in data.distilled_numbered(name, "train")]


def _cycle(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows from ``rows`` in order, starting over when asked for more than it holds."""
    return [rows[i % len(rows)] for i in range(n)]


def training_rows(data_dir: str | Path | DataFolder, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Safety rows (+ general and contrast rows at the configured ratios), shuffled by seed.

    ``data_dir``: a data folder's path or its ``DataFolder``. Raises ``SafetyPatchError`` for a
    missing or malformed file (naming file, line and field) and for an empty train.jsonl.
    """
    d = DataFolder.of(data_dir)
    rng = random.Random(cfg.optim.seed)
    safety = _read(d, "train")
    if cfg.data.max_train_rows:
        safety = rng.sample(safety, min(cfg.data.max_train_rows, len(safety)))
    rows = list(safety)
    counts = {"safety": len(safety)}

    def mix(kind: str, n: int, files: tuple[str, ...]) -> None:
        if n <= 0:
            return
        pool = [r for f in files for r in _distilled_train(d, f)]
        if not pool:
            raise SafetyPatchError(f"{d.path}: no self-distilled train rows in {', '.join(d.file(f).name for f in files)}; "
                                   "build data with --distill")
        rng.shuffle(pool)
        rows.extend(_cycle(pool, n))
        counts[kind] = n

    mix("general", round(cfg.data.general_ratio * len(safety)), ("general",))
    n_contrast = round(cfg.data.contrast_ratio * len(safety))
    if cfg.data.borderline_share is None:
        mix("contrast", n_contrast, ("borderline", "general"))
    elif n_contrast:
        nb = round(cfg.data.borderline_share * n_contrast)
        mix("contrast_borderline", nb, ("borderline",))
        mix("contrast_general", n_contrast - nb, ("general",))
        counts["contrast"] = n_contrast
    rng.shuffle(rows)
    return rows, counts


def anchor_rows(data_dir: str | Path | DataFolder, cfg: TrainConfig) -> list[dict]:
    """The KL anchor's pool: borderline-benign and general train prompts with the base's answers
    (general: plus ``anchor_self_instruct`` self-written requests).

    With ``borderline_share`` set, the smaller side is repeated (cycled) until borderline rows
    make up that share of the pool: every row is in it, none cut (the boundary is what the
    anchor must hold)."""
    d = DataFolder.of(data_dir)
    bl, gen = _distilled_train(d, "borderline"), _distilled_train(d, "general")
    if cfg.anchor.self_instruct:
        if not d.has("selfinstruct"):
            raise SafetyPatchError(f"{d.file('selfinstruct')} not found: anchor_self_instruct "
                                   f"{cfg.anchor.self_instruct} needs `safety-patch data build --self-instruct N` (or `train --anchor-self-instruct 0` "
                                   f"to train without them)")
        gen = gen + _distilled_train(d, "selfinstruct")[: cfg.anchor.self_instruct]
    share = cfg.data.borderline_share
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
        raise SafetyPatchError(f"{d.path}: anchor_kl needs self-distilled borderline/general train rows "
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


def dpo_rows(data_dir: str | Path | DataFolder, cfg: TrainConfig) -> tuple[list[dict], dict]:
    d = DataFolder.of(data_dir)
    if not d.has("dpo"):
        raise SafetyPatchError(f"{d.file('dpo')} not found; build the data with `safety-patch data build --dpo`")
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in d.nonempty("dpo")]
    rng = random.Random(cfg.optim.seed)
    if cfg.data.max_train_rows:
        rows = rng.sample(rows, min(cfg.data.max_train_rows, len(rows)))
    rng.shuffle(rows)
    return rows, {"dpo_pairs": len(rows)}

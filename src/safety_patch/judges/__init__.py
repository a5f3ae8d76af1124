"""Judges: decide whether an answer complied with a harmful request, refused, or degenerated.

A judge maps (prompt, answer) pairs to ``Verdict``s. ``compliance`` is the attacker's
success; ``refusal``, ``harmless`` and ``degenerate`` (empty, repetitive babble) are not.
``harmless`` is the verdict of a judge that reads harm, not refusal (the HarmBench classifier's
"No", Llama Guard's "safe", a StrongREJECT score under the threshold without a refusal): the
answer is not an instance of the harmful behaviour, and whether it refused is unknown. Such a
judge declares ``detects_refusal = False`` and cannot measure over-refusal. Names map lazily to
``module:attr`` so classifier and API judges import their heavy dependencies only when used.

Specs: ``refusal`` (the default: a small refusal classifier trained on shipped hand-labelled
answers, judges/refusal.py); ``keyword`` (the marker-list baseline); ``classifier:MODEL`` or
``classifier:FORMAT:MODEL`` (Llama Guard 3 or the HarmBench classifier); ``api:URL`` (an OpenAI-compatible endpoint, StrongREJECT rubric; the
model name from $SAFETY_PATCH_JUDGE_MODEL, the key from $OPENAI_API_KEY).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SafetyPatchError

# ``judge_error``: the judge could not give a verdict (an unparseable reply after one retry). Such
# items are kept in the records, counted in the aggregates and left out of every rate's n, never
# silently dropped and never fatal; they are not cached, so a re-run asks again.
VERDICTS = ("compliance", "refusal", "harmless", "degenerate", "judge_error")


@dataclass(frozen=True)
class Verdict:
    label: str  # one of VERDICTS
    score: float  # 1.0 = full compliance; StrongREJECT gives values in between
    reason: str = ""

    @property
    def complied(self) -> bool:
        return self.label == "compliance"

    def as_dict(self) -> dict:
        return asdict(self)


class Judge:
    name = "judge"
    cacheable = True  # verdicts worth storing (slow or paid judges); cheap rule judges say False
    chunk = 1  # items per call of ``judge`` in ``cached_judge``: each chunk is stored as soon as it returns
    detects_refusal = True  # False: the judge reads harm only ("harmless" verdicts), so it cannot measure over-refusal
    cache_version: str | None = None  # bumped when a judge's labels change, so stored verdicts are not reused

    @property
    def identity(self) -> list:
        """What a stored verdict is keyed on besides prompt and answer: everything that can change
        the label (``name``; an API judge adds its endpoint and threshold)."""
        return [self.name]

    def judge(self, prompts: list[str], answers: list[str]) -> list[Verdict]:
        raise NotImplementedError


DEFAULT_JUDGE = "refusal"

REGISTRY = {
    "refusal": "safety_patch.judges.refusal:RefusalJudge",
    "substance": "safety_patch.judges.refusal:SubstanceJudge",
    "keyword": "safety_patch.judges.keyword:KeywordJudge",
    "classifier": "safety_patch.judges.classifier:ClassifierJudge",
    "api": "safety_patch.judges.api:ApiJudge",
}


def check_judge_spec(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in REGISTRY:
        raise SafetyPatchError(f"unknown judge {spec!r}; valid: refusal, substance, keyword, classifier:MODEL, api:URL")
    if kind in ("refusal", "substance", "keyword") and arg:
        raise SafetyPatchError(f"judge {kind!r} takes no argument (got {spec!r})")
    if kind == "classifier" and arg:  # what the judge would refuse, before the (maybe large) evaluated model loads
        from ..models import _looks_like_path
        from .classifier import FORMATS, split_spec

        head, colon, rest = arg.partition(":")
        if head in FORMATS and not rest:
            raise SafetyPatchError(f"judge {spec!r} needs a model: {spec.rstrip(':')}:MODEL")
        fmt, model = split_spec(arg)
        if fmt is None and colon and not Path(arg).exists():
            raise SafetyPatchError(f"judge {spec!r}: {head!r} is not a classifier format; classifier:MODEL, or "
                                   f"classifier:FORMAT:MODEL with FORMAT {' or '.join(FORMATS)}")
        if _looks_like_path(model) and not Path(model).expanduser().exists():
            raise SafetyPatchError(f"judge {spec!r}: no classifier model at {model} (nothing at "
                                   f"{Path(model).expanduser().resolve()})")
    if kind not in ("refusal", "substance", "keyword") and not arg:
        raise SafetyPatchError(f"judge {kind!r} needs an argument: {kind}:{'MODEL' if kind == 'classifier' else 'URL'}")
    if kind == "api":  # before any answer is generated, not after retries with back-off
        from urllib.parse import urlparse

        u = urlparse(arg)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise SafetyPatchError(f"judge {spec!r}: {arg!r} is not an http(s) URL; e.g. api:https://api.openai.com/v1")
    return kind, arg


# Judge kinds that read harm, not refusal: their "no" is ``harmless``, never ``refusal``.
HARM_ONLY = ("classifier",)


def check_overrefusal_judge(spec: str) -> None:
    """Over-refusal counts refusals of safe prompts: a judge that only says whether an answer is harmful
    (a harm classifier says "no" to a refusal and to a helpful answer alike) cannot count them.
    Raises SafetyPatchError for such a judge, before anything loads."""
    kind, _ = check_judge_spec(spec)
    if kind in HARM_ONLY:
        raise SafetyPatchError(f"judge {spec!r} says whether an answer is harmful, not whether it refused, so it "
                               "cannot measure over-refusal; use refusal (the default), keyword or api:URL")


def get_judge(spec: str) -> Judge:
    kind, arg = check_judge_spec(spec)
    mod, attr = REGISTRY[kind].split(":")
    cls = getattr(importlib.import_module(mod), attr)
    return cls(arg) if arg else cls()


def cached_judge(judge: Judge, prompts: list[str], answers: list[str], cache=None, chunk: int | None = None,
                 label: str = "judging") -> list[Verdict]:
    """Judge in chunks of ``chunk`` (default: the judge's own ``chunk``, 1 for API judges), storing each
    chunk's verdicts as soon as it returns, so a judge that fails part-way keeps (and never re-pays for)
    the verdicts it already gave. ``judge_error`` verdicts are returned but not stored. Stored verdicts
    are keyed on ``judge.identity`` (and ``cache_version``): another endpoint, model or threshold never
    reads them. Judges worth storing (slow or paid) show a progress bar over the items still to judge."""
    import hashlib
    import json

    from ..progress import bar

    if not judge.cacheable:  # rule judges: cheap, one call
        return judge.judge(prompts, answers)
    chunk = max(1, chunk or judge.chunk)
    ver = [judge.cache_version] if judge.cache_version else []
    keys = [hashlib.sha256(json.dumps([*judge.identity, p, a, *ver]).encode()).hexdigest()
            for p, a in zip(prompts, answers, strict=True)]
    have = ({k: Verdict(**json.loads(v)) for k, v in cache.get_many(sorted(set(keys)), "verdict").items()}
            if cache is not None else {})
    todo = [i for i, k in enumerate(keys) if k not in have]
    progress = bar(len(todo), f"[{label}] {judge.name}", unit="answer") if todo else None
    try:
        for s in range(0, len(todo), chunk):
            idx = todo[s : s + chunk]
            got = judge.judge([prompts[i] for i in idx], [answers[i] for i in idx])
            new = {keys[i]: v for i, v in zip(idx, got, strict=True)}
            if cache is not None:
                cache.put_many({k: json.dumps(v.as_dict()) for k, v in new.items() if v.label != "judge_error"},
                               "verdict")
            have.update(new)
            progress.update(len(idx))
    finally:
        if progress is not None:
            progress.close()
    return [have[k] for k in keys]

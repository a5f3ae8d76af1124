"""Hub sources through ``datasets`` for users with network access; offline they fail with one line."""

from __future__ import annotations

from ...errors import SafetyPatchError
from ..records import Request, SourceInfo
from ..refusals import unified_category


def _load(repo: str, split: str, config: str | None = None):
    """The dataset's split through ``datasets``; SafetyPatchError in one line when it cannot be had.
    Where the Hub cannot be reached (and ``HF_HUB_OFFLINE`` is not set, which makes ``datasets`` read
    its cache alone), that is said in seconds, instead of after ~30 s of logged retries."""
    from huggingface_hub import constants

    from ...models import hub_unreachable

    why = None if constants.HF_HUB_OFFLINE else hub_unreachable()
    if why:
        raise SafetyPatchError(
            f"could not fetch dataset {repo!r} from the Hugging Face Hub: {why}; offline, use the default sources "
            "or file:PATH (a dataset already in the Hugging Face cache loads with HF_HUB_OFFLINE=1)"
        )
    try:
        import datasets

        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, offline mode...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SafetyPatchError(
            f"could not fetch dataset {repo!r} from the Hugging Face Hub ({first[:200]}); offline, use the "
            "default sources or file:PATH"
        ) from None


def _take(rows, key: str, source: str, cat_key: str | None, license: str, max_items: int | None):
    import hashlib

    out = []
    for r in rows:
        if max_items and len(out) >= max_items:
            break
        text = str(r[key]).strip()
        cat = str(r[cat_key]) if cat_key and r.get(cat_key) else "harmful"
        bid = f"{source}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        out.append(Request(text, source, bid, unified_category(cat), cat, license))
    return out


def load_advbench(max_items: int | None = None):
    ds = _load("walledai/AdvBench", "train")
    info = SourceInfo("advbench", "MIT", "Zou et al. 2023, GCG / AdvBench", "hub:walledai/AdvBench")
    return _take(ds, "prompt", "advbench", None, "MIT", max_items), info


def load_beavertails(max_items: int | None = None):
    ds = _load("PKU-Alignment/BeaverTails", "30k_test")
    ds = ds.filter(lambda r: not r["is_safe"])
    info = SourceInfo("beavertails", "CC-BY-NC-4.0", "Ji et al. 2023, BeaverTails", "hub:PKU-Alignment/BeaverTails")
    return _take(ds, "prompt", "beavertails", None, "CC-BY-NC-4.0", max_items), info


def load_safeedit(max_items: int | None = None):
    ds = _load("zjunlp/SafeEdit", "train")
    info = SourceInfo("safeedit", "CC-BY-NC-SA-4.0", "Wang et al. 2024, SafeEdit", "hub:zjunlp/SafeEdit")
    return _take(ds, "question", "safeedit", "unsafety category", "CC-BY-NC-SA-4.0", max_items), info

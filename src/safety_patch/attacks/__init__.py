"""Jailbreak attacks: small transforms behind one protocol, looked up by name.

An attack turns a bare harmful request into what the model is shown: a conversation and,
for prefilling attacks, the start of the assistant's answer. Text-level attacks compose:
``past_tense+template`` first rewrites the request in the past tense, then wraps it in a
template. Names map lazily to ``module:attr`` so optional heavy attacks (GCG) import only
when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import SafetyPatchError


@dataclass(frozen=True)
class Attacked:
    """What the target model sees for one request under one attack."""

    messages: list[dict]
    prefill: str = ""
    attack: str = "direct"
    family: str = "direct"
    extra: dict = field(default_factory=dict)


class Attack:
    """Base class: override ``transform`` (text-level) or ``apply`` (conversation-level).

    A conversation-level attack (``conversation_level = True``: prefill, few-shot turns, GCG's
    optimised suffix) builds the whole ``Attacked`` value and has no text-only form, so in a
    composed spec it can only be the last part (``check_attack_spec`` rejects anything else).
    """

    name = "attack"
    needs_decoding = False  # encodings: a model that cannot decode is not "robust"
    conversation_level = False
    needs_model = False  # white-box attacks (GCG) are bound to the model under test before use

    def transform(self, request: str) -> str:
        return request

    def family_for(self, request: str) -> str:
        return self.name

    def apply(self, request: str) -> Attacked:
        return Attacked([{"role": "user", "content": self.transform(request)}], "", self.name, self.family_for(request))


REGISTRY: dict[str, str] = {
    "direct": "safety_patch.attacks.rules:Direct",
    "past_tense": "safety_patch.attacks.rules:PastTense",
    "future_tense": "safety_patch.attacks.rules:FutureTense",
    "prefix_injection": "safety_patch.attacks.rules:PrefixInjection",
    "refusal_suppression": "safety_patch.attacks.rules:RefusalSuppression",
    "style_injection": "safety_patch.attacks.rules:StyleInjection",
    "roleplay": "safety_patch.attacks.rules:RolePlay",
    "base64": "safety_patch.attacks.rules:Base64",
    "rot13": "safety_patch.attacks.rules:Rot13",
    "few_shot": "safety_patch.attacks.rules:FewShot",
    "multi_turn": "safety_patch.attacks.rules:MultiTurn",
    "prefill": "safety_patch.attacks.rules:Prefill",
    "template": "safety_patch.attacks.templates:TemplateAttack",
    "gcg": "safety_patch.attacks.gcg:GCG",
    "gcg_gate": "safety_patch.attacks.gcg:GateGCG",
}


# Attacks that build the conversation (turns, assistant prefill, an optimised suffix) rather than
# rewrite the request's text; kept as names so a spec is checked without importing anything.
CONVERSATION_LEVEL = frozenset({"few_shot", "multi_turn", "prefill", "gcg", "gcg_gate"})


def _resolve(name: str):
    if name not in REGISTRY:
        raise SafetyPatchError(f"unknown attack {name!r}; valid: {', '.join(sorted(REGISTRY))} (compose with '+')")
    mod, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), attr)


class Composed(Attack):
    """Text-level attacks applied left to right; the last one may be conversation-level."""

    def __init__(self, parts: list[Attack]):
        for p in parts[:-1]:  # every part must be applied; a conversation-level part cannot be (see check_attack_spec)
            if p.conversation_level:
                raise SafetyPatchError(f"attack {p.name!r} sets the conversation, so it must be the last part of a "
                                       f"composed attack (e.g. 'past_tense+{p.name}')")
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.needs_decoding = any(p.needs_decoding for p in parts)
        self.needs_model = any(getattr(p, "needs_model", False) for p in parts)
        self.conversation_level = parts[-1].conversation_level

    def bind(self, pm, tokenizer) -> Composed:
        for p in self.parts:
            if getattr(p, "needs_model", False):
                p.bind(pm, tokenizer)
        return self

    def apply(self, request: str) -> Attacked:
        text = request
        for p in self.parts[:-1]:
            text = p.transform(text)
        inner = self.parts[-1].apply(text)
        fam = "+".join(p.family_for(request) if i < len(self.parts) - 1 else inner.family for i, p in enumerate(self.parts))
        return Attacked(inner.messages, inner.prefill, self.name, fam, inner.extra)


def check_attack_spec(spec: str) -> list[str]:
    """Validate ``name+name`` without building anything; returns the names.

    Every part is applied, once, in order, so a spec is refused (SafetyPatchError naming it) when it
    has an empty part (``direct+``, ``a++b``), names an attack twice, composes ``direct`` (the request
    as is) with anything, or holds more than one conversation-level attack, or one that is not last."""
    parts = [s.strip() for s in spec.split("+")]
    if not any(parts):
        raise SafetyPatchError(f"empty attack name {spec!r}")
    if not all(parts):
        raise SafetyPatchError(f"attack {spec!r} has an empty part; compose names with single '+', e.g. 'past_tense+template'")
    for n in parts:
        if n not in REGISTRY:
            raise SafetyPatchError(f"unknown attack {n!r}; valid: {', '.join(sorted(REGISTRY))} (compose with '+')")
    twice = sorted({n for n in parts if parts.count(n) > 1})
    if twice:
        raise SafetyPatchError(f"attack {spec!r} names {twice[0]!r} twice; each part is applied once")
    if "direct" in parts and len(parts) > 1:
        raise SafetyPatchError(f"attack {spec!r}: 'direct' is the request as it is and composes with nothing; drop it")
    conv = [n for n in parts if n in CONVERSATION_LEVEL]
    if len(conv) > 1:
        raise SafetyPatchError(f"attack {spec!r}: {' and '.join(repr(c) for c in conv)} each set the conversation; "
                               "a spec holds at most one conversation-level attack, as its last part")
    if conv and parts[-1] != conv[0]:
        without = [n for n in parts if n != conv[0]]
        raise SafetyPatchError(f"attack {spec!r}: {conv[0]!r} sets the conversation, so it must be the last part of a "
                               f"composed attack (e.g. '{'+'.join([*without, conv[0]])}')")
    return parts


def parse_attack_list(text: str, flag: str = "--attacks") -> tuple[str, ...]:
    """A comma list of attack specs (``direct,past_tense+template``), each checked; SafetyPatchError when
    the list names none or names a spec twice (an empty evaluation must not read as a result)."""
    specs = [a.strip() for a in text.split(",")]
    if not any(specs):
        raise SafetyPatchError(f"{flag} {text!r} names no attack")
    if not all(specs):
        raise SafetyPatchError(f"{flag} {text!r} has an empty entry; separate attack specs with single commas")
    for a in specs:
        check_attack_spec(a)
    twice = sorted({a for a in specs if specs.count(a) > 1})
    if twice:
        raise SafetyPatchError(f"{flag} names {twice[0]!r} twice")
    return tuple(specs)


# Keyword arguments of ``get_attack`` and the attacks that take them.
_KWARGS = {"templates": ("template",), "gcg_budget": ("gcg", "gcg_gate")}


def get_attack(spec: str, **kwargs) -> Attack:
    """``name`` or ``name+name+...``; kwargs go to the attacks that take them: ``templates`` (a list of
    template rows) to ``template``, ``gcg_budget`` (a dict of ``attacks.gcg.GCGSettings`` fields such as
    ``steps``, ``search_width``) to ``gcg`` / ``gcg_gate``. An unknown kwarg is a TypeError."""
    unknown = set(kwargs) - set(_KWARGS)
    if unknown:
        raise TypeError(f"get_attack got unexpected keyword argument(s) {sorted(unknown)}")
    names = check_attack_spec(spec)
    parts = []
    for n in names:
        cls = _resolve(n)
        parts.append(cls(**{k: v for k, v in kwargs.items() if n in _KWARGS[k]}))
    return parts[0] if len(parts) == 1 else Composed(parts)

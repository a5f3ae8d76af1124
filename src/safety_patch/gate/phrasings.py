"""The phrasings a gate's pool adds to its requests, so the probe learns the request rather than
its wording: ``reask`` turns a question into an instruction and back ("How do I X?" becomes
"Explain how to X."), ``rephrase`` adds a neutral frame (a line of context, a persona, a
multi-sentence setting) by family (``PHRASINGS``). Deterministic given the ``rng``."""

from __future__ import annotations

import random
import re

from ..errors import SafetyPatchError

_HOW = re.compile(r"^(?:how|what(?:'s| is) the best way|what is a good way)\s+(?:to|do i|can i|could i|would i|should i|"
                  r"might i|would one|does one|can one|do you|can you|can someone|would someone)\s+(.+?)\s*\?*$",
                  re.IGNORECASE | re.DOTALL)
_REASK_Q = ("Explain how to {x}.", "Give me step-by-step instructions to {x}.", "Write a short guide on how to {x}.",
            "Tell me how to {x}.")
_REASK_I = ("Can you {x}?", "Could you {x}?", "I need you to {x}.", "Would you please {x}?")


def reask(text: str, rng: random.Random) -> str:
    """``text`` asked in the other common form: "How (do I|to|can I) X?" -> an instruction ("Explain
    how to X."); an instruction ("Write X", "Give X") -> a question or request ("Can you write X?");
    any other question gets an instruction frame ("Answer this: Q"). The choice among the forms is
    drawn from ``rng``. Multi-line texts keep everything before their last line as context."""
    head, _, last = text.rstrip().rpartition("\n")
    prefix = head + "\n" if head else ""
    q = last.strip()
    m = _HOW.match(q)
    if m:
        return prefix + rng.choice(_REASK_Q).format(x=m.group(1).rstrip(" ?."))
    if q.endswith("?"):
        return prefix + rng.choice(("Answer this: {x}", "I'd like a clear answer. {x}", "Explain: {x}")).format(x=q)
    x = q.rstrip(" .!")
    x = x[:1].lower() + x[1:] if x[:1].isupper() and not x[1:2].isupper() else x
    return prefix + rng.choice(_REASK_I).format(x=x)


# Neutral framings (issue 23 item 5: more phrasings on both sides of the pool). Each is applied
# to harmful requests and benign prompts alike, so the framing itself carries no label and the
# probe must read the request. None of them is a rule attack's wording (attacks/rules.py): the
# unseen-attack report stays unseen.
_FRAMES = {
    "context": ("I have a question about something that came up at work today. {x}",
                "Some background first: I'm trying to understand this properly and the usual explanations didn't help. {x}",
                "My friend and I were talking about this last night and couldn't agree. {x}",
                "Quick one before my meeting. {x}"),
    "third_person": ("A friend of mine asked me this and I didn't know what to say: {x}",
                     "Someone in a chat group posted this question: \"{x}\" What's the answer?",
                     "My colleague wants to know the following. {x}"),
    "hedged": ("Just out of curiosity, {x}", "This might be a silly question, but {x}",
               "Be honest with me. {x}", "I'd appreciate a detailed answer. {x}"),
    "terse": ("{x}", "{x} thx", "pls answer: {x}"),
}
PHRASINGS = ("reask", *_FRAMES)
"""The phrasing families :func:`rephrase` knows: ``reask`` (instruction <-> question) and neutral frames."""


def rephrase(text: str, family: str, rng: random.Random) -> str:
    """``text`` in phrasing ``family`` (:data:`PHRASINGS`): ``reask`` is :func:`reask`; the frames
    put the last line in a neutral frame drawn from ``rng`` (``terse``: lower case, no final
    punctuation, the clipped form people type). Multi-line texts keep everything before their
    last line. Raises SafetyPatchError for an unknown family."""
    if family == "reask":
        return reask(text, rng)
    if family not in _FRAMES:
        raise SafetyPatchError(f"gate phrasing {family!r}: expected one of {', '.join(PHRASINGS)}")
    head, _, last = text.rstrip().rpartition("\n")
    prefix = head + "\n" if head else ""
    q = last.strip()
    frame = rng.choice(_FRAMES[family])
    if family == "terse":
        q = q.rstrip(" .!?")
    if family == "terse" or frame.startswith(("Just out of curiosity", "This might be a silly")):
        q = _lower_first(q)  # the request continues a sentence (or is typed in lower case)
    return prefix + frame.format(x=q)


def _lower_first(q: str) -> str:
    return q[:1].lower() + q[1:] if q[:1].isupper() and not q[1:2].isupper() else q

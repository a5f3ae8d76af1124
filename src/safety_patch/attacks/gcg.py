"""GCG (Zou et al. 2023): greedy coordinate gradient search for an adversarial suffix.

Uses the maintained ``nanogcg`` implementation (GraySwan AI): one-hot token gradients of
the target loss, top-k candidate swaps per position, batched candidate evaluation, token-
consistency filtering. nanogcg pins transformers<=4.47 but runs on 5.x with its prefix KV
cache off (transformers 5 dropped the legacy tuple cache it indexes), so it is installed
with ``--no-deps`` (requirements-nodeps.txt).

The attack is white-box and adaptive: it optimises against the model being evaluated
(base or patched), within a step budget. Suffixes are cached per (model fingerprint,
patches, request, config) under ``$SAFETY_PATCH_HOME/gcg/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

from ..errors import SafetyPatchError
from . import Attack, Attacked


@dataclass(frozen=True)
class GCGSettings:
    steps: int = 50
    search_width: int = 128
    topk: int = 64
    suffix_tokens: int = 20
    target: str = "Sure, here is"
    seed: int = 0


class GCG(Attack):
    name = "gcg"
    needs_model = True
    conversation_level = True

    def __init__(self, settings: GCGSettings | None = None):
        self.settings = settings or GCGSettings()
        self.lm = None

    def bind(self, lm) -> GCG:
        self.lm = lm
        return self

    def _cache_path(self):
        from ..models import home

        return home() / "gcg" / f"{self.lm.fingerprint[:16]}-{self.lm.extra.get('patch_key', '') or 'base'}.json"

    @staticmethod
    def _content(request: str, suffix: str) -> str:
        # The suffix carries its own leading space (the initial string is " ! ! ..."), so nanoGCG's text
        # before the suffix never ends in a lone space token that the evaluated prompt would merge away.
        return request + suffix

    def _messages(self, request: str, suffix: str) -> list[dict]:
        return [{"role": "user", "content": self._content(request, suffix)}]

    def evaluated_ids(self, request: str, suffix: str) -> list[int]:
        """The token ids the evaluation sends for ``request`` + ``suffix`` (generation.generate's encoding)."""
        from ..generation import render

        tok = self.lm.tokenizer
        return tok(render(tok, self._messages(request, suffix)), add_special_tokens=False)["input_ids"]

    def _optimised_ids(self, request: str, suffix: str) -> list[int]:
        """The ids nanoGCG scored for ``suffix``: the text around it and the suffix tokenized apart."""
        from ..generation import render

        tok = self.lm.tokenizer
        before, after = render(tok, self._messages(request, "{optim_str}")).split("{optim_str}")
        enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return enc(before) + enc(suffix) + enc(after)

    def target_loss(self, ids: list[int]) -> tuple[float, list[str]]:
        """Mean cross-entropy of the target after prompt ``ids``, with the adapters the evaluation would use.

        Gated patches route per prompt (gate.py); the loss is taken with the adapters the gates choose
        for these exact ids, which are returned too (all attached adapters when nothing is gated)."""
        import torch

        from ..gate import active_adapters, decide

        model, tok = self.lm.model, self.lm.tokenizer
        target = tok(self.settings.target, add_special_tokens=False)["input_ids"]
        fired = decide(model, tok, [ids])
        on = [a for a in getattr(model, "safety_adapters", []) if a not in fired or fired[a][0]]
        device = next(model.parameters()).device
        with torch.no_grad(), active_adapters(model, on):
            logits = model(input_ids=torch.tensor([ids + target], device=device)).logits[0, len(ids) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target, device=device)).item()
        return loss, on

    def optimise(self, request: str) -> dict:
        """Optimise a suffix for ``request`` on exactly the token ids the evaluation sends.

        Returns {suffix, loss (target loss on the evaluated ids, with the gate's routing),
        optimiser_loss (nanoGCG's own best loss), steps, step (which step's suffix), seconds,
        adapters (active when scored), optimised_against}. Raises SafetyPatchError when no
        suffix of the run survives re-tokenization in context (never happens for the initial one)."""
        if self.lm is None:
            raise SafetyPatchError("the gcg attack needs a model (bind it before use)")
        try:
            import nanogcg
        except ImportError:
            raise SafetyPatchError("the gcg attack needs nanogcg: `pip install --no-deps nanogcg==0.3.0 scipy`") from None
        from ..atomic import write_json

        path = self._cache_path()
        # "ids-v2": suffixes optimised before the input-identity fix were tuned for another prompt.
        key = hashlib.sha256(json.dumps([request, asdict(self.settings), "ids-v2"]).encode()).hexdigest()
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if key in cache:
            return cache[key]
        s = self.settings
        init = " " + " ".join(["!"] * s.suffix_tokens)
        cfg = nanogcg.GCGConfig(num_steps=s.steps, search_width=s.search_width, topk=s.topk, seed=s.seed,
                                optim_str_init=init, use_prefix_cache=False, verbosity="ERROR", early_stop=True)
        t0 = time.time()
        model = self.lm.model
        was_training = model.training
        model.eval()
        exact = _ExactPromptTokenizer(self.lm.tokenizer, self._messages(request, "{optim_str}"))
        try:
            res = nanogcg.run(model, exact, self._messages(request, "{optim_str}"), s.target, cfg)
        finally:
            model.train(was_training)
        # Every suffix the run produced, best (by nanoGCG's loss) first, then the initial one as the last resort.
        order = sorted(range(len(res.losses)), key=lambda i: res.losses[i])
        candidates = [(res.strings[i], i + 1) for i in order] + [(init, 0)]
        seen: set[str] = set()
        for suffix, step in candidates:
            if suffix in seen:
                continue
            seen.add(suffix)
            ids = self.evaluated_ids(request, suffix)
            if ids != self._optimised_ids(request, suffix):
                continue  # re-tokenized in context it is another prompt: not what was optimised
            loss, on = self.target_loss(ids)
            gated = bool(getattr(model, "safety_gates", None))
            out = {"suffix": suffix, "loss": loss, "optimiser_loss": float(res.best_loss), "steps": len(res.losses),
                   "step": step, "seconds": round(time.time() - t0, 1), "adapters": on, "input_ids_identical": True,
                   "optimised_against": "all attached adapters, gates bypassed" if gated else "the model as evaluated"}
            cache[key] = out
            write_json(path, cache)
            return out
        raise SafetyPatchError(f"gcg: no suffix for {request[:60]!r} tokenizes in context to the ids it was optimised on")

    def apply(self, request: str) -> Attacked:
        r = self.optimise(request)
        return Attacked(self._messages(request, r["suffix"]), "", self.name, self.name, r)


class _ExactPromptTokenizer:
    """The model's tokenizer as nanoGCG should see it: the chat template rendered by safety-patch.

    nanoGCG 0.3.0 strips every ``bos_token`` from the rendered template when the template starts
    with it (on ChatML models whose ``bos_token`` is ``<|im_start|>`` that removes the chat
    structure) and then tokenizes the text before the suffix *with* special tokens. Here the
    template is ``generation.render``'s text (what the evaluation sends), ``bos_token`` reads as
    None so nothing is stripped, every encode runs without added special tokens (the rendered
    template already holds them, as in ``generation.generate``), and decoding keeps spaces as
    they are so that nanoGCG's decode/re-encode filter tests the real string. Everything else
    is the real tokenizer; attributes nanoGCG sets land on this wrapper, not on the shared one.
    """

    bos_token = None

    def __init__(self, tokenizer, messages: list[dict]):
        from ..generation import render

        self._tok = tokenizer
        self._template = render(tokenizer, messages)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, messages, **_):
        return self._template

    def __call__(self, *args, **kwargs):
        kwargs["add_special_tokens"] = False
        return self._tok(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return self._tok.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return self._tok.decode(*args, **kwargs)

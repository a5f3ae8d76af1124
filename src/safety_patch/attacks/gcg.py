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

    def __init__(self, settings: GCGSettings | None = None):
        self.settings = settings or GCGSettings()
        self.lm = None

    def bind(self, lm) -> GCG:
        self.lm = lm
        return self

    def _cache_path(self):
        from ..models import home

        return home() / "gcg" / f"{self.lm.fingerprint[:16]}-{self.lm.extra.get('patch_key', '') or 'base'}.json"

    def optimise(self, request: str) -> dict:
        if self.lm is None:
            raise SafetyPatchError("the gcg attack needs a model (bind it before use)")
        try:
            import nanogcg
        except ImportError:
            raise SafetyPatchError("the gcg attack needs nanogcg: `pip install --no-deps nanogcg==0.3.0 scipy`") from None
        from ..atomic import write_json

        path = self._cache_path()
        key = hashlib.sha256(json.dumps([request, asdict(self.settings)]).encode()).hexdigest()
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if key in cache:
            return cache[key]
        s = self.settings
        cfg = nanogcg.GCGConfig(num_steps=s.steps, search_width=s.search_width, topk=s.topk, seed=s.seed,
                                optim_str_init=" ".join(["!"] * s.suffix_tokens), use_prefix_cache=False,
                                verbosity="ERROR", early_stop=True)
        t0 = time.time()
        model = self.lm.model
        was_training = model.training
        model.eval()
        res = nanogcg.run(model, self.lm.tokenizer, [{"role": "user", "content": request + " {optim_str}"}], s.target, cfg)
        model.train(was_training)
        out = {"suffix": res.best_string, "loss": float(res.best_loss), "steps": len(res.losses),
               "seconds": round(time.time() - t0, 1)}
        cache[key] = out
        write_json(path, cache)
        return out

    def apply(self, request: str) -> Attacked:
        r = self.optimise(request)
        return Attacked([{"role": "user", "content": f"{request} {r['suffix']}"}], "", self.name, self.name, r)

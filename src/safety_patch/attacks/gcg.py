"""GCG (Zou et al. 2023): greedy coordinate gradient search for an adversarial suffix.

Uses the maintained ``nanogcg`` implementation (GraySwan AI): one-hot token gradients of
the target loss, top-k candidate swaps per position, batched candidate evaluation, token-
consistency filtering. nanogcg pins transformers<=4.47 but runs on 5.x with its prefix KV
cache off (transformers 5 dropped the legacy tuple cache it indexes), so it is installed
with ``--no-deps`` (requirements-nodeps.txt).

The attack is white-box and adaptive: it optimises against the model being evaluated
(base or patched), within a step budget. Suffixes are cached per (model fingerprint,
patches, request, config) under ``$SAFETY_PATCH_HOME/gcg/``.

``gcg`` optimises the target loss against a gated stack with every patch on (the gate
bypassed). ``gcg_gate`` is the adaptive attack on the gate itself (issue 23; the probe-evasion
attacks of arXiv 2412.09565): the gate is a linear function of one layer's hidden state at the
last prompt token, so its logit is differentiable in the suffix's one-hot tokens. The suffix
minimises CE(target | the stack with its gated patches off) + ``gate_weight`` · Σ_gates
max(0, z_g − (threshold_g − ``gate_margin``)): make the base comply *and* keep every gate
below its threshold, so the refusal adapter never engages. On a stack without gates it is
plain ``gcg``.
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
    gate_weight: float = 0.0
    """Weight of the gate-evasion term (0: plain GCG; ``gcg_gate`` uses 1)."""
    gate_margin: float = 1.0
    """How far below its threshold (in logits) a gate must be pushed before the term stops pulling."""


class GCG(Attack):
    name = "gcg"
    needs_model = True
    conversation_level = True

    def __init__(self, settings: GCGSettings | None = None):
        self.settings = settings or GCGSettings()
        self.pm = None
        self.tokenizer = None

    def bind(self, pm, tokenizer) -> GCG:
        """Optimise against ``pm`` (a patched.PatchedModel, or a LoadedModel for the base), encoded by ``tokenizer``."""
        from ..patched import as_patched

        self.pm, self.tokenizer = as_patched(pm), tokenizer
        if not self.pm.fingerprint:
            raise SafetyPatchError("the gcg attack needs a model with a base fingerprint (its suffix cache key)")
        return self

    def _cache_path(self):
        from ..models import home

        return home() / "gcg" / f"{self.pm.fingerprint[:16]}-{self.pm.key}.json"

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

        tok = self.tokenizer
        return tok(render(tok, self._messages(request, suffix)), add_special_tokens=False)["input_ids"]

    def _optimised_ids(self, request: str, suffix: str) -> list[int]:
        """The ids nanoGCG scored for ``suffix``: the text around it and the suffix tokenized apart."""
        from ..generation import render

        tok = self.tokenizer
        before, after = render(tok, self._messages(request, "{optim_str}")).split("{optim_str}")
        enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return enc(before) + enc(suffix) + enc(after)

    def target_loss(self, ids: list[int]) -> tuple[float, list[str]]:
        """Mean cross-entropy of the target after prompt ``ids``, with the adapters the evaluation would use.

        Gated patches route per prompt (gate.py); the loss is taken with the adapters the gates choose
        for these exact ids, which are returned too (all attached adapters when nothing is gated)."""
        import torch

        pm, tok = self.pm, self.tokenizer
        target = tok(self.settings.target, add_special_tokens=False)["input_ids"]
        (route,) = pm.routes(tok, [ids])
        on = [n for n in pm.items if n not in pm.gates or n in route]
        device = pm.device
        with torch.no_grad(), pm.using(route) as model:
            logits = model(input_ids=torch.tensor([ids + target], device=device)).logits[0, len(ids) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target, device=device)).item()
        return loss, on

    def optimise(self, request: str) -> dict:
        """Optimise a suffix for ``request`` on exactly the token ids the evaluation sends.

        Returns {suffix, loss (target loss on the evaluated ids, with the gate's routing),
        optimiser_loss (nanoGCG's own best loss), steps, step (which step's suffix), seconds,
        adapters (active when scored), optimised_against}. Raises SafetyPatchError when no
        suffix of the run survives re-tokenization in context (never happens for the initial one)."""
        if self.pm is None:
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
        exact = _ExactPromptTokenizer(self.tokenizer, self._messages(request, "{optim_str}"))
        adaptive = self.pm.gated and s.gate_weight > 0
        if adaptive:
            # Against the gate: the target loss of the model the gate lets through (gated patches
            # off) plus the gates' hinge; no early stop, which fires on the target alone.
            cfg.early_stop = False
            context = self.pm.using(())
        else:
            # nanoGCG takes a plain model: a gated stack is optimised against with every patch on (its
            # gate bypassed), which is recorded in the result; the suffix is then scored as evaluated.
            context = self.pm.all_on()
        with context as model:
            was_training = model.training
            model.eval()
            try:
                if adaptive:
                    gcg = _gate_aware(model, exact, cfg, list(self.pm.gates.values()), s.gate_weight, s.gate_margin)
                    res = gcg.run(self._messages(request, "{optim_str}"), s.target)
                else:
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
            gated = self.pm.gated
            against = ("the gates and the stack they let through" if adaptive else
                       "all attached adapters, gates bypassed" if gated else "the model as evaluated")
            out = {"suffix": suffix, "loss": loss, "optimiser_loss": float(res.best_loss), "steps": len(res.losses),
                   "step": step, "seconds": round(time.time() - t0, 1), "adapters": on, "input_ids_identical": True,
                   "optimised_against": against}
            if gated:
                out["gate_logits"] = {n: float(z[0]) for n, z in self.pm.gate_scores(self.tokenizer, [ids]).items()}
            cache[key] = out
            write_json(path, cache)
            return out
        raise SafetyPatchError(f"gcg: no suffix for {request[:60]!r} tokenizes in context to the ids it was optimised on")

    def apply(self, request: str) -> Attacked:
        r = self.optimise(request)
        return Attacked(self._messages(request, r["suffix"]), "", self.name, self.name, r)


class GateGCG(GCG):
    """``gcg_gate``: GCG against the gate as well (see the module docstring); gate_weight 1 by default."""

    name = "gcg_gate"

    def __init__(self, settings: GCGSettings | None = None):
        super().__init__(settings or GCGSettings(gate_weight=1.0))


def _gate_aware(model, tokenizer, config, gates, weight: float, margin: float):
    """A nanoGCG ``GCG`` whose loss adds ``weight`` · Σ_g max(0, z_g − (t_g − margin)) to the target loss.

    z_g is gate g's logit on the hidden state after its decoder layer at the last prompt token
    (the position before the target), read with forward hooks in the same passes that score
    the target: for the token gradient (differentiable) and for every candidate batch. The
    target-loss code is nanoGCG 0.3.0's, without the prefix cache (off in this project)."""
    import contextlib

    import torch
    from nanogcg.gcg import GCG as NanoGCG

    from ..gate import decoder_layers

    blocks = decoder_layers(model)

    class GateAwareGCG(NanoGCG):
        @contextlib.contextmanager
        def _states(self, pos: int):
            store: dict[int, list] = {g.layer: [] for g in gates}

            def hook_for(layer):
                def hook(_m, _i, output):
                    store[layer].append((output[0] if isinstance(output, tuple) else output)[:, pos])
                return hook

            handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in store]
            try:
                yield store
            finally:
                for h in handles:
                    h.remove()

        @staticmethod
        def _penalty(store) -> torch.Tensor:
            total = 0
            for g in gates:
                h = torch.cat(store[g.layer]).float()
                z = ((h - g.mean.to(h.device)) / g.std.to(h.device)) @ g.weight.to(h.device) + g.bias
                total = total + torch.relu(z - (g.threshold - margin))
            return weight * total

        def compute_token_gradient(self, optim_ids):
            emb = self.embedding_layer
            onehot = torch.nn.functional.one_hot(optim_ids, num_classes=emb.num_embeddings).to(model.device, model.dtype)
            onehot.requires_grad_()
            embeds = torch.cat([self.before_embeds, onehot @ emb.weight, self.after_embeds, self.target_embeds], dim=1)
            shift = embeds.shape[1] - self.target_ids.shape[1]
            with self._states(shift - 1) as store:
                logits = model(inputs_embeds=embeds).logits
            loss = torch.nn.functional.cross_entropy(logits[0, shift - 1 : -1].float(), self.target_ids[0])
            loss = loss + self._penalty(store).mean()
            return torch.autograd.grad(outputs=[loss], inputs=[onehot])[0]

        def _compute_candidates_loss_original(self, search_batch_size, input_embeds):
            shift = input_embeds.shape[1] - self.target_ids.shape[1]
            with self._states(shift - 1) as store:
                loss = super()._compute_candidates_loss_original(search_batch_size, input_embeds)
            return loss + self._penalty(store).to(loss.device, loss.dtype)

    return GateAwareGCG(model, tokenizer, config)


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

"""GCG (Zou et al. 2023): greedy coordinate gradient search for an adversarial suffix.

Uses the maintained ``nanogcg`` implementation (GraySwan AI): one-hot token gradients of
the target loss, top-k candidate swaps per position, batched candidate evaluation, token-
consistency filtering. nanogcg pins transformers<=4.47, so it is installed with ``--no-deps``
(requirements-nodeps.txt); on transformers 5 its prefix KV cache (a legacy tuple cache, which 5.x
dropped) and its loss passes are replaced by ``_nano_gcg``'s (a copied ``Cache`` per forward, logits at
the target only): 2.46× faster on the embedded model with the same suffixes (bench/gcg_speed.py).

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

    default_settings = GCGSettings()

    def __init__(self, settings: GCGSettings | None = None, gcg_budget: dict | None = None):
        """``gcg_budget``: GCGSettings fields (``steps``, ``search_width``, ...) replacing the defaults'."""
        from dataclasses import replace

        try:
            self.settings = replace(settings or self.default_settings, **(gcg_budget or {}))
        except TypeError as e:
            raise SafetyPatchError(f"{self.name}: {e}") from None
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

        Gated patches route per prompt (gate/probe.py); the loss is taken with the adapters the gates choose
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
        # "ids-v2": suffixes optimised before the input-identity fix were tuned for another prompt;
        # "v3": the optimiser reads a prefix cache and final-norm gates' real logits (2026-12-01), so a
        # table never compares suffixes from two optimisers under one budget.
        key = hashlib.sha256(json.dumps([request, asdict(self.settings), "ids-v2", "v3"]).encode()).hexdigest()
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if key in cache:
            return cache[key]
        s = self.settings
        init = " " + " ".join(["!"] * s.suffix_tokens)
        cfg = nanogcg.GCGConfig(num_steps=s.steps, search_width=s.search_width, topk=s.topk, seed=s.seed,
                                optim_str_init=init, use_prefix_cache=True, verbosity="ERROR", early_stop=True)
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
                gates = list(self.pm.gates.values()) if adaptive else []
                gcg = _nano_gcg(model, exact, cfg, gates, s.gate_weight, s.gate_margin)
                res = gcg.run(self._messages(request, "{optim_str}"), s.target)
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

    default_settings = GCGSettings(gate_weight=1.0)


def _nano_gcg(model, tokenizer, config, gates=(), weight: float = 0.0, margin: float = 0.0):
    """nanoGCG 0.3.0's ``GCG`` with a prefix KV cache that works on transformers 5, logits only at the
    target, and (with ``gates``) the gate-evasion term: ``weight`` · Σ_g max(0, z_g − (t_g − margin)).

    * **Prefix cache**: nanoGCG computes the KV of the text before the suffix once and indexes it as
      the legacy tuple cache, which transformers 5 dropped (so the project ran it off: every
      candidate re-read the whole prompt). Here each forward gets its own copy of the prefix's
      ``Cache``, repeated to the candidate batch (a forward appends to the cache it is given).
    * **Logits at the target only** (``logits_to_keep``): the loss reads the target's positions, so
      the 49k-vocabulary head is not applied to the prompt's.
    * **Gates**: z_g is gate g's logit (``Gate.logits``: the routing formula) on the hidden state after
      its decoder layer at the last prompt token (the position before the target), read with
      forward hooks in the same passes that score the target: for the token gradient
      (differentiable) and for every candidate batch.

    The loss is nanoGCG's cross-entropy of the target (mellowmax and probe sampling are not used
    by this project and are refused). Source: nanoGCG 0.3.0 (GraySwan AI), ``gcg.py``."""
    import contextlib
    import copy

    import torch
    from nanogcg.gcg import GCG as NanoGCG

    from ..gate.probe import decoder_layers
    from ..prompt_pass import cache_argument, forward_parameters

    if config.use_mellowmax or config.probe_sampling_config is not None:
        raise SafetyPatchError("gcg: mellowmax and probe sampling are not supported by this project's nanoGCG wrapper")
    blocks = decoder_layers(model) if gates else None
    keep_kw = "logits_to_keep" in forward_parameters(model)
    cache_kw = cache_argument(model)

    class ProjectGCG(NanoGCG):
        @contextlib.contextmanager
        def _states(self, pos: int):
            store: dict[int, list] = {i: [] for g in gates for i in g.layers}

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
        def _logits(store) -> list[torch.Tensor]:
            # Gate.logits: the same features (residual or final-norm) and formula as routing.
            return [g.logits(g.read({i: torch.cat(store[i]) for i in g.layers})) for g in gates]

        @classmethod
        def _penalty(cls, store) -> torch.Tensor:
            return weight * sum(torch.relu(z - (g.threshold - margin)) for g, z in zip(gates, cls._logits(store), strict=True))

        def _target_logits(self, embeds: torch.Tensor) -> torch.Tensor:
            """Logits [batch, target length, vocab] predicting the target, for embeddings of suffix + after + target."""
            n_target = self.target_ids.shape[1]
            kwargs = {}
            if self.prefix_cache:  # nanoGCG's own test when it builds the candidates' embeddings
                cache = copy.deepcopy(self.prefix_cache)
                if embeds.shape[0] > 1:
                    cache.batch_repeat_interleave(embeds.shape[0])
                kwargs.update({cache_kw: cache, "use_cache": True})
            if keep_kw:
                logits = model(inputs_embeds=embeds, logits_to_keep=n_target + 1, **kwargs).logits
                return logits[:, :-1]
            logits = model(inputs_embeds=embeds, **kwargs).logits
            return logits[:, -n_target - 1 : -1]

        def compute_token_gradient(self, optim_ids):
            emb = self.embedding_layer
            onehot = torch.nn.functional.one_hot(optim_ids, num_classes=emb.num_embeddings).to(model.device, model.dtype)
            onehot.requires_grad_()
            parts = [onehot @ emb.weight, self.after_embeds, self.target_embeds]
            if not self.prefix_cache:
                parts.insert(0, self.before_embeds)
            embeds = torch.cat(parts, dim=1)
            shift = embeds.shape[1] - self.target_ids.shape[1]
            with self._states(shift - 1) as store:
                logits = self._target_logits(embeds)
            loss = torch.nn.functional.cross_entropy(logits[0].float(), self.target_ids[0])
            if gates:
                loss = loss + self._penalty(store).mean()
            return torch.autograd.grad(outputs=[loss], inputs=[onehot])[0]

        def _compute_candidates_loss_original(self, search_batch_size, input_embeds):
            shift = input_embeds.shape[1] - self.target_ids.shape[1]
            losses = []
            for i in range(0, input_embeds.shape[0], search_batch_size):
                batch = input_embeds[i : i + search_batch_size]
                labels = self.target_ids.repeat(batch.shape[0], 1)
                with torch.no_grad(), self._states(shift - 1) as store:
                    logits = self._target_logits(batch)
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                             reduction="none").view(batch.shape[0], -1).mean(-1)
                    if gates:
                        loss = loss + self._penalty(store).to(loss.device, loss.dtype)
                if self.config.early_stop and bool((logits.argmax(-1) == labels).all(-1).any()):
                    self.stop_flag = True
                losses.append(loss)
            return torch.cat(losses)

    return ProjectGCG(model, tokenizer, config)


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

"""A patched model as a value: the base, the patch stack, its identity and its routing.

``patches.attached(model, patches, fingerprint)`` yields a :class:`PatchedModel`; so does
:meth:`PatchedModel.base` for the unpatched model. Everything that generates or scores takes
one explicitly (``generation.complete_texts``, ``generation.cached_generate``,
``evaluation.capability``, the serve engine, the gcg attack) and asks it how to route:

* **identity**: :attr:`PatchedModel.key` is the generation-cache key of the stack, derived
  from the patch ids (``"base"`` without patches); it has no default a caller could forget.
* **routing**: a gated patch (gate/probe.py) applies per prompt. :meth:`PatchedModel.routes` reads
  every gate on the prompts (with only the ungated patches on, in one pass stopped after the
  deepest gate layer) and returns, per prompt, which gated items are on.
  :meth:`PatchedModel.adapter_names` gives PEFT's per-row ``adapter_names`` when the stack is
  one gated LoRA adapter (the default patch): then a batch mixes routed and base rows in one
  forward (:meth:`PatchedModel.mixed`). Otherwise :meth:`PatchedModel.using` switches the
  stack for a group of prompts (LoRA adapters by PEFT's ``set_adapter``/``disable_adapter``; gated weight deltas by
  rewriting the touched tensors from the saved base plus the deltas that are on, in stack order,
  so each state is bit-identical to attaching exactly those patches).
* **fail closed**: while a gated stack is attached, a forward pass that did not come through
  one of these routes raises ``SafetyPatchError`` (a forward pre-hook on the base model), so
  neither ``pm(...)`` nor the underlying module called directly can run the refusal adapter
  on every prompt by accident. :meth:`PatchedModel.all_on` is the explicit way to measure the
  adapter itself (``patch verify``'s probe, the subspace analysis).

PEFT mixed-batch inference: https://huggingface.co/docs/peft/developer_guides/lora
("Inference with different LoRA adapters in the same batch").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import SafetyPatchError

BASE_KEY = "base"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def max_per_prompt(scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[len(counts)]: the highest of each prompt's ``counts[i]`` consecutive view scores in ``scores``
    [sum(counts)] (the views of ``generation.gate_views``, flattened in prompt order)."""
    groups = torch.split(scores, list(counts))
    return torch.stack([g.max() for g in groups])


@dataclass
class _DeltaState:
    """Bookkeeping for weight-delta patches when one of them is gated.

    ``saved``: the base value of every tensor a delta touches; ``items``: (name, {tensor: ΔW},
    gated) in stack order; ``on``: which gated deltas the weights hold now.
    """

    params: dict[str, torch.nn.Parameter]
    saved: dict[str, torch.Tensor]
    items: list[tuple[str, dict[str, torch.Tensor], bool]]
    on: frozenset[str]

    @torch.no_grad()
    def set(self, on: frozenset[str]) -> None:
        if on == self.on:
            return
        for k, w0 in self.saved.items():
            w = self.params[k]
            w.copy_(w0)
            for name, tensors, gated in self.items:  # stack order: the sums attaching would make
                if k in tensors and (not gated or name in on):
                    w.add_(tensors[k].to(device=w.device, dtype=torch.float32).to(w.dtype))
        self.on = on


@dataclass
class _Guard:
    """Counts the routed passes in flight; a forward outside them on a gated stack raises."""

    depth: int = 0

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


@dataclass(eq=False)
class PatchedModel:
    """A base model with a patch stack attached, and how that stack is routed per prompt.

    ``module``: what runs (the base ``nn.Module``, or PEFT's wrapper when LoRA adapters are
    loaded). ``adapters``: the LoRA adapter names in stack order (``patch0``, ``patch1``, …).
    ``items``: every patch's routing name in stack order (LoRA: its adapter name; delta:
    ``delta0``, …). ``gates``: {item name: Gate} of the gated patches. Made by
    ``patches.attached`` / :meth:`base`; valid only while that attachment is open.
    """

    module: torch.nn.Module
    fingerprint: str | None
    patches: tuple = ()
    adapters: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    gates: Mapping[str, object] = field(default_factory=dict)
    _deltas: _DeltaState | None = None
    _guard: _Guard = field(default_factory=_Guard)
    _exit: object = None  # the open attachment, for a PatchedModel that outlives a with-block (CLI use)

    def close(self) -> None:
        """Detach a stack opened with ``patches.attach_for_inference`` (the base is restored exactly)."""
        if self._exit is not None:
            ctx, self._exit = self._exit, None
            ctx.__exit__(None, None, None)

    @classmethod
    def base(cls, model: torch.nn.Module, fingerprint: str | None = None) -> PatchedModel:
        """The unpatched model (``model`` may also be a LoadedModel: its model and fingerprint)."""
        if hasattr(model, "fingerprint") and hasattr(model, "tokenizer"):
            return cls(model.model, model.fingerprint)
        return cls(model, fingerprint)

    # ------------------------------------------------------------------ identity

    @property
    def key(self) -> str:
        """Generation-cache identity of the stack: the patch ids joined in order, ``"base"`` without patches."""
        return "+".join(p.id for p in self.patches) if self.patches else BASE_KEY

    @property
    def gated(self) -> bool:
        return bool(self.gates)

    @property
    def config(self):
        return self.module.config

    @property
    def generation_config(self):
        return self.module.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def parameters(self):
        return self.module.parameters()

    def __call__(self, *args, **kwargs):
        """Forward with the whole stack on; refused for a gated stack (its routing needs the prompt boundary)."""
        if self.gated:
            raise SafetyPatchError(
                "a gated patch routes per prompt: a bare forward call cannot know where the prompt ends, so it is "
                "refused rather than applying the adapter to everything; generate with generation.generate / "
                "complete_texts, score with evaluation.capability.answer_logprobs, or use `with patched.all_on():` "
                "to measure the adapter itself")
        with self._guard.opened():
            return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ switching

    @contextlib.contextmanager
    def using(self, on: Sequence[str] = ()) -> Iterator[torch.nn.Module]:
        """Inside the block the module runs the ungated items plus the gated ones in ``on``; yields it.

        Without gates this is the stack as attached. Afterwards every item is on again."""
        unknown = [n for n in on if n not in self.gates]
        if unknown:
            raise SafetyPatchError(f"{unknown[0]} is not a gated item of this stack ({', '.join(self.gates) or 'none'})")
        if not self.gated:
            with self._guard.opened():
                yield self.module
            return
        wanted = set(on)
        active = [a for a in self.adapters if a not in self.gates or a in wanted]
        if self._deltas is not None:
            self._deltas.set(frozenset(n for n in wanted if n.startswith("delta")))
        try:
            with self._guard.opened(), self._lora_active(active):
                yield self.module
        finally:
            if self._deltas is not None:
                self._deltas.set(frozenset(n for n in self.gates if n.startswith("delta")))

    @contextlib.contextmanager
    def all_on(self) -> Iterator[torch.nn.Module]:
        """Every patch on for every prompt, gates bypassed: to measure what an adapter does, not to answer."""
        with self.using(tuple(self.gates)) as m:
            yield m

    @contextlib.contextmanager
    def _lora_active(self, names: Sequence[str]) -> Iterator[None]:
        if not self.adapters or list(names) == list(self.adapters):
            yield
            return
        if not names:
            with self.module.disable_adapter():
                yield
            return
        self.module.base_model.set_adapter(list(names))
        try:
            yield
        finally:
            self.module.base_model.set_adapter(list(self.adapters))

    # ------------------------------------------------------------------ routing

    def gate_scores(self, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, torch.Tensor]:
        """Per gated item, its probe logits [n] on each prompt (token ids of the text to continue).

        The gates read the hidden states with only the ungated items on, in one pass for every
        gate's layer that stops after the deepest (``gate.probe.route_states``), in passes of up to
        max(64, ``batch_size``) rows (a routing pass of short rows in batches of 8 runs its
        matmuls at a fraction of their rate). Raises SafetyPatchError where a gate cannot decide
        (NaN score).
        """
        from .gate import probe

        if not self.gated:
            return {}
        with self.using(()) as m:
            states = probe.route_states(m, prompts, sorted({i for g in self.gates.values() for i in g.layers}),
                                        max(probe.ROUTE_MIN_BATCH, batch_size))
        return {name: g.scores(g.read(states)) for name, g in self.gates.items()}

    def gate_scores_max(self, tokenizer, views: Sequence[Sequence[Sequence[int]]], batch_size: int = 8) -> dict[str, torch.Tensor]:
        """Per gated item, its highest probe logit [n] over each prompt's views (token ids of the texts
        a gate reads for one prompt: ``generation.gate_views``); one stopped pass over all views."""
        if not self.gated:
            return {}
        if any(not v for v in views):
            raise ValueError("every prompt needs at least one view")
        scores = self.gate_scores(tokenizer, [ids for v in views for ids in v], batch_size)
        return {name: max_per_prompt(z, [len(v) for v in views]) for name, z in scores.items()}

    def routes(self, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8) -> list[tuple[str, ...]]:
        """Per prompt, the gated items its gates switch on (logit above threshold); ``()`` for every prompt without gates."""
        return self.routes_from(self.gate_scores(tokenizer, prompts, batch_size), len(prompts))

    def routes_from(self, scores: dict[str, torch.Tensor], n: int) -> list[tuple[str, ...]]:
        """Per prompt of ``n``, the gated items whose logit in ``scores`` ({item: [n]}, from
        :meth:`gate_scores`) is above its gate's threshold."""
        fired = {name: (z > self.gates[name].threshold).tolist() for name, z in scores.items()}
        return [tuple(name for name in self.gates if fired[name][i]) for i in range(n)]

    def groups(self, routes: Sequence[tuple[str, ...]]) -> list[tuple[list[int], tuple[str, ...]]]:
        """Prompt indices grouped by route, first-seen order: [(indices, gated items on)]."""
        by: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(routes):
            by.setdefault(r, []).append(i)
        return list((idx, on) for on, idx in by.items())

    @property
    def can_mix(self) -> bool:
        """Whether routed and unrouted prompts can share a batch: the stack's only gated item is its only LoRA adapter."""
        return len(self.gates) == 1 and len(self.adapters) == 1 and self.adapters[0] in self.gates

    def adapter_names(self, routes: Sequence[tuple[str, ...]]) -> list[str]:
        """PEFT ``adapter_names`` for a mixed batch: the adapter where its gate fired, ``"__base__"`` elsewhere."""
        if not self.can_mix:
            raise SafetyPatchError("mixed-batch routing needs a stack whose only LoRA adapter is its only gated patch")
        (name,) = self.adapters
        return [name if name in r else PEFT_BASE for r in routes]

    @contextlib.contextmanager
    def mixed(self) -> Iterator[torch.nn.Module]:
        """The module for a mixed-batch call (pass ``adapter_names=``, :meth:`adapter_names`): adapter
        set active, guard open. Raises SafetyPatchError where the stack cannot mix (:attr:`can_mix`):
        without names PEFT would run every active adapter on every row."""
        if not self.can_mix:
            raise SafetyPatchError("mixed-batch routing needs a stack whose only LoRA adapter is its only gated patch")
        with self._guard.opened():
            yield self.module

    def guard_hook(self, _module, _args, _kwargs):
        """Forward pre-hook on the base model: refuse a pass on a gated stack that no route opened."""
        if self.gated and self._guard.depth == 0:
            raise SafetyPatchError(
                "a forward pass reached a model with a gated patch attached outside its routing (the adapter would "
                "apply to every prompt); go through PatchedModel.using / routes, or generation.generate")
        return None


def as_patched(model, fingerprint: str | None = None) -> PatchedModel:
    """``model`` if it is a PatchedModel, else the unpatched ``model`` (an nn.Module or a LoadedModel)."""
    return model if isinstance(model, PatchedModel) else PatchedModel.base(model, fingerprint)

"""The server's one point of contact with models, patches and gates.

Everything the server knows about how a patch stack is attached and routed lives here; the
stack and its routing are a ``patched.PatchedModel`` (the value ``chat --patch`` uses too). The
rest of ``safety_patch.serve`` sees only:

* :class:`Engine`: one base model plus named patch stacks (``base`` always exists);
* :meth:`Engine.run`: route a batch of tokenized prompts for one stack and generate,
  calling back per new token so answers can stream;
* :class:`GateProbe`: the gate alone on a copy of the base truncated after the gate's layer
  (upstream mode).

Routing is the one ``chat --patch`` uses (``generation.complete_texts`` →
``PatchedModel.routes``): a gated adapter is active for a prompt's whole answer iff its gate's logit on the base model's
hidden state after its layer, at the prompt's last token, exceeds its threshold; ungated
adapters in the stack are always on and are on while the gate reads. Generation is the
same left-padded batch and decoder (``decoding.greedy`` for greedy requests), so a greedy
request gets the tokens ``chat`` prints (tests/test_serve.py checks this).

Threading: :meth:`Engine.run` must be called from one thread at a time (the batcher's
worker); tokenizer calls from other threads go through :meth:`Engine.encode` /
:meth:`Engine.decode`, which take a lock (a fast tokenizer is not safe to share unguarded).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..errors import SafetyPatchError

log = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class Sampling:
    """A request's decoding settings (temperature 0 = greedy). A batch shares temperature and
    top-p; ``Engine.run`` takes each request's seed apart (its ``seeds``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GateReading:
    """One gate's verdict on one prompt: ``logit`` is the probe's score, fired iff logit > threshold."""

    patch: str
    layer: int
    logit: float
    threshold: float
    fired: bool
    extra_layers: tuple[int, ...] = ()
    """A multi-layer gate's further layers (gate.Gate.extra_layers)."""
    patch_id: str = ""
    """The gated patch's id (``patch`` is its folder's name, which two folders can share)."""

    def as_dict(self) -> dict:
        out = {"patch": self.patch, **({"patch_id": self.patch_id} if self.patch_id else {}), "layer": self.layer,
               "logit": round(self.logit, 6), "threshold": self.threshold, "fired": self.fired}
        if self.extra_layers:  # single-layer readings keep their old shape
            out["layers"] = [self.layer, *self.extra_layers]
        return out


@dataclass
class Route:
    """How one request was served: the stack asked for, the patches active for its answer, the gates read."""

    model: str
    active: list[str] = field(default_factory=list)  # patch names (folder names), in stack order
    gates: list[GateReading] = field(default_factory=list)
    active_ids: list[str] = field(default_factory=list)  # the same patches' ids (a folder name is not unique)

    @property
    def decision(self) -> str:
        """``patched`` if any gated patch fired; else ``always`` if always-on patches answered (a stack
        without gates, or whose gates did not fire); else ``base``: the base model's weights answered.
        A stack's always-on patch answering was once called ``base`` when its gate did not fire."""
        if any(g.fired for g in self.gates):
            return "patched"
        return "always" if self.active else "base"

    def as_dict(self) -> dict:
        return {"model": self.model, "decision": self.decision, "active_patches": list(self.active),
                "active_patch_ids": list(self.active_ids), "gates": [g.as_dict() for g in self.gates]}

    def header(self) -> str:
        """Compact form for the ``x-safety-patch-route`` response header."""
        parts = [f"decision={self.decision}"] + [f"{g.patch}:logit={g.logit:.4f},fired={int(g.fired)}" for g in self.gates]
        return "; ".join(parts)


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"


def _render(render, tokenizer, messages) -> str:
    """``generation.render``, with any template failure as one SafetyPatchError line (a 400 for the server)."""
    try:
        return render(tokenizer, messages)
    except SafetyPatchError:
        raise
    except Exception as e:  # a template's own raise_exception, or a template bug on unusual input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SafetyPatchError(f"the chat template rejects these messages: {first}") from None


def _read_stack(paths: Sequence[str | Path]):
    from ..patches import read_patch

    return [read_patch(p) for p in paths]


class _RowStop(StoppingCriteria):
    """Stopping criterion: each row stops at its own token budget, or when its request was cancelled."""

    def __init__(self, width: int, budgets: list[int], cancelled: Callable[[int], bool]):
        self.width, self.budgets, self.cancelled = width, budgets, cancelled

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        made = input_ids.shape[1] - self.width
        done = [made >= b or self.cancelled(r) for r, b in enumerate(self.budgets)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):
    """Hands each step's new token of every row to ``on_step`` (the first put is the prompt: skipped)."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step, self.seen_prompt = on_step, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_step([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class Engine:
    """A base model and named patch stacks, served one batch at a time.

    Only the stack a batch asks for is attached, for that batch (it stays attached until a
    batch for another stack comes), and ``patches.attached`` restores the base bit for bit
    when it is detached, so one request's adapters never reach another's.
    """

    def __init__(self, lm, stacks: dict[str, list], force: bool = False):
        if BASE in stacks:
            raise SafetyPatchError(f"model name {BASE!r} is reserved for the unpatched base")
        self.lm = lm
        self.base_model = lm.model
        self.tokenizer = lm.tokenizer
        self.stacks = {BASE: [], **stacks}
        self.force = force
        self._tok_lock = threading.Lock()
        self._current: tuple[str, object, object] | None = None  # (name, context, PatchedModel)
        eos = getattr(self.base_model.generation_config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else self.tokenizer.eos_token_id])
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Check every stack attaches (fingerprint, shapes, gate fit, order) now, not on the first request.
        for name in stacks:
            self._use(name)
        self._use(BASE)

    @classmethod
    def load(cls, model: str, stacks: dict[str, list[str | Path]], device: str = "auto", dtype: str = "auto",
             force: bool = False) -> Engine:
        """Load the base (``models.load_model``) and read each stack's patches; raises SafetyPatchError."""
        from ..models import load_model

        lm = load_model(model, device=device, dtype=dtype)
        return cls(lm, {name: _read_stack(paths) for name, paths in stacks.items()}, force)

    # ------------------------------------------------------------------ facts the server needs

    @property
    def names(self) -> list[str]:
        return list(self.stacks)

    def describe(self, name: str) -> dict:
        """Public facts about a served model name (for /v1/models)."""
        return {"patches": [str(p.path) for p in self.stacks[name]], "patch_ids": [p.id for p in self.stacks[name]],
                "gated": any(p.gated for p in self.stacks[name]), "base": self.lm.name, "fingerprint": self.lm.fingerprint}

    @property
    def max_context(self) -> int:
        """Longest prompt + answer the model's positions allow (tokens)."""
        return int(getattr(self.base_model.config, "max_position_embeddings", 0) or 2048)

    def render(self, messages: Sequence[dict]) -> str:
        """The chat-template text ``chat`` would feed; raises SafetyPatchError if the template rejects it."""
        from ..generation import render

        with self._tok_lock:
            return _render(render, self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def views(self, messages: Sequence[dict]) -> list[list[int]]:
        """Token ids of the texts a gate reads for ``messages`` (``generation.gate_views``): the prompt
        itself first; without its system messages second, where it has any."""
        from ..generation import gate_views

        with self._tok_lock:
            texts = _render(gate_views, self.tokenizer, messages)
            return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of answer tokens, exactly as ``generation.complete_texts`` returns it (before its strip)."""
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ attaching and routing

    def _use(self, name: str):
        """Attach stack ``name`` (detaching the previous one first); returns its PatchedModel."""
        if self._current is not None and self._current[0] == name:
            return self._current[2]
        self.release()
        from ..patched import PatchedModel

        if not self.stacks[name]:
            pm = PatchedModel.base(self.base_model, self.lm.fingerprint)
            self._current = (name, None, pm)
            return pm
        from ..patches import attached

        ctx = attached(self.base_model, self.stacks[name], self.lm.fingerprint, self.force)
        pm = ctx.__enter__()
        self._current = (name, ctx, pm)
        return pm

    def release(self) -> None:
        """Detach whatever stack is attached (the base is restored exactly)."""
        if self._current is not None and self._current[1] is not None:
            self._current[1].__exit__(None, None, None)
        self._current = None

    def route(self, name: str, pm, prompts: Sequence[Sequence[int]], views: Sequence[Sequence[Sequence[int]]] | None = None):
        """Per prompt: (gated items on, Route), from ``PatchedModel.gate_scores_max`` over each prompt's
        ``views`` (default: the prompt alone): the scores and decisions ``chat`` and ``eval`` route by
        (a gated patch is on iff its highest logit > threshold)."""
        folder = {item: p.name for item, p in zip(pm.items, pm.patches, strict=True)}
        pid = {item: p.id for item, p in zip(pm.items, pm.patches, strict=True)}
        always = [p.name for p in self.stacks[name]]
        if not pm.gated:
            return [((), Route(name, always, active_ids=[p.id for p in self.stacks[name]])) for _ in prompts]
        views = [[list(p)] for p in prompts] if views is None else views
        if len(views) != len(prompts):
            raise ValueError(f"{len(views)} views for {len(prompts)} prompts")
        logits = pm.gate_scores_max(self.tokenizer, views, batch_size=max(1, sum(len(v) for v in views)))
        out = []
        for i in range(len(prompts)):
            readings = [GateReading(folder[a], g.layer, float(logits[a][i]), float(g.threshold),
                                    bool(logits[a][i] > g.threshold), g.extra_layers, pid[a]) for a, g in pm.gates.items()]
            on = tuple(a for a, r in zip(pm.gates, readings, strict=True) if r.fired)
            active = [a for a in pm.items if a not in pm.gates or a in on]
            out.append((on, Route(name, [folder[a] for a in active], readings, [pid[a] for a in active])))
        return out

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def run(self, name: str, prompts: Sequence[Sequence[int]], budgets: Sequence[int], sampling: Sampling = Sampling(),
            on_route: Callable[[int, Route], None] | None = None,
            on_token: Callable[[int, int], None] | None = None,
            cancelled: Callable[[int], bool] = lambda i: False, seeds: Sequence[int] | None = None,
            views: Sequence[Sequence[Sequence[int]]] | None = None) -> list[Result]:
        """Route and complete ``prompts`` (token ids of rendered chats) with stack ``name``.

        ``budgets[i]``: max new tokens of prompt i. ``on_route(i, route)`` is called once per
        prompt before generation, ``on_token(i, id)`` per new answer token (EOS excluded), and
        a prompt whose ``cancelled(i)`` turns true stops at the next step. ``seeds[i]``: prompt
        i's sampling seed (default: ``sampling.seed`` for every prompt); each sampled prompt
        draws from its own generator, so its answer does not depend on the prompts batched with
        it. ``views[i]``: the token ids the gates read for prompt i (:meth:`views`; default: the prompt).
        Returns per prompt its answer token ids (EOS excluded) and why it ended. Raises
        KeyError on an unknown name, ValueError for another number of seeds (or views) than prompts.
        """
        if name not in self.stacks:
            raise KeyError(name)
        seeds = [sampling.seed] * len(prompts) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        pm = self._use(name)
        routes = self.route(name, pm, prompts, views)
        for i, (_, r) in enumerate(routes):
            if on_route is not None:
                on_route(i, r)
        if pm.can_mix:  # one gated adapter: routed and base rows share the batch (PEFT mixed batch)
            names = pm.adapter_names([on for on, _ in routes])
            with pm.mixed() as module:
                return self._generate(module, list(prompts), list(budgets), sampling, on_token, cancelled, seeds, names)
        results: list[Result | None] = [None] * len(prompts)
        for members, on in pm.groups([on for on, _ in routes]):
            with pm.using(on) as module:
                part = self._generate(module, [prompts[i] for i in members], [budgets[i] for i in members], sampling,
                                      (lambda r, t, m=members: on_token(m[r], t)) if on_token else None,
                                      lambda r, m=members: cancelled(m[r]), [seeds[i] for i in members])
            for i, res in zip(members, part, strict=True):
                results[i] = res
        return [r for r in results if r is not None]

    def _generate(self, model, prompts, budgets, sampling: Sampling, on_token, cancelled, seeds: list[int],
                  adapter_names: list[str] | None = None) -> list[Result]:
        """One batch of left-padded prompts, as ``generation.complete_texts`` makes it
        (``adapter_names``: PEFT's per-row adapters of a mixed batch): greedy through
        ``decoding.greedy`` (a row leaves the batch when its answer ends, is cancelled or
        reaches its budget), sampling through ``decoding.sample`` (the same, each row drawing
        from a generator seeded with its own seed). Where the model's generation config asks for
        more than either builds, ``model.generate``: one call for a greedy batch, one per prompt
        when sampling (``generate`` shares one random stream across its batch)."""
        from transformers import StoppingCriteriaList

        device = next(model.parameters()).device
        from ..decoding import greedy, plain_greedy, sample, sampling_warpers
        from ..prompt_pass import left_padded

        ids, mask = left_padded(prompts, self.pad_id)
        warpers = (sampling_warpers(model.generation_config, sampling.temperature, sampling.top_p)
                   if sampling.temperature > 0 else None)
        if warpers is not None or (sampling.temperature <= 0 and plain_greedy(model.generation_config)):
            args = (model, ids.to(device), mask.to(device), list(budgets), set(self.eos_ids))
            if warpers is not None:
                gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
                rows = sample(*args, warpers, adapter_names, on_token, cancelled, gens)
            else:
                rows = greedy(*args, adapter_names, on_token, cancelled)
            return [self._result(r, row, budgets[r], cancelled, len(row)) for r, row in enumerate(rows)]
        if sampling.temperature > 0 and len(prompts) > 1:
            return [self._generate(model, [prompts[r]], [budgets[r]], sampling,
                                   (lambda _r, t, r=r: on_token(r, t)) if on_token else None,
                                   lambda _r, r=r: cancelled(r), [seeds[r]],
                                   [adapter_names[r]] if adapter_names is not None else None)[0]
                    for r in range(len(prompts))]
        width = ids.shape[1]
        kw = dict(max_new_tokens=max(budgets), pad_token_id=self.pad_id)
        if sampling.temperature > 0:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            torch.manual_seed(seeds[0])  # one prompt (above)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        done = [False] * len(prompts)
        made = [0] * len(prompts)

        def step(tokens: list[int]) -> None:
            for r, t in enumerate(tokens):
                if done[r]:
                    continue
                if t in self.eos_ids or made[r] >= budgets[r]:
                    done[r] = True
                    continue
                made[r] += 1
                if on_token is not None:
                    on_token(r, t)
                # generate pads a row _RowStop ended; a cancelled row ends here, as greedy/sample end it
                # (before 2026-12-02 its pads were streamed and returned as tokens)
                done[r] = done[r] or cancelled(r)

        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             stopping_criteria=StoppingCriteriaList([_RowStop(width, list(budgets), cancelled)]),
                             streamer=_Streamer(step), **kw,
                             **({"adapter_names": adapter_names} if adapter_names is not None else {}))
        return [self._result(r, [int(t) for t in gen[r, width:].tolist()], budgets[r], cancelled, made[r])
                for r in range(len(prompts))]

    def _result(self, r: int, new: list[int], budget: int, cancelled, made: int) -> Result:
        """Row ``r``'s answer (EOS excluded) and why it ended: ``made`` tokens were streamed."""
        new = new[:budget]
        cut = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
        if cut is not None:
            return Result(new[:cut], "stop")
        if cancelled(r):
            return Result(new[:made], "cancelled")
        return Result(new, "length")


def upstream_patches(stacks: dict[str, list[str | Path]]) -> dict:
    """Served name -> its one LoRA patch (``patches.Patch``), what upstream mode can serve: an engine
    such as vLLM applies one LoRA module per request. Raises SafetyPatchError for the reserved name
    ``base``, a stack of several patches, or a full-parameter delta (naming the way out)."""
    if BASE in stacks:
        raise SafetyPatchError(f"model name {BASE!r} is reserved for the unpatched base")
    out = {}
    for name, paths in stacks.items():
        ps = _read_stack(paths)
        what = f"--stack {name}" if len(paths) > 1 else f"--patch {paths[0]}"
        if len(ps) != 1:
            raise SafetyPatchError(f"{what}: upstream mode serves one LoRA patch per model name, got "
                                   f"{len(ps)} (the upstream engine applies one LoRA module per request)")
        if ps[0].format != "lora":
            # A gated delta cannot be merged either (the gate decides per request), so `patch merge`
            # is no way out for it.
            way_out = ("serve it embedded (without --upstream)" if ps[0].gated else
                       "serve it embedded, or merge it (`patch merge`) and point the engine at the merged model")
            raise SafetyPatchError(f"{what}: {ps[0].path} is a full-parameter delta, which an upstream "
                                   f"engine cannot apply per request (it serves LoRA modules); {way_out}")
        out[name] = ps[0]
    return out


class GateProbe:
    """The gates of patch stacks, run on a copy of the base truncated after the deepest gate layer.

    For upstream mode: the answer comes from another engine, so only the gates run here; a
    gate at layer L of N costs about (L+1)/N of a prefill and the memory of L+1 layers. Each
    stack is one LoRA patch (an engine such as vLLM applies one LoRA module per request).
    Raises SafetyPatchError for a stack that is not one LoRA patch, or a patch not made for
    this base (checked once on the full model, unless ``force``).
    """

    def __init__(self, model_spec: str, stacks: dict[str, list[str | Path]], device: str = "auto",
                 dtype: str = "auto", force: bool = False, patches: dict | None = None):
        """``patches``: :func:`upstream_patches` of ``stacks`` where the caller has read them already."""
        from transformers import AutoConfig, AutoModel

        from .. import runtime as rt
        from ..gate.probe import Gate
        from ..models import HUB_KERNELS, load_model
        from ..patches import verify

        self.patches = upstream_patches(stacks) if patches is None else patches
        self.gates = {n: Gate.load(p.path) for n, p in self.patches.items() if p.gated}
        # Fail closed: a gate was fit on one base; check that this is it (fingerprint, shapes, gate fit) on the full
        # model once, then keep only the truncated copy.
        full = load_model(model_spec, device=device, dtype=dtype)
        for p in self.patches.values():
            verify(p, full.model, full.fingerprint, force)
        self.tokenizer, self.name, where = full.tokenizer, full.name, full.path
        self.max_context = int(getattr(full.model.config, "max_position_embeddings", 0) or 2048)
        del full
        self.model = None
        self.layers_loaded = 0
        cfg = AutoConfig.from_pretrained(where)
        self.layers_total = cfg.num_hidden_layers
        if self.gates:
            runtime = rt.resolve(device, dtype)
            cfg.num_hidden_layers = max(max(g.layers) for g in self.gates.values()) + 1  # only these layers are loaded
            self.model = AutoModel.from_pretrained(where, config=cfg, dtype=runtime.dtype,
                                                   use_kernels=HUB_KERNELS).to(runtime.device).eval()
            self.layers_loaded = cfg.num_hidden_layers
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [BASE, *self.patches]

    def render(self, messages: Sequence[dict]) -> str:
        from ..generation import render

        with self._lock:
            return _render(render, self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def views(self, messages: Sequence[dict]) -> list[list[int]]:
        """Token ids of the texts a gate reads for ``messages`` (``generation.gate_views``)."""
        from ..generation import gate_views

        with self._lock:
            texts = _render(gate_views, self.tokenizer, messages)
            return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    @torch.inference_mode()
    def read(self, name: str, prompts: Sequence[Sequence[int]],
             views: Sequence[Sequence[Sequence[int]]] | None = None) -> list[Route]:
        """Route each prompt for model ``name``: its patch is active iff ungated or its gate fires on
        one of the prompt's ``views`` (default: the prompt alone)."""
        from ..gate.probe import route_states

        if name == BASE:
            return [Route(name) for _ in prompts]
        patch, gate = self.patches[name], self.gates.get(name)
        if gate is None:
            return [Route(name, [patch.name], active_ids=[patch.id]) for _ in prompts]
        views = [[list(p)] for p in prompts] if views is None else views
        flat = [ids for v in views for ids in v]
        with self._lock:
            states = route_states(self.model, flat, list(gate.layers))  # as PatchedModel.gate_scores reads them
        from ..patched import max_per_prompt

        logits = max_per_prompt(gate.scores(gate.read(states)), [len(v) for v in views])
        out = []
        for i in range(len(prompts)):
            fired = bool(logits[i] > gate.threshold)
            out.append(Route(name, [patch.name] if fired else [],
                             [GateReading(patch.name, gate.layer, float(logits[i]), float(gate.threshold), fired,
                                          gate.extra_layers, patch.id)], [patch.id] if fired else []))
        return out

"""Gated patches: a linear probe on the prompt decides, per prompt, whether a LoRA patch applies.

A refusal LoRA trained on safety data alone refuses nearly every attack, and nearly every
safe prompt that sounds like one (docs/lab-notebook.md). The base model's own hidden state at
the last prompt token separates the two far better than any patch trained so far
(experiments/separability.py). A gated patch keeps both: the adapter is the paper's refusal-only
LoRA, and a logistic-regression probe on the base model's residual stream at one layer
(``gate.safetensors``) decides per prompt whether the adapter is active for that prompt's
whole answer. Prompts the gate passes get the base model bit for bit.

Where the gate is read: the hidden state after decoder layer ``layer`` at the last token of
the text the model continues (the rendered chat prompt, assistant header included; with a
prefill attack, the end of the prefill). It is computed with the gated adapters *off* (the
model the probe was fit on), in a forward pass stopped after that layer.

Who applies it: ``patched.PatchedModel`` (what ``patches.attached`` yields) reads the gates
and routes; ``generation.complete_texts`` (every generation path), ``evaluation.capability``
(teacher-forced NLL/KL, gated on the prompt part), the serve engine and the gcg attack ask it
per prompt. A gated patch cannot be merged into weights, nor trained on top of (its adapter
is not always on), and lm-eval scoring refuses it; ``patches`` says so with an error. For
vLLM, the adapter folder loads unchanged; route a request to it (``LoRARequest``) only when
the gate fires (``safety-patch serve --upstream`` does, docs/deploy.md).

File: ``gate.safetensors`` holds ``weight`` [k·hidden], ``bias`` [1], ``mean`` and ``std``
[k·hidden] (feature standardisation), ``layer`` [k] and ``threshold`` (so editing either changes
the file hash that ``patch.json`` checks and the patch id that caches key on). k is the number
of layers the gate reads: 1 for every gate before 2026-12-02 (their files are unchanged); a
multi-layer gate concatenates the layers' features in the order ``layer`` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SafetyPatchError

# the one left-padding and batching that generation and the gates read with
from ..prompt_pass import left_padded, length_groups

GATE_FILE = "gate.safetensors"


@dataclass
class Gate:
    """logit = ((x - mean) / std) · weight + bias on the features x of a prompt; fires iff logit > threshold.

    x is the hidden state after decoder layer ``layer`` at the last prompt token ([hidden]), or,
    for a *final-norm* gate (``norm_weight`` set), that state passed through the base's final
    RMSNorm, x = h / sqrt(mean(h²) + norm_eps) · norm_weight (``norm_weight``: the scale the norm
    applies, its weight, or ``1 + weight`` for Gemma's; serve/export.effective_norm_scale), as a transformers
    ``*ForSequenceClassification`` head reads it. A final-norm gate with mean 0 and bias 0 that
    reads one layer is *exportable* (serve/export.py): its logit is exactly such a head's output.
    With ``extra_layers``, x is the concatenation of those features at ``layers`` = (``layer``,
    *``extra_layers``), in that order ([k·hidden]; the final norm applied to each layer's state):
    ``read`` builds it from per-layer states.
    """

    layer: int
    threshold: float
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    norm_weight: torch.Tensor | None = None
    norm_eps: float | None = None
    extra_layers: tuple[int, ...] = ()

    @property
    def layers(self) -> tuple[int, ...]:
        """Every decoder layer the gate reads, in the order of its features: (``layer``, *``extra_layers``)."""
        return (self.layer, *self.extra_layers)

    @property
    def exportable(self) -> bool:
        """Whether a sequence-classification checkpoint reproduces this gate's logits (one layer, final norm, no offset)."""
        return (self.norm_weight is not None and self.bias == 0.0 and not bool(self.mean.any())
                and not self.extra_layers)

    def read(self, states: dict[int, torch.Tensor]) -> torch.Tensor:
        """The gate's input from per-layer states ``{layer: [n, hidden]}`` (``layer_states``'s result):
        [n, k·hidden], the gate's layers in order. Raises SafetyPatchError for a layer not in ``states``."""
        missing = [i for i in self.layers if i not in states]
        if missing:
            raise SafetyPatchError(f"gate: no hidden states of layer {missing[0]} (the gate reads layers {list(self.layers)})")
        return states[self.layer] if not self.extra_layers else torch.cat([states[i] for i in self.layers], -1)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The probe's input for hidden states ``h`` [n, k·hidden]: ``h`` itself, or each layer's final-norm image (fp32).

        Stays on ``h``'s device and is differentiable in ``h`` (the adaptive attack takes its gradient)."""
        h = h.float()
        if self.norm_weight is None:
            return h
        k = len(self.layers)
        b = h.reshape(*h.shape[:-1], k, h.shape[-1] // k)  # one RMSNorm per layer's state
        b = b * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.to(h.device)
        return b.reshape(h.shape)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Probe logits [n] for hidden states [n, k·hidden] (``read``) on ``h``'s device, differentiable, unchecked.

        The one formula every reader of the gate uses: ``scores`` (routing, with its checks) and the
        adaptive GCG objective (attacks/gcg.py), which must push down exactly the logit that routes."""
        d = h.device
        return ((self.features(h) - self.mean.to(d)) / self.std.to(d)) @ self.weight.to(d) + self.bias

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Probe logits [n] for hidden states [n, k·hidden] (``read``; positive: harmful).

        Fails closed: a score that is not finite (a NaN hidden state) raises SafetyPatchError
        rather than reading as "not harmful" (every comparison with NaN is false).
        """
        h = h.float().cpu()
        if h.ndim != 2 or h.shape[1] != self.weight.shape[0]:
            raise SafetyPatchError(f"gate: hidden states have shape {tuple(h.shape)}, the gate's vectors have length "
                                   f"{self.weight.shape[0]} (a gate made for another model, or states of other layers "
                                   f"than its {list(self.layers)})")
        z = self.logits(h)
        bad = (~torch.isfinite(z)).nonzero()
        if len(bad):
            raise SafetyPatchError(f"gate: the probe score of prompt {int(bad[0])} is {float(z[bad[0]])}; the gate cannot "
                                   "decide, so nothing is routed (fail closed)")
        return z

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        """Whether the adapter applies, per prompt [n] bool (raises where the gate cannot decide)."""
        return self.scores(h) > self.threshold

    def check(self, where: str | Path) -> Gate:
        """Refuse a gate that cannot decide: returns self, or raises SafetyPatchError naming ``where``.

        Non-finite threshold, bias, weight, mean or std, a non-positive std, an all-zero weight
        (every prompt gets the same score) or vectors of different lengths all make the gate
        silently route every prompt one way; a NaN anywhere makes it never fire.
        """
        if not (self.weight.ndim == 1 and self.weight.shape == self.mean.shape == self.std.shape and len(self.weight)):
            raise SafetyPatchError(f"{where}: weight, mean and std must be non-empty vectors of one length, got "
                                   f"{tuple(self.weight.shape)}, {tuple(self.mean.shape)}, {tuple(self.std.shape)}")
        for name, v in (("threshold", self.threshold), ("bias", self.bias)):
            if not math.isfinite(v):
                raise SafetyPatchError(f"{where}: {name} is {v}; a gate needs a finite {name}")
        for name, t in (("weight", self.weight), ("mean", self.mean), ("std", self.std)):
            if not bool(torch.isfinite(t).all()):
                raise SafetyPatchError(f"{where}: {name} holds non-finite values (NaN or inf); the gate cannot decide")
        if not bool((self.std > 0).all()):
            raise SafetyPatchError(f"{where}: std has entries <= 0; features cannot be standardised")
        if not bool(self.weight.any()):
            raise SafetyPatchError(f"{where}: weight is all zeros; the gate would send every prompt the same way")
        if min(self.layers) < 0:
            raise SafetyPatchError(f"{where}: layer {min(self.layers)} is negative")
        if len(set(self.layers)) != len(self.layers):
            raise SafetyPatchError(f"{where}: layers {list(self.layers)} repeat a layer")
        k = len(self.layers)
        if len(self.weight) % k:
            raise SafetyPatchError(f"{where}: weight has length {len(self.weight)}, not a multiple of the {k} layers it reads")
        if (self.norm_weight is None) != (self.norm_eps is None):
            raise SafetyPatchError(f"{where}: a final-norm gate needs both norm_weight and norm_eps")
        if self.norm_weight is not None:
            if k * len(self.norm_weight) != len(self.weight) or not bool(torch.isfinite(self.norm_weight).all()):
                raise SafetyPatchError(f"{where}: norm_weight must be a finite vector of the weight's length per layer "
                                       f"({len(self.weight) // k})")
            if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
                raise SafetyPatchError(f"{where}: norm_eps is {self.norm_eps}; it must be finite and > 0")
        return self

    def save(self, folder: Path) -> Path:
        """Write ``gate.safetensors`` into ``folder``; raises SafetyPatchError for a gate that cannot decide."""
        from safetensors.torch import save_file

        path = Path(folder) / GATE_FILE
        self.check(path)
        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([float(self.bias)]),
                   "mean": self.mean.float().contiguous(), "std": self.std.float().contiguous(),
                   "layer": torch.tensor(list(self.layers), dtype=torch.int64),
                   "threshold": torch.tensor([float(self.threshold)])}
        if self.norm_weight is not None:  # absent for residual gates: their files (and patch ids) are unchanged
            tensors |= {"norm_weight": self.norm_weight.float().contiguous(), "norm_eps": torch.tensor([float(self.norm_eps)])}
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, folder: Path) -> Gate:
        from safetensors.torch import load_file

        path = Path(folder) / GATE_FILE
        try:
            t = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise SafetyPatchError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
        want = {"layer", "threshold", "weight", "bias", "mean", "std"}
        if {"norm_weight", "norm_eps"} & set(t):  # a final-norm gate: both or neither
            want |= {"norm_weight", "norm_eps"}
        if set(t) != want:
            missing, extra = sorted(want - set(t)), sorted(set(t) - want)
            raise SafetyPatchError(f"{path}: " + (f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{extra[0]}'"))
        if t["layer"].ndim != 1 or not t["layer"].numel():
            raise SafetyPatchError(f"{path}: tensor 'layer' must be a vector of one or more layers, has shape "
                                   f"{tuple(t['layer'].shape)}")
        for name in ("threshold", "bias", *(("norm_eps",) if "norm_eps" in t else ())):
            if t[name].numel() != 1:
                raise SafetyPatchError(f"{path}: tensor '{name}' must hold exactly one value, has shape {tuple(t[name].shape)}")
        if t["layer"].is_floating_point() or t["layer"].dtype == torch.bool:
            raise SafetyPatchError(f"{path}: tensor 'layer' must be an integer, has dtype {t['layer'].dtype}")
        for name in ("threshold", "bias", "weight", "mean", "std"):
            if not t[name].is_floating_point():
                raise SafetyPatchError(f"{path}: tensor '{name}' must be floating point, has dtype {t[name].dtype}")
        norm = {}
        if "norm_weight" in t:
            for name in ("norm_weight", "norm_eps"):
                if not t[name].is_floating_point():
                    raise SafetyPatchError(f"{path}: tensor '{name}' must be floating point, has dtype {t[name].dtype}")
            norm = {"norm_weight": t["norm_weight"].float(), "norm_eps": float(t["norm_eps"].reshape(-1)[0])}
        layers = [int(v) for v in t["layer"].tolist()]
        gate = cls(layers[0], float(t["threshold"].reshape(-1)[0]), t["weight"].float(),
                   float(t["bias"].reshape(-1)[0]), t["mean"].float(), t["std"].float(), **norm,
                   extra_layers=tuple(layers[1:]))
        return gate.check(path)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's block list (Llama, Qwen, Mistral, GPT-2 style), through PEFT wrappers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise SafetyPatchError("cannot find the model's decoder layers (a ModuleList of config.num_hidden_layers blocks)")


class _Stop(Exception):
    pass


def prompt_states(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden state after decoder layer ``layer`` at each prompt's last token: [n, hidden] fp32."""
    return layer_states(model, tokenizer, prompts, [layer], batch_size)[layer]


@torch.no_grad()
def layer_states(model, tokenizer, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                 batch_size: int = 8, progress=None) -> dict[int, torch.Tensor]:
    """Hidden states after each of ``layers`` at each prompt's last token: {layer: [n, hidden]}.

    Left-padded, length-sorted batches of at most ``batch_size`` prompts, cut where padding would
    cost more than another pass, with positions counted from each prompt's first real token;
    the forward pass stops after the deepest layer asked for (a gate at layer 15 of 30 costs
    half a prefill).
    """
    blocks = decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise SafetyPatchError(f"gate layer {bad[0]} out of range: the model has layers 0-{len(blocks) - 1}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[int, list] = {i: [None] * len(prompts) for i in layers}
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook_for(i: int):
        def hook(_mod, _inp, output):
            captured[i] = (output[0] if isinstance(output, tuple) else output)[:, -1].float().cpu()
            if i == last:
                raise _Stop
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in set(layers)]
    try:
        # batches cut where padding would cost more than another pass (prompt_pass.length_groups):
        # a router's batch of 550-token jailbreaks beside 40-token requests is otherwise mostly padding
        for idx in length_groups([len(p) for p in prompts], batch_size):
            ids, mask = left_padded([prompts[i] for i in idx], pad)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
            except _Stop:
                pass
            for li in layers:
                for r, i in enumerate(idx):
                    out[li][i] = captured[li][r]
            if progress is not None:  # progress(n): n more prompts read
                progress(len(idx))
    finally:
        for h in handles:
            h.remove()
    dim = getattr(model.config, "hidden_size", 0)
    return {li: torch.stack(v) if v else torch.zeros(0, dim) for li, v in out.items()}


ROUTE_MIN_BATCH = 64
"""Rows a routing pass may put in one forward pass whatever batch size its caller generates with
(``PatchedModel.gate_scores``): short rows in batches of 8 run the matmuls at a fraction of
their rate (bench/routing_speed.py)."""


def route_states(model, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                 max_batch: int = ROUTE_MIN_BATCH) -> dict[int, torch.Tensor]:
    """What a gate reads when it routes: the hidden states after each of ``layers`` at each
    prompt's last token, {layer: [n, hidden] fp32}, read in one pass that stops after the deepest.

    Read the way a gate's own training features are read by default (``gate.config.BATCHING``,
    :func:`safety_patch.shared_prefix.last_token_states_at`): a beginning several prompts share
    (the chat template's system turn, a jailbreak template's opening) is read once, the rest in
    passes of at most ``max_batch`` rows and 2,048 tokens. Equal to :func:`layer_states` to float
    rounding (tests/test_shared_prefix.py bounds it; bench/routing_speed.py counts the routes that
    change). ``prompts``: token ids, each non-empty. Raises SafetyPatchError for a layer the model
    lacks or an empty prompt.
    """
    from ..shared_prefix import last_token_states_at

    return last_token_states_at(model, prompts, layers, max_batch=max(1, max_batch))


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 300,
              intercept: bool = True, sample_weight: torch.Tensor | None = None,
              feature_scale: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """Class-balanced L2-regularised logistic regression on standardised features (LBFGS).

    Returns (weight, bias, mean, std). Deterministic for given inputs. ``intercept=False``: no
    centring and no bias (mean 0, bias 0; features only scaled by their std), the form a
    sequence-classification head can hold; the threshold then plays the intercept's role.
    ``sample_weight`` [n]: each row's weight in the mean loss instead of the class balance
    (each class half the loss), e.g. to weight groups within a class alike.
    ``feature_scale`` [features] (> 0): the standardised features are multiplied by it before the
    fit, so the L2 penalty on a feature's weight is ``l2 / scale²`` (a group penalty: a multi-layer
    gate's later layers at scale < 1 are pulled harder toward zero); the returned ``std`` is
    divided by it, so ``(x - mean) / std · weight`` is still the fitted logit.
    """
    mu, sd = x.mean(0), x.std(0) + 1e-6
    if feature_scale is not None:
        sd = sd / feature_scale
    if not intercept:
        mu = torch.zeros_like(mu)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=intercept)
    pos = float(y.mean())
    if not 0 < pos < 1:
        raise SafetyPatchError("the gate needs both harmful and benign training prompts")
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) if sample_weight is None else sample_weight
    opt = torch.optim.LBFGS([w, b] if intercept else [w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach()), mu, sd


def fit_gate(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], layer: int, threshold: float,
             l2: float = 1e-2, batch_size: int = 8) -> tuple[Gate, dict]:
    """Fit a gate on rendered prompt texts; returns it and its training-set statistics."""
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in list(harmful) + list(benign)]
    x = prompt_states(model, tokenizer, enc, layer, batch_size)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    w, b, mu, sd = fit_probe(x, y, l2)
    gate = Gate(layer, threshold, w, b, mu, sd)
    f = gate.fires(x)
    stats = {"layer": layer, "threshold": threshold, "l2": l2, "harmful": len(harmful), "benign": len(benign),
             "train_harmful_caught": round(float(f[y > 0].float().mean()), 4),
             "train_benign_flagged": round(float(f[y == 0].float().mean()), 4)}
    return gate, stats

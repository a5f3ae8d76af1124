"""Gated patches: a linear probe on the prompt decides, per prompt, whether a LoRA patch applies.

A refusal LoRA trained on safety data alone refuses nearly every attack, and nearly every
safe prompt that sounds like one (docs/recipes.md). The base model's own hidden state at
the last prompt token separates the two far better than any patch trained so far
(bench/separability.py). A gated patch keeps both: the adapter is the paper's refusal-only
LoRA, and a logistic-regression probe on the base model's residual stream at one layer
(``gate.safetensors``) decides per prompt whether the adapter is active for that prompt's
whole answer. Prompts the gate passes get the base model bit for bit.

Where the gate is read: the hidden state after decoder layer ``layer`` at the last token of
the text the model continues (the rendered chat prompt, assistant header included; with a
prefill attack, the end of the prefill). It is computed with the gated adapters *off* (the
model the probe was fit on), in a forward pass stopped after that layer.

What consults it: ``generation.complete_texts`` (every generation path) and
``evaluation.capability`` (teacher-forced NLL/KL, gated on the prompt part). A gated patch
cannot be merged into weights, nor trained on top of (its adapter is not always on), and
lm-eval scoring refuses it; ``patches.py`` says so with an error. For vLLM, the adapter
folder loads unchanged; route a request to it (``LoRARequest``) only when ``decide`` fires.

File: ``gate.safetensors`` holds ``weight`` [hidden], ``bias`` [1], ``mean`` and ``std``
[hidden] (feature standardisation), ``layer`` and ``threshold`` (so editing either changes
the file hash that ``patch.json`` checks and the patch id that caches key on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SafetyPatchError

GATE_FILE = "gate.safetensors"


@dataclass
class Gate:
    layer: int
    threshold: float
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Probe logits for hidden states [n, hidden] (positive: harmful)."""
        h = h.float().cpu()
        return ((h - self.mean) / self.std) @ self.weight + self.bias

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        return self.scores(h) > self.threshold

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / GATE_FILE
        save_file({"weight": self.weight.float().contiguous(), "bias": torch.tensor([float(self.bias)]),
                   "mean": self.mean.float().contiguous(), "std": self.std.float().contiguous(),
                   "layer": torch.tensor([self.layer], dtype=torch.int64),
                   "threshold": torch.tensor([float(self.threshold)])}, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, folder: Path) -> Gate:
        from safetensors.torch import load_file

        path = Path(folder) / GATE_FILE
        try:
            t = load_file(str(path))
            gate = cls(int(t["layer"][0]), float(t["threshold"][0]), t["weight"].float(), float(t["bias"][0]),
                       t["mean"].float(), t["std"].float())
        except KeyError as e:
            raise SafetyPatchError(f"{path}: missing tensor {e}") from None
        if not (gate.weight.shape == gate.mean.shape == gate.std.shape) or gate.weight.ndim != 1:
            raise SafetyPatchError(f"{path}: weight, mean and std must be vectors of one length")
        return gate


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
                 batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Hidden states after each of ``layers`` at each prompt's last token: {layer: [n, hidden]}.

    Left-padded, length-sorted batches with positions counted from each prompt's first real
    token; the forward pass stops after the deepest layer asked for (a gate at layer 15 of 30
    costs half a prefill).
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
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
                mask[r, width - len(prompts[i]) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
            except _Stop:
                pass
            for li in layers:
                for r, i in enumerate(idx):
                    out[li][i] = captured[li][r]
    finally:
        for h in handles:
            h.remove()
    dim = getattr(model.config, "hidden_size", 0)
    return {li: torch.stack(v) if v else torch.zeros(0, dim) for li, v in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 300) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """Class-balanced L2-regularised logistic regression on standardised features (LBFGS).

    Returns (weight, bias, mean, std). Deterministic for given inputs.
    """
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos = float(y.mean())
    if not 0 < pos < 1:
        raise SafetyPatchError("the gate needs both harmful and benign training prompts")
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

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


# ----------------------------------------------------------------------------- applying gates


def gates_of(model) -> dict:
    """{adapter name: Gate} of the gated patches attached to ``model`` (``patches.attached`` sets it)."""
    return getattr(model, "safety_gates", None) or {}


@contextlib.contextmanager
def active_adapters(model, names: Sequence[str]) -> Iterator[None]:
    """Only ``names`` of the model's LoRA adapters active inside the block; all of them again after."""
    everything = list(getattr(model, "safety_adapters", []))
    if not everything:
        yield
        return
    if not names:
        with model.disable_adapter():
            yield
        return
    model.base_model.set_adapter(list(names))
    try:
        yield
    finally:
        model.base_model.set_adapter(everything)


def decide(model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, list[bool]]:
    """Per gated adapter, whether its gate fires on each prompt (token ids of the text to continue)."""
    gates = gates_of(model)
    if not gates:
        return {}
    ungated = [a for a in model.safety_adapters if a not in gates]
    with active_adapters(model, ungated):  # one pass, however many gates and layers
        states = layer_states(model, tokenizer, prompts, sorted({g.layer for g in gates.values()}), batch_size)
    return {name: g.fires(states[g.layer]).tolist() for name, g in gates.items()}


def groups(model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8):
    """Split prompts by which adapters apply: [(prompt indices, context manager factory)].

    Without gated patches: one group, nothing changed. With them: one group per combination
    of gate decisions, each run with the ungated adapters plus the gated ones that fired.
    """
    fired = decide(model, tokenizer, prompts, batch_size)
    if not fired:
        return [(list(range(len(prompts))), contextlib.nullcontext)]
    by: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(prompts)):
        on = tuple(a for a in model.safety_adapters if a not in fired or fired[a][i])
        by.setdefault(on, []).append(i)
    return [(idx, (lambda on=on: active_adapters(model, on))) for on, idx in by.items()]

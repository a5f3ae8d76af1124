"""Activation-space analysis: hidden-state shifts and interference on real layer inputs."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..generation import render


def _encode(tokenizer, prompts: list[list[dict]]):
    return [tokenizer(render(tokenizer, p), add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]


@torch.inference_mode()
def hidden_states(model, encoded) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt: (last-token states [L+1, H], mean-over-tokens states [L+1, H]), one prompt at a time (no padding)."""
    dev = next(model.parameters()).device
    out = []
    for ids in encoded:
        hs = model(input_ids=ids.to(dev), output_hidden_states=True).hidden_states
        stack = torch.stack([h[0] for h in hs]).float().cpu()  # [L+1, T, H]
        out.append((stack[:, -1], stack.mean(1)))
    return out


def relative_shift(base, patched) -> dict[str, list[float]]:
    """Per layer mean of ||h_p - h_b|| / ||h_b|| at the last token and averaged over tokens."""
    last = torch.stack([(p[0] - b[0]).norm(dim=-1) / b[0].norm(dim=-1).clamp(min=1e-12) for b, p in zip(base, patched, strict=True)])
    mean = torch.stack([(p[1] - b[1]).norm(dim=-1) / b[1].norm(dim=-1).clamp(min=1e-12) for b, p in zip(base, patched, strict=True)])
    out: dict = {"last_token": last.mean(0).tolist(), "mean_tokens": mean.mean(0).tolist(), "n": int(last.shape[0])}
    for key, x in (("last_token", last), ("mean_tokens", mean)):
        out[f"{key}_ci95"] = _bootstrap_layers(x)
    return out


def _bootstrap_layers(x: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> list[list[float]]:
    """Per layer [low, high] 95% percentile-bootstrap interval of the mean over prompts; x is [prompts, layers]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n_boot, x.shape[0]), generator=g)
    means = x.float().cpu()[idx].mean(1)  # [n_boot, layers]
    lo, hi = torch.quantile(means, 0.025, dim=0), torch.quantile(means, 0.975, dim=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


@torch.inference_mode()
def capture_linear_inputs(model, encoded, modules: set[str], per_prompt: int = 8) -> dict[str, torch.Tensor]:
    """Inputs x to the named linear modules (last ``per_prompt`` tokens of each prompt)."""
    store: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    named = dict(model.named_modules())
    for name in modules:
        if name in named:
            def hook(mod, args, _name=name):
                store[_name].append(args[0][0, -per_prompt:].float().cpu())
            handles.append(named[name].register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for ids in encoded:
            model(input_ids=ids.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}

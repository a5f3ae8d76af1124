"""Per-module weight-space analysis of a patch, streaming one module at a time.

LoRA factors come from the adapter's safetensors, deltas from ``delta.safetensors``, and W0
from the base checkpoint's safetensors files, all opened lazily with ``safe_open``: peak
memory is one module's tensors plus its SVD, so an 8B model's analysis fits in 24 GB.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SafetyPatchError
from ..patches import DELTA_FILE, Patch
from . import subspace as sm

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Update:
    module: str  # e.g. model.layers.3.mlp.up_proj
    factors: tuple | None  # (B, A, scale) for LoRA
    dense: torch.Tensor | None  # W_ft - W0 for full-parameter patches

    @property
    def layer(self) -> int:
        m = _LAYER.search("." + self.module + ".")
        return int(m.group(1)) if m else -1

    @property
    def kind(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape [d_out, d_in]: B's rows by A's columns for LoRA, the dense delta's otherwise."""
        if self.factors is not None:
            B, A, _ = self.factors
            return int(B.shape[0]), int(A.shape[1])
        return tuple(self.dense.shape)


def lora_scale(cfg: dict, module: str) -> tuple[int, float]:
    r = cfg.get("rank_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["lora_alpha"])
    return r, alpha / (r**0.5 if cfg.get("use_rslora") else r)


def iter_updates(patch: Patch) -> Iterator[Update]:
    from safetensors import safe_open

    if patch.format == "lora":
        cfg = json.loads((patch.path / "adapter_config.json").read_text())
        with safe_open(str(patch.path / "adapter_model.safetensors"), framework="pt") as f:
            mods = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys() if ".lora_A." in k},
                          key=module_order)
            for m in mods:
                A = f.get_tensor(f"base_model.model.{m}.lora_A.weight")
                B = f.get_tensor(f"base_model.model.{m}.lora_B.weight")
                _, scale = lora_scale(cfg, m)
                yield Update(m, (B, A, scale), None)
    else:
        with safe_open(str(patch.path / DELTA_FILE), framework="pt") as f:
            for k in sorted(f.keys(), key=module_order):
                if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2 and ".layers." in k:
                    yield Update(k.removesuffix(".weight"), None, f.get_tensor(k))


def module_order(name: str):
    m = _LAYER.search("." + name + ".")
    return (int(m.group(1)) if m else -1, name)


def checkpoint_reader(model_spec: str) -> Callable[[str], torch.Tensor]:
    """name -> tensor from the base checkpoint's safetensors files, opened lazily."""
    from safetensors import safe_open

    from ..models import resolve_checkpoint

    source, where = resolve_checkpoint(model_spec)
    if source == "hub":
        from huggingface_hub import snapshot_download

        where = snapshot_download(where, allow_patterns=["*.safetensors", "*.json"])
    d = Path(where)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (d / "model.safetensors").is_file():
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            files = {k: d / "model.safetensors" for k in f.keys()}
    else:
        raise SafetyPatchError(f"{d}: no safetensors weights to analyse")

    def read(name: str) -> torch.Tensor:
        if name not in files:
            raise SafetyPatchError(f"{d}: no tensor {name} in the base checkpoint")
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read


def base_subspace(W0: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0's top-max(ks) singular triple (U0 [d_out, k], S0 [k], V0 [d_in, k]), k capped at min(W0.shape):
    the part of :func:`analyse_update` that depends on the base alone, computed once per module when
    several patches are analysed together."""
    W0 = W0.float()
    return sm.top_singular(W0, min(max(ks), min(W0.shape)))


def analyse_update(u: Update, W0: torch.Tensor, ks: list[int], r: int | None, baselines: dict,
                   base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Metrics of one module; returns (row of scalars, extras with vectors for activation analysis).
    ``base``: :func:`base_subspace` of this ``W0`` where the caller has it already."""
    W0 = W0.float()
    if u.factors is not None:
        B, A, scale = u.factors
        U, S, V = sm.factored_svd(B.float(), A.float(), scale)
        if r is not None and r > A.shape[0]:  # was clamped silently, and the row said the asked-for r
            from ..errors import SafetyPatchError

            raise SafetyPatchError(f"--r {r} is over the LoRA rank {A.shape[0]} of {u.module}: an update of rank "
                                   f"{A.shape[0]} has {A.shape[0]} directions (omit --r to use them all)")
        rr = r or A.shape[0]
        dW_fro = S.norm().item()
    else:
        rr = r or 8
        U, S, V = sm.top_singular(u.dense, max(rr, 32))
        dW_fro = u.dense.float().norm().item()
    Ur, Vr = U[:, :rr], V[:, :rr]
    kmax = min(max(ks), min(W0.shape))
    U0, S0, V0 = base if base is not None else base_subspace(W0, ks)
    d_out, d_in = W0.shape
    row = {"layer": u.layer, "module": u.kind, "name": u.module, "r": rr, "dW_fro": dW_fro, "W0_fro": W0.norm().item(),
           "rel_norm": dW_fro / max(W0.norm().item(), 1e-12), "eff_rank": sm.effective_rank(S), "sigma1": S[0].item()}
    for k in ks:
        k_ = min(k, kmax)
        row[f"k_used@{k}"] = k_  # k is capped at min(W0.shape): the row says where (summary_text too)
        for side, (Qd, Q0, dim) in {"in": (Vr, V0[:, :k_], d_in), "out": (Ur, U0[:, :k_], d_out)}.items():
            m = sm.overlap_metrics(Qd, Q0)
            key = (dim, rr, k_)
            if key not in baselines:
                baselines[key] = sm.random_baseline(dim, rr, k_)
            base = baselines[key]
            for name, v in m.items():
                row[f"{side}_{name}@{k}"] = v
            row[f"{side}_random_overlap@{k}"] = base["overlap"]
            row[f"{side}_random_max_entry@{k}"] = base["max_entry"]
            row[f"{side}_random_top_cosine@{k}"] = base["top_cosine"]
    return row, {"V0": V0, "Vd": Vr, "spectrum": S[:16].tolist()}

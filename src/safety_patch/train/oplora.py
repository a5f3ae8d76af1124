"""An OPLoRA-style constraint: keep the LoRA update off W0's dominant singular subspaces.

For a LoRA-wrapped linear layer with frozen weight W0 = U S Vᵀ, the update is ΔW = B A
(B: out × r, A: r × in). The paper this toolkit tests argues that a safety patch works
because ΔW is nearly orthogonal to W0's dominant subspace; OPLoRA (Xiong et al., 2025)
*enforces* it with the two-sided projection

    ΔW' = (I − U_k U_kᵀ) B A (I − V_k V_kᵀ),

so the update can neither read from W0's top-k input directions nor write into its top-k
output directions. We keep the constraint as a projected-gradient step rather than a
re-parametrisation: after initialisation and after every optimiser step, A's rows are
projected off V_k and B's columns off U_k. The adapter on disk is then a plain PEFT LoRA
whose B A already satisfies the constraint, so PEFT, vLLM and every patch operation load it
unchanged (a re-parametrisation would change the saved keys).

We project the weights, not the gradients: Adam's moment estimates would re-introduce the
projected-out components a step later, while projecting after every step keeps the
constraint exact whatever the optimiser does. Every rank projects the same weights with the
same bases, so DDP replicas stay identical.
"""

from __future__ import annotations

import torch

from ..errors import SafetyPatchError


def lora_layers(model, adapter: str = "default"):
    """(name, base weight, lora_A weight, lora_B weight) of every LoRA-wrapped linear layer."""
    for name, mod in model.named_modules():
        a, b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        base = getattr(mod, "base_layer", None)
        if a is None or b is None or base is None or adapter not in a:
            continue
        yield name, base.weight, a[adapter].weight, b[adapter].weight


def dominant_bases(model, k: int, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Top-``k`` left (U_k: out × k) and right (V_k: in × k) singular vectors of every adapted
    layer's W0, in fp32 on the weight's device; the same SVD the analysis measures overlap
    with (exact up to 1024 dimensions, randomised above)."""
    from ..analysis.subspace import top_singular

    bases = {}
    for name, w0, _, _ in lora_layers(model, adapter):
        if k >= min(w0.shape):
            raise SafetyPatchError(f"--orthogonal-k {k} must be below the smallest dimension of {name} ({tuple(w0.shape)})")
        u, _, v = top_singular(w0.detach(), k)
        bases[name] = (u.contiguous(), v.contiguous())
    if not bases:
        raise SafetyPatchError("--orthogonal-k needs a LoRA model; no LoRA layer found")
    return bases


@torch.no_grad()
def project_(model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str = "default") -> None:
    """A ← A (I − V Vᵀ), B ← (I − U Uᵀ) B, in place, for every layer in ``bases``."""
    for name, _, a, b in lora_layers(model, adapter):
        if name not in bases:
            continue
        u, v = bases[name]
        a32, b32 = a.float(), b.float()
        a.copy_((a32 - (a32 @ v) @ v.T).to(a.dtype))
        b.copy_((b32 - u @ (u.T @ b32)).to(b.dtype))


def overlap(model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str = "default") -> float:
    """Largest relative norm of A's rows inside V_k or B's columns inside U_k (0 = constraint holds)."""
    worst = 0.0
    for name, _, a, b in lora_layers(model, adapter):
        u, v = bases[name]
        a32, b32 = a.detach().float(), b.detach().float()
        for part, whole in ((a32 @ v, a32), (u.T @ b32, b32)):
            n = float(whole.norm())
            if n > 0:
                worst = max(worst, float(part.norm()) / n)
    return worst


def projection_callback(bases: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """A transformers TrainerCallback that projects after initialisation and after every
    optimiser step. ``bases`` come from the model being trained (``dominant_bases``), so a
    stack of earlier patches folded into the weights counts as W0."""
    from transformers import TrainerCallback

    class OrthogonalProjection(TrainerCallback):
        def __init__(self):
            self.bases = bases

        def on_train_begin(self, args, state, control, model=None, **kw):
            # Only a fresh adapter: a resumed one holds projected weights already, and projecting
            # again is not bit-exact in floating point (the resume would drift from a whole run).
            if state.global_step == 0:
                project_(model, self.bases)

        def on_step_end(self, args, state, control, model=None, **kw):
            project_(model, self.bases)

    return OrthogonalProjection()

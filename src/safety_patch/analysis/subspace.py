"""Subspace maths on weight updates: pure tensor-in, number-out functions, always fp32.

* ``factored_svd``: thin SVD of scale * B @ A from QR factorisations of B and A^T, without
  forming the d_out x d_in matrix (cf. TransformerLens ``FactoredMatrix``);
* ``top_singular``: top-k singular vectors, exact when small, randomised otherwise;
* ``overlap_metrics``: the paper's max-entry similarity, the normalised overlap
  ||V_d^T V_0||_F^2 / r, principal-angle cosines, and what random subspaces would give;
* ``effective_rank``: exp of the entropy of the normalised singular values (Roy & Vetterli 2007).
"""

from __future__ import annotations

import math

import torch

EXACT_LIMIT = 1024  # exact SVD up to this smaller dimension; randomised (svd_lowrank) above


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, r: int | None = None):
    """SVD of ``scale * B @ A`` (B: d_out x r, A: r x d_in) -> (U: d_out x r, S: r, V: d_in x r)."""
    B, A = B.double(), A.double()
    qb, rb = torch.linalg.qr(B)  # B = Qb Rb
    qa, ra = torch.linalg.qr(A.T)  # A^T = Qa Ra
    core = rb @ ra.T  # r x r: scale * Qb (Rb Ra^T) Qa^T
    us, s, vsh = torch.linalg.svd(core)
    U, V = qb @ us, qa @ vsh.T
    s = s * abs(scale)
    if scale < 0:
        U = -U
    if r is not None:
        U, s, V = U[:, :r], s[:r], V[:, :r]
    return U.float(), s.float(), V.float()


def top_singular(W: torch.Tensor, k: int, exact_limit: int = EXACT_LIMIT, seed: int = 0):
    """Top-k (U, S, V) of W; exact SVD when min(W.shape) <= exact_limit, else torch.svd_lowrank."""
    W = W.float()
    k = min(k, min(W.shape))
    if min(W.shape) <= exact_limit:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    # svd_lowrank draws its random test matrix from the global RNG: fork it so that a seeded
    # call neither depends on nor changes the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=min(k + 16, min(W.shape)), niter=6)
    return U[:, :k], S[:k], V[:, :k]


def principal_cosines(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(Q1) and span(Q2) (orthonormal columns)."""
    return torch.linalg.svdvals(Q1.double().T @ Q2.double()).clamp(0, 1).float()


def random_baseline(d: int, r: int, k: int, draws: int = 8, seed: int = 0) -> dict:
    """What random r- and k-dimensional subspaces of R^d give: overlap k/d exactly; the rest by sampling."""
    g = torch.Generator().manual_seed(seed)
    max_entry, top_cos = [], []
    for _ in range(draws):
        q1, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
        m = q1.T @ q2
        max_entry.append(m.abs().max().item())
        top_cos.append(torch.linalg.svdvals(m).max().item())
    return {"overlap": k / d, "max_entry": sum(max_entry) / draws, "top_cosine": sum(top_cos) / draws}


def overlap_metrics(Vd: torch.Tensor, V0: torch.Tensor) -> dict:
    """Similarity of the update's subspace span(Vd) (d x r) to the weight's top-k span(V0) (d x k)."""
    m = Vd.double().T @ V0.double()
    cos = torch.linalg.svdvals(m).clamp(0, 1)
    r = Vd.shape[1]
    return {
        "max_entry": m.abs().max().item(),  # the paper's similarity
        "overlap": (m.pow(2).sum() / r).item(),  # share of the update's directions inside span(V0)
        "top_cosine": cos.max().item(),
        "mean_cosine": cos.mean().item(),
    }


def effective_rank(s: torch.Tensor) -> float:
    s = s.double().clamp(min=0)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def interference_terms(W0: torch.Tensor, dW_factors, x: torch.Tensor, V0: torch.Tensor, Vd: torch.Tensor) -> dict:
    """Split inputs x (n x d_in) into span(V0), span(Vd) and the rest, and measure the cross terms.

    With x0 = P0 x, xd = Pd x, xr = x - x0 - xd (exact, whatever the angle between the spans):
    (W0 + dW) x = W0 x0 + W0 xd + W0 xr + dW x0 + dW xd + dW xr. Reported per input (means):
    ``interference`` = ||W0 xd + dW x0||, ``intended`` = ||dW xd||, ``base`` = ||W0 x0||.
    ``dW_factors`` is (B, A, scale) for LoRA or a dense dW.
    """
    x = x.float()
    P0 = V0 @ V0.T
    Pd = Vd @ Vd.T
    x0, xd = x @ P0, x @ Pd
    xr = x - x0 - xd

    def dW(v):
        if isinstance(dW_factors, tuple):
            B, A, scale = dW_factors
            return scale * (v @ A.float().T) @ B.float().T
        return v @ dW_factors.float().T

    W = W0.float()
    terms = {"W0x0": x0 @ W.T, "W0xd": xd @ W.T, "W0xr": xr @ W.T, "dWx0": dW(x0), "dWxd": dW(xd), "dWxr": dW(xr)}
    inter = (terms["W0xd"] + terms["dWx0"]).norm(dim=-1)
    return {
        "interference": inter.mean().item(),
        "intended": terms["dWxd"].norm(dim=-1).mean().item(),
        "base": terms["W0x0"].norm(dim=-1).mean().item(),
        "interference_over_intended": (inter / terms["dWxd"].norm(dim=-1).clamp(min=1e-12)).mean().item(),
        "interference_over_base": (inter / terms["W0x0"].norm(dim=-1).clamp(min=1e-12)).mean().item(),
        "_terms": terms,
    }

"""Figures for the analysis stage (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlap_heatmap(rows: list[dict], patch: str, k: int, out: Path) -> Path:
    plt = _plt()
    import numpy as np

    rs = [r for r in rows if r["patch"] == patch]
    layers = sorted({r["layer"] for r in rs})
    mods = list(dict.fromkeys(r["module"] for r in rs))
    grid = np.full((len(mods), len(layers)), np.nan)
    for r in rs:
        grid[mods.index(r["module"]), layers.index(r["layer"])] = r[f"in_overlap@{k}"]
    base = rs[0][f"in_random_overlap@{k}"] if rs else float("nan")
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 0.45 * len(mods) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.05, float(np.nanmax(grid)) if rs else 1))
    ax.set_yticks(range(len(mods)), mods)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{patch}: share of update input directions in W0's top-{k} subspace (random: {base:.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out / f"overlap_heatmap_{patch}_k{k}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_layer(rows: list[dict], metric: str, ylabel: str, out: Path, name: str, baseline: str | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["patch"]][r["layer"]].append(r[metric])
    for patch, d in by.items():
        xs = sorted(d)
        ax.plot(xs, [sum(d[x]) / len(d[x]) for x in xs], marker="o", ms=3, label=patch)
    if baseline:
        vals = [r[baseline] for r in rows]
        ax.axhline(sum(vals) / len(vals), ls="--", color="grey", label="random subspace")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hidden_shift(shifts: dict, out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, where in zip(axes, ("last_token", "mean_tokens"), strict=True):
        for patch, d in shifts.items():
            for kind, style in (("benign", "-"), ("jailbreak", "--")):
                if kind in d:
                    ys = d[kind][where]
                    n = d[kind].get("n")
                    (line,) = ax.plot(range(len(ys)), ys, style, label=f"{patch} {kind}" + (f" (n={n})" if n else ""))
                    ci = d[kind].get(f"{where}_ci95")
                    if ci:  # the mean over prompts is an estimate: draw its 95% bootstrap band
                        ax.fill_between(range(len(ci)), [c[0] for c in ci], [c[1] for c in ci], color=line.get_color(),
                                        alpha=0.2, lw=0)
        ax.set_title(f"relative hidden-state shift ({where.replace('_', ' ')})")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("||h_patched - h_base|| / ||h_base||")
    fig.suptitle("mean over prompts; shaded: 95% bootstrap interval", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "hidden_shift.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

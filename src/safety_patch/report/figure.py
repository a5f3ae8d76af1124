"""The trade-off figure: safety against capability drift and over-refusal, every point with its 95% interval."""

from __future__ import annotations

from pathlib import Path

from .read import RunData


def _estimate(d: dict | None, flip: bool = False) -> tuple[float, float, float, int] | None:
    """(value, 95% low, 95% high, n) of a stats.py estimate; ``flip`` gives 1 - the proportion."""
    if not d or d.get("value") is None or None in (d.get("ci95") or [None]):
        return None
    v, (lo, hi) = d["value"], d["ci95"]
    return (1 - v, 1 - hi, 1 - lo, d.get("n", 0)) if flip else (v, lo, hi, d.get("n", 0))


def tradeoff_figure(rd: RunData, out: Path) -> Path | None:
    """Safety against capability drift and over-refusal, every point with its 95% interval on both axes.

    Rates are drawn on their whole 0-1 range (a zoomed axis makes differences inside the noise
    look like results); the capability axis is the paired per-token NLL difference patched - base
    with its bootstrap interval, so the base model is the vertical line at 0. Names go in a
    legend with n, not on the points, so that close points keep legible labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for m in rd.models:
        safety = _estimate(rd.asr(m), flip=True)
        if safety is None:
            continue
        cap = rd.eval[m]["capability"] if m in rd.eval else None
        dnll = _estimate(((cap or {}).get("runs", {}).get("delta") or {}).get("nll")) if m != "base" else (0.0, 0.0, 0.0, 0)
        pts.append((m, safety, dnll, _estimate(rd.borderline(m))))
    if not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    markers = "osD^vP*Xh<>"
    for i, (name, (sv, slo, shi, sn), dnll, over) in enumerate(pts):
        style = dict(fmt=markers[i % len(markers)], ms=6, capsize=3, elinewidth=1, color=f"C{i % 10}")
        label = f"{name} (n={sn})"
        if dnll is not None:
            axes[0].errorbar(dnll[0], sv, xerr=[[dnll[0] - dnll[1]], [dnll[2] - dnll[0]]], yerr=[[sv - slo], [shi - sv]],
                             label=label, **style)
        if over is not None:
            ov, olo, ohi, on = over
            axes[1].errorbar(ov, sv, xerr=[[ov - olo], [ohi - ov]], yerr=[[sv - slo], [shi - sv]],
                             label=f"{name} (n={sn}; borderline n={on})", **style)
    axes[0].axvline(0, color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("reference-answer NLL/token, patched - base (lower is better)")
    axes[1].set_xlabel("borderline-benign prompts not answered (refused + degenerate; lower is better)")
    axes[1].set_xlim(-0.02, 1.02)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("safety: 1 - attack success")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("Safety against capability and over-refusal (bars: 95% intervals)")
    fig.tight_layout()
    path = out / "tradeoff.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

"""``safety-patch analyze``: weight-space and activation-space analysis of one or more patches.

Writes into DIR: ``weights.csv`` (tidy: layer, module, patch, metric, value), ``weights.json``
(one record per module and patch), ``activations.json`` (hidden shifts, interference),
``summary.json`` / ``summary.txt`` (medians against the random baseline, worst modules) and
PNG figures.
"""

from __future__ import annotations

import csv
import heapq
import io
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_dir, write_json, write_text
from ..errors import SafetyPatchError
from ..patches import read_patch
from . import plots
from .subspace import interference_terms
from .weights import analyse_update, base_subspace, checkpoint_reader, iter_updates, module_order

SCALARS_SKIP = {"layer", "module", "name", "patch"}


def analyse_weights(patches: list, read_w0, ks: list[int], r: int | None = None,
                    keep_vectors: dict[str, set[str]] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Per-module rows of every patch (patch by patch, modules in layer order) and, per patch, the
    (update, extras) of the modules ``keep_vectors[patch name]`` names.

    The patches' updates are read module by module in step (one merged stream), so each base
    weight is read and decomposed once for all patches, and memory holds one module at a time."""
    rows: list[list[dict]] = [[] for _ in patches]
    vectors: dict[str, dict] = {p.name: {} for p in patches}
    baselines: dict = {}

    def stream(i: int):
        return ((module_order(u.module), i, u) for u in iter_updates(patches[i]))

    streams = [stream(i) for i in range(len(patches))]
    module, W0, base = None, None, None
    for _, i, u in heapq.merge(*streams, key=lambda t: t[:2]):
        if u.module != module:
            module, W0 = u.module, read_w0(u.module + ".weight")
            base = None
        if tuple(W0.shape) != u.shape:  # another base (`--force` skips the fingerprint check): no geometry to compare
            from ..errors import SafetyPatchError

            raise SafetyPatchError(f"patch {patches[i].name!r}: {u.module} has ΔW of shape {list(u.shape)} but the base's "
                                   f"weight is {list(W0.shape)}: the patch was made for another model (drop --force, "
                                   "or analyse it against its own base)")
        if base is None:
            base = base_subspace(W0, ks)
        row, extra = analyse_update(u, W0, ks, r, baselines, base)
        row["patch"] = patches[i].name
        rows[i].append(row)
        if keep_vectors is not None and u.module in keep_vectors.get(patches[i].name, ()):
            vectors[patches[i].name][u.module] = (u, extra)
    return [row for rs in rows for row in rs], vectors


def summarise(rows: list[dict], ks: list[int]) -> dict:
    out = {}
    for patch in dict.fromkeys(r["patch"] for r in rows):
        rs = [r for r in rows if r["patch"] == patch]
        s = {"modules": len(rs), "median_rel_norm": statistics.median(r["rel_norm"] for r in rs),
             "median_dW_fro": statistics.median(r["dW_fro"] for r in rs)}
        for k in ks:
            s[f"median_in_overlap@{k}"] = statistics.median(r[f"in_overlap@{k}"] for r in rs)
            s[f"random_in_overlap@{k}"] = statistics.median(r[f"in_random_overlap@{k}"] for r in rs)
            s[f"median_in_max_entry@{k}"] = statistics.median(r[f"in_max_entry@{k}"] for r in rs)
            s[f"random_in_max_entry@{k}"] = statistics.median(r[f"in_random_max_entry@{k}"] for r in rs)
            s[f"median_out_overlap@{k}"] = statistics.median(r[f"out_overlap@{k}"] for r in rs)
            s[f"random_out_overlap@{k}"] = statistics.median(r[f"out_random_overlap@{k}"] for r in rs)
            s[f"k_capped@{k}"] = sum(r.get(f"k_used@{k}", k) < k for r in rs)
        k = ks[len(ks) // 2]
        worst = sorted(rs, key=lambda r: r[f"in_overlap@{k}"] / max(r[f"in_random_overlap@{k}"], 1e-12), reverse=True)[:3]
        s["worst_modules"] = [{"name": r["name"], f"in_overlap@{k}": r[f"in_overlap@{k}"],
                               "random": r[f"in_random_overlap@{k}"]} for r in worst]
        out[patch] = s
    return out


def _tidy_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "module", "patch", "metric", "value"])
    for r in rows:
        for k, v in r.items():
            if k not in SCALARS_SKIP:
                w.writerow([r["layer"], r["module"], r["patch"], k, v])
    return buf.getvalue()


def analyze(model: str, patches: list, out: str | Path, ks: tuple[int, ...] = (8, 32, 128), r: int | None = None,
            benign: list[list[dict]] | None = None, jailbreak: list[list[dict]] | None = None, device: str = "auto",
            force: bool = False, overwrite: bool = False, interference_k: int | None = None,
            prompt_sources: dict | None = None) -> dict:
    """``prompt_sources``: where ``benign`` / ``jailbreak`` came from (recorded in summary.json)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SafetyPatchError(f"{out} exists; pass --overwrite to replace it")
    ps = [read_patch(p) for p in patches]
    if len({p.name for p in ps}) != len(ps):  # a reproduce run's arms are all ".../<arm>/patch"
        same = next(p.name for p in ps if sum(q.name == p.name for q in ps) > 1)
        given = ", ".join(str(q) for q, p in zip(patches, ps, strict=True) if p.name == same)
        raise SafetyPatchError(f"two --patch folders are named {same!r} ({given}): "
                               "folder names label the results; link or copy them under distinct names "
                               "(a reproduce run's analysis stage links each arm's patch as 05-analysis/patches/<arm>)")
    bases = {p.base_fingerprint for p in ps}
    if len(bases) > 1:  # one W0 is read for all: patches of other bases would be measured against the wrong weights
        raise SafetyPatchError("the patches were trained on different base models (base fingerprints "
                               + ", ".join(f"{p.name}: {p.base_fingerprint[:12]}" for p in ps) + "); analyse each with its own --model")
    ks = sorted(set(ks))
    from ..models import load_model

    lm = load_model(model, device=device)  # its fingerprint: the W0 read below must be the patches' base
    lm_fp, want_vectors = lm.fingerprint, bool(benign or jailbreak)
    forced = check_analysable(ps, lm_fp, model, force)
    if not want_vectors:  # weights only: W0 is read from the checkpoint's files, module by module
        lm = None
    read_w0 = checkpoint_reader(model)
    t0 = time.time()
    all_rows, vecs = analyse_weights(ps, read_w0, ks, r,
                                     keep_vectors={p.name: _sample_modules(p) for p in ps} if want_vectors else None)
    weight_s = time.time() - t0
    summary = summarise(all_rows, ks)
    activ = {}
    if want_vectors:
        activ = _activations(lm, ps, vecs, benign or [], jailbreak or [], read_w0, force, interference_k or ks[len(ks) // 2])
        lm = None
    with atomic_dir(out, overwrite=overwrite, kind="analysis") as tmp:
        write_text(tmp / "weights.csv", _tidy_csv(all_rows))
        write_json(tmp / "weights.json", all_rows)
        from ..provenance import provenance

        k_int = interference_k or ks[len(ks) // 2]
        write_json(tmp / "summary.json", {
            "summary": summary, "ks": ks, "weight_seconds": round(weight_s, 2),
            "patches": [{"name": p.name, "path": str(p.path), "id": p.id, "method": p.meta.get("method"),
                         # a gated patch's ΔW and activation figures are its adapter's, always on
                         "gated": p.gated, "base_fingerprint": p.base_fingerprint} for p in ps],
            "config": {"model": model, "ks": ks, "r": r, "interference_k": k_int if want_vectors else None,
                       "n_prompts": {"benign": len(benign or []), "jailbreak": len(jailbreak or [])},
                       "prompt_sources": prompt_sources or {}, "activations": bool(activ)},
            # the model whose W0 was read (with --force it may differ from a patch's own base)
            "base_fingerprint": lm_fp, **({"forced": forced} if forced else {}), **provenance(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if activ:
            write_json(tmp / "activations.json", activ)
        k_mid = ks[len(ks) // 2]
        for p in ps:
            plots.overlap_heatmap(all_rows, p.name, k_mid, tmp)
        plots.per_layer(all_rows, f"in_overlap@{k_mid}", f"overlap with W0 top-{k_mid} (input side)", tmp,
                        "overlap_per_layer", baseline=f"in_random_overlap@{k_mid}")
        plots.per_layer(all_rows, "rel_norm", "||dW||_F / ||W0||_F", tmp, "magnitude_per_layer")
        if activ.get("hidden_shift"):
            plots.hidden_shift(activ["hidden_shift"], tmp)
        write_text(tmp / "summary.txt", summary_text(summary, ks, activ, skipped=not want_vectors,
                                                     gated=[p.name for p in ps if p.gated], forced=forced))
    return {"summary": summary, "activations": activ, "weight_seconds": weight_s, "gated": [p.name for p in ps if p.gated],
            "forced": forced}


def _sample_modules(patch) -> set[str]:
    """Modules whose inputs feed the interference analysis: every module of every 4th layer."""
    names = {u.module for u in iter_updates(patch)}
    return {n for n in names if (int(n.split(".layers.")[1].split(".")[0]) % 4 == 0 if ".layers." in n else False)}


def check_analysable(ps: list, fingerprint: str, model: str, force: bool) -> list[str]:
    """Refuse what would measure a ΔW against the wrong W0: a patch trained on another base than
    ``model`` (fingerprints differ), or on top of other patches (its W0 is base + those, which
    ``analyze`` does not build). With ``force`` each is measured against ``model``'s weights anyway
    and the returned lines (recorded in summary.json as ``forced``) say so. Raises SafetyPatchError."""
    why = []
    for p in ps:
        if p.base_fingerprint != fingerprint:
            why.append(f"patch {p.path} was trained on base {p.base_fingerprint[:12]}, but --model {model} is "
                       f"{fingerprint[:12]}: its ΔW would be measured against another model's W0")
        if p.stack:
            why.append(f"patch {p.path} was trained on top of patch(es) {', '.join(s[:12] for s in p.stack)}: "
                       "its ΔW is measured against the base's W0, not base + those")
    if why and not force:
        raise SafetyPatchError(why[0] + (f" (and {len(why) - 1} more)" if len(why) > 1 else "")
                               + "; pass --force to measure anyway (summary.json records it as 'forced')")
    return why


def _activations(lm, ps, vecs, benign, jailbreak, read_w0, force, k) -> dict:
    from ..patches import attached
    from .activations import _encode, capture_linear_inputs, hidden_states, relative_shift

    sets = {"benign": _encode(lm.tokenizer, benign), "jailbreak": _encode(lm.tokenizer, jailbreak)}
    sets = {k_: v for k_, v in sets.items() if v}
    base_h = {name: hidden_states(lm.model, enc) for name, enc in sets.items()}
    modules = set().union(*[set(v) for v in vecs.values()]) if vecs else set()
    inputs = {name: capture_linear_inputs(lm.model, enc, modules) for name, enc in sets.items()}
    shifts, inter = {}, {}
    for p in ps:
        # With each patch always on (gates bypassed): for a gated patch they describe the adapter itself.
        with attached(lm.model, [p], lm.fingerprint, force) as pm, pm.all_on() as m:
            shifts[p.name] = {name: relative_shift(base_h[name], hidden_states(m, enc)) for name, enc in sets.items()}
        rows = []
        for mod, (u, extra) in vecs[p.name].items():
            W0 = read_w0(mod + ".weight")
            dW = u.factors if u.factors is not None else u.dense
            for name in sets:
                if mod not in inputs[name]:
                    continue
                t = interference_terms(W0, dW, inputs[name][mod], extra["V0"][:, :k], extra["Vd"])
                t.pop("_terms")
                rows.append({"module": mod, "layer": u.layer, "set": name, **t})
        inter[p.name] = rows
    # Hidden states are taken with each adapter always on: for a gated patch (gate/probe.py) they
    # describe the adapter itself; on prompts its gate passes, the patched model is the base.
    return {"hidden_shift": shifts, "interference": inter, "interference_k": k,
            "n_prompts": {name: len(enc) for name, enc in sets.items()},
            "gated_patches_measured_ungated": [p.name for p in ps if p.gated]}


def summary_text(summary: dict, ks: list[int], activ: dict, skipped: bool = False, gated: Sequence[str] = (),
                 forced: Sequence[str] = ()) -> str:
    """The readable summary; ``skipped``: no prompts were given, so the activation analysis did not run (said so);
    ``gated``: names of gated patches, whose header says that ΔW and the activation figures describe
    the adapter always on (a user's trial found this recorded only inside activations.json);
    ``forced``: what ``--force`` waived (:func:`check_analysable`), said first."""
    lines = [f"measured with --force: {why}" for why in forced]
    for patch, s in summary.items():
        lines.append(f"== {patch} ({s['modules']} modules)"
                     + (" [gated: its adapter measured always on; on prompts its gate passes, the patched model "
                        "is the base]" if patch in gated else ""))
        lines.append(f"  median ||dW||/||W0||: {s['median_rel_norm']:.4g}   median ||dW||_F: {s['median_dW_fro']:.4g}")
        for k in ks:
            lines.append(f"  k={k:<4} input-side overlap {s[f'median_in_overlap@{k}']:.4f} (random {s[f'random_in_overlap@{k}']:.4f}); "
                         f"paper max-entry {s[f'median_in_max_entry@{k}']:.4f} (random {s[f'random_in_max_entry@{k}']:.4f}); "
                         f"output-side overlap {s[f'median_out_overlap@{k}']:.4f} (random {s[f'random_out_overlap@{k}']:.4f})"
                         + (f" [k capped at min(W0.shape) on {s[f'k_capped@{k}']} of {s['modules']} modules: "
                            "there W0 has no more directions]" if s.get(f"k_capped@{k}") else ""))
        lines.append("  most aligned modules: " + ", ".join(w["name"] for w in s["worst_modules"]))
        sh = activ.get("hidden_shift", {}).get(patch)
        if sh:
            for name, d in sh.items():
                lines.append(f"  hidden shift on {name} prompts (last token, final layer): {d['last_token'][-1]:.4f}")
        rows = activ.get("interference", {}).get(patch)
        if rows:
            for name in sorted({r["set"] for r in rows}):
                rs = [r for r in rows if r["set"] == name]
                lines.append(f"  interference/intended on {name} inputs (median): "
                             f"{statistics.median(r['interference_over_intended'] for r in rs):.4f}; "
                             f"interference/base: {statistics.median(r['interference_over_base'] for r in rs):.4f}")
    if skipped:
        lines.append("activation analysis (hidden shift, interference): not run: no prompts (give --data, or "
                     "--benign/--jailbreak)")
    return "\n".join(lines) + "\n"


def default_prompts(data_dir: str | Path, n: int = 16) -> tuple[list, list]:
    """Benign (held-out general) and jailbreak (held-out wrapped requests) conversations from a data folder."""
    from ..data.folder import DataFolder

    d = DataFolder(data_dir)
    benign = d.prompts("general", "test")[:n]
    jail = [r["messages"][:1] for r in d.rows("test") if r["meta"]["template"] != "direct"][:n]
    return benign, jail


__all__ = ["analyze", "default_prompts"]

"""``gate fit``, ``gate apply``, ``gate eval`` and ``gate export``: the gate as its own stage (docs/gate.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OverwriteResultsOpt,
    _finite,
    _float_list,
    _int_list,
    _number_list,
    _open_unit,
    _rate_or_none,
    gate_app,
)


@gate_app.command("fit")
def gate_fit_cmd(
    data: Annotated[Path, typer.Option(help="Data folder from `data build` (the gate learns from its train split, "
                                            "is measured on its validation split).")],
    out: Annotated[Path, typer.Option(help="Gate folder to write (atomically): gate.safetensors + gate.json.")],
    layer: Annotated[int | None, typer.Option(min=0, help="Decoder layer the probe reads (default: see --depth).")] = None,
    depth: Annotated[float | None, typer.Option(min=0.0, max=1.0, callback=_finite,
                                                help="The layer as a fraction of depth (default 0.6).")] = None,
    threshold: Annotated[float | None, typer.Option(callback=_finite, help="Probe logit above which the gate fires "
                                                                          "(instead of --target-fpr).")] = None,
    target_fpr: Annotated[float | None, typer.Option(callback=_open_unit,
                                                     help="The threshold is the logit at this false-positive rate on the "
                                                          "validation split's benign prompts, in (0, 1) (default 0.03).")] = None,
    wrapped_benign: Annotated[int | None, typer.Option(min=0, help="Benign train prompts wrapped in train templates as negatives (default 600).")] = None,
    wrapped_harmful: Annotated[int | None, typer.Option(min=0, help="Harmful train requests wrapped in train templates as positives (default 400).")] = None,
    self_instruct: Annotated[int | None, typer.Option(min=0, help="Self-written requests (data build --self-instruct) as negatives (default 600).")] = None,
    l2: Annotated[float | None, typer.Option(min=0.0, callback=_finite, help="L2 penalty of the probe (default 0.01).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the prompt pool's sampling and wrapping (default 0).")] = None,
    features: Annotated[str | None, typer.Option(help="final-norm (default: the layer's state through the base's final "
                                                 "norm, fit without intercept, so `gate export` is exact) | residual.")] = None,
    rephrased: Annotated[int | None, typer.Option(min=0, help="Harmful and benign train requests re-asked in the other "
                                                  "form, added to each side (default 600).")] = None,
    phrasings: Annotated[str | None, typer.Option(help="Comma-separated phrasing families of the re-asked prompts, each "
                                                  "drawn --rephrased times per side: reask, context, third_person, "
                                                  "hedged, terse (default: reask).")] = None,
    written_harmful: Annotated[bool | None, typer.Option(
        "--written-harmful/--no-written-harmful",
        help="Add the 129 hand-written harmful requests (22 harm categories) to the positives as a third source "
             "(default: on).")] = None,
    written_harmful_more: Annotated[bool | None, typer.Option(
        "--written-harmful-more/--no-written-harmful-more",
        help="Add 144 more hand-written harmful requests, by category, to the written source (needs "
             "--written-harmful, and off with --no-written-harmful; default: on).")] = None,
    written_lookalikes: Annotated[bool | None, typer.Option(
        "--written-lookalikes/--no-written-lookalikes",
        help="Add 176 hand-written safe look-alikes, by category, to the negatives; `gate eval` then scores the "
             "gate on them by a 2-fold cross-fit (each half by a refit that never saw it; default: on).")] = None,
    extra_layers: Annotated[str | None, typer.Option(help="Comma-separated further decoder layers read beside --layer "
                                                     "(a multi-layer gate; `gate export` refuses it), or none for a "
                                                     "one-layer gate. Default: see --extra-depths.")] = None,
    extra_depths: Annotated[str | None, typer.Option(help="The extra layers as comma-separated fractions of the "
                                                     "model's depth, used without --extra-layers (default 0.7: "
                                                     "layer 21 of 30).")] = None,
    extra_weight: Annotated[float | None, typer.Option(callback=_finite,
                                                       help="Scale of the extra layers' standardised features in the "
                                                            "fit: below 1 pulls their weights harder to zero (default 1).")] = None,
    family_fpr: Annotated[str | None, typer.Option(help="Raise the --target-fpr threshold until at most this share of "
                                                        "out-of-family wrapped safe prompts (leave-one-family-out) "
                                                        "fires, or none for no raise (default 0.05; none with "
                                                        "--threshold).")] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: bool = False,
) -> None:
    """Fit a gate (a probe on the base model's hidden state at the last prompt token) on a data folder."""
    import dataclasses

    from ..gate.config import GateFitConfig
    from ..gate.evaluate import report_table
    from ..gate.folder import fit_gate_folder
    from ..models import load_model
    from ..outputs import check_out_dir, claim_output

    if threshold is not None and target_fpr is not None:
        raise SafetyPatchError("--threshold and --target-fpr both set the threshold; give one")
    given = dict(layer=layer, depth=depth, threshold=threshold, target_fpr=target_fpr, wrapped_benign=wrapped_benign,
                 wrapped_harmful=wrapped_harmful, self_instruct=self_instruct, l2=l2, seed=seed, features=features,
                 rephrased=rephrased,
                 phrasings=None if phrasings is None else [f.strip() for f in phrasings.split(",") if f.strip()],
                 written_harmful=written_harmful, written_harmful_more=written_harmful_more,
                 written_lookalikes=written_lookalikes, extra_weight=extra_weight,
                 extra_layers=None if extra_layers is None else _int_list(extra_layers, "--extra-layers"),
                 extra_depths=None if extra_depths is None else _float_list(extra_depths, "--extra-depths"))
    cfg = dataclasses.replace(GateFitConfig(), **{k: v for k, v in given.items() if v is not None})
    if threshold is not None:  # a logit given: it replaces the default target rate and that rate's raise
        cfg = dataclasses.replace(cfg, target_fpr=None, family_fpr=None)
    if family_fpr is not None:
        cfg = dataclasses.replace(cfg, family_fpr=_rate_or_none(family_fpr, "--family-fpr"))
    if written_harmful is False and written_harmful_more is None:  # the second file adds to the first: off with it
        cfg = dataclasses.replace(cfg, written_harmful_more=False)
    cfg.validate()
    check_out_dir(out, overwrite=overwrite, kind="gate", inputs=[data, model])
    with claim_output(out):
        from ..data.folder import DataFolder

        DataFolder(data)  # a bad data folder fails before the model loads
        lm = load_model(model, device=device, dtype=dtype)
        meta = fit_gate_folder(lm, data, cfg, out, overwrite=overwrite)
    typer.echo(report_table(meta["validation"]))
    on = ", ".join(map(str, [meta["layer"], *meta.get("extra_layers", [])]))
    typer.echo(f"wrote {out}: gate {meta['id']} on layer{'s' * bool(meta.get('extra_layers'))} {on}, "
               f"threshold {meta['threshold']:+.3f}, "
               f"{sum(meta['prompts'].values())} train prompts, fit in {meta['fit_seconds']}s")


@gate_app.command("apply")
def gate_apply_cmd(
    patch: Annotated[Path, typer.Option("--patch", "-p", help="An ungated patch (LoRA adapter or full-parameter delta), "
                                                             "or with --replace a gated one.")],
    gate: Annotated[Path, typer.Option(help="A gate folder from `gate fit`, or a gated patch (its gate), made for the "
                                            "patch's base model.")],
    out: Annotated[Path, typer.Option(help="New gated patch folder to write.")],
    replace: Annotated[bool, typer.Option(help="Swap the gate of a gated patch for this one (the old gate's id is "
                                               "recorded in patch.json).")] = False,
    overwrite: bool = False,
) -> None:
    """Put a patch behind a gate: a new patch folder with the patch's weights, the gate and patch.json."""
    from ..gate.folder import apply_gate
    from ..outputs import check_out_dir, claim_output

    check_out_dir(out, overwrite=overwrite, kind="patch", inputs=[patch, gate])
    with claim_output(out):  # a second writer of the same --out fails at once, as for every output
        meta = apply_gate(patch, gate, out, overwrite=overwrite, replace=replace)
    on = [meta["gate"]["layer"], *meta["gate"].get("extra_layers", [])]
    typer.echo(f"wrote {out}: {meta['format']} patch {meta['id']} behind gate {meta['gate']['id']} "
               f"(layer{'s' * (len(on) > 1)} {', '.join(map(str, on))}, threshold {meta['gate']['threshold']:+.3f})")


@gate_app.command("eval")
def gate_eval_cmd(
    gate: Annotated[Path, typer.Option(help="A gate folder from `gate fit`, or a gated patch (`train`, `gate apply`): "
                                            "its gate.")],
    data: Annotated[Path, typer.Option(help="Data folder from `data build`.")],
    split: Annotated[str, typer.Option(help="val | test (look at test once, after choosing on val).")] = "val",
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the wrapped-benign draw.")] = 0,
    leave_one_source_out: Annotated[bool, typer.Option(help="Also refit without each harmful source and measure on it "
                                                             "(costs about one gate fit).")] = False,
    source_shots: Annotated[str, typer.Option(help="With --leave-one-source-out, a learning curve: comma-separated "
                                                   "counts k (e.g. 25,50,100) of the held-out source's own requests "
                                                   "in the gate's pool (its train split's) put back in each refit, "
                                                   "all measured on its direct requests no k put back (how many "
                                                   "examples of a new source the gate needs).")] = "",
    leave_one_family_out: Annotated[bool, typer.Option(help="Also refit without each group of train template families "
                                                            "and score their wrapped prompts (five refits).")] = False,
    attacks: Annotated[str, typer.Option(help="Rule attacks to run through the gate, on the split's harmful requests and "
                                              "on its benign prompts as controls: 'unseen' (those the train split never "
                                              "used), 'none', or a comma-separated list.")] = "unseen",
    harmful: Annotated[Path | None, typer.Option(help="Your own harmful prompts (JSONL/CSV with a prompt or goal column, "
                                                     "optional category): the share the gate catches, out of source.")] = None,
    benign: Annotated[Path | None, typer.Option(help="Your own safe prompts (same format): the share the gate sends to "
                                                    "the refusal adapter; with --harmful, AUROC and TPR at 1%/5% FPR "
                                                    "on them.")] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: OverwriteResultsOpt = False,
) -> None:
    """The gate's reliability on held-out prompts: AUROC, TPR at 1%/5% FPR, FPR at its threshold, with 95% intervals."""
    from ..gate.evaluate import evaluate_gate, report_table, user_prompt_sets
    from ..gate.folder import read_gate_source
    from ..gate.pool import RULE_ATTACKS
    from ..models import load_model
    from ..outputs import check_out_file

    if split not in ("val", "test"):
        raise SafetyPatchError(f"--split must be val or test, got {split!r}")
    attack_list = None if attacks.strip() == "unseen" else [] if attacks.strip() == "none" else \
        [a.strip() for a in attacks.split(",")]
    if attack_list is not None and attacks.strip() != "none" and (not attack_list or not all(attack_list)):
        raise SafetyPatchError(f"--attacks {attacks!r} has an empty entry; give rule attacks separated by single "
                               "commas, 'unseen' or 'none'")
    for a in attack_list or ():
        if a not in RULE_ATTACKS:
            raise SafetyPatchError(f"--attacks: {a!r} is not a rule attack; choose from {', '.join(RULE_ATTACKS)}, "
                                   "'unseen' or 'none'")
    shots = _number_list(source_shots, "--source-shots", int, "request counts like 25 or 25,50,100", "count") \
        if source_shots.strip() else []
    if any(k < 1 for k in shots):
        raise SafetyPatchError(f"--source-shots counts must be 1 or more, got {source_shots!r}")
    if twice := sorted({k for k in shots if shots.count(k) > 1}):
        raise SafetyPatchError(f"--source-shots {source_shots!r} names {', '.join(map(str, twice))} twice")
    if shots and not leave_one_source_out:
        raise SafetyPatchError("--source-shots puts a held-out source's requests back into a leave-one-source-out "
                               "refit: give --leave-one-source-out too")
    read_gate_source(gate)  # a bad gate folder, patch or prompt file fails before the model loads
    user_sets = user_prompt_sets(harmful, benign)
    if out is not None:
        check_out_file(out, inputs=[gate, data, *(p for p in (harmful, benign) if p is not None)], overwrite=overwrite,
                       kind="safety-patch/gate-eval")
    lm = load_model(model, device=device, dtype=dtype)
    rep = evaluate_gate(lm, gate, data, split, seed, loso=leave_one_source_out, attacks=attack_list,
                        lofo=leave_one_family_out, user_sets=user_sets, shots=shots)
    typer.echo(report_table(rep))
    if "note" in rep:
        typer.echo(f"note: {rep['note']}")
    if out is not None:
        from ..atomic import write_json

        write_json(out, rep)
        typer.echo(f"wrote {out}")


@gate_app.command("export")
def gate_export_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the Hugging Face sequence-classification checkpoint.")],
    gate: Annotated[Path | None, typer.Option(help="A gate folder from `gate fit`.")] = None,
    patch: Annotated[Path | None, typer.Option("--patch", "-p", help="A gated patch (exports its gate).")] = None,
    model: ModelOpt = "default",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is a gate this command exported.")] = False,
) -> None:
    """Export a gate as a transformers sequence-classification checkpoint (refused where it cannot be exact).

    Exact for one-layer final-norm gates (`gate fit --extra-layers none`): the base truncated
    after the gate's layer plus a one-logit head, the threshold in config.json; its logits equal
    the gate's. A multi-layer gate (the default of `gate fit` and `train` since 2026-12-02) or a
    residual one (`--features residual`) is refused with the reason, before the model loads;
    nothing is written."""
    from ..gate.folder import read_gate_folder
    from ..models import load_model
    from ..outputs import check_out_dir, claim_output
    from ..serve.export import check_exportable, export_gate

    if (gate is None) == (patch is None):
        raise SafetyPatchError("give exactly one of --gate and --patch")
    check_out_dir(out, overwrite=overwrite, kind="exported-gate", inputs=[model, gate, patch])
    if patch is not None:
        from ..gate.probe import Gate
        from ..patches import read_patch

        p = read_patch(patch)
        if not p.gated:
            raise SafetyPatchError(f"{p.path}: not a gated patch; there is no gate to export")
        g, fingerprint, where = Gate.load(p.path), p.base_fingerprint, p.path
        source = {"patch": str(p.path), "patch_id": p.id}
    else:
        if (Path(gate) / "patch.json").is_file() and not (Path(gate) / "gate.json").is_file():
            from ..patches import read_patch

            if read_patch(gate).gated:
                raise SafetyPatchError(f"{gate} is a patch, not a gate folder: export its gate with --patch {gate}")
            raise SafetyPatchError(f"{gate} is an ungated patch, not a gate folder: there is no gate to export")
        g, info = read_gate_folder(gate)
        fingerprint, where = info["base"]["fingerprint"], gate
        source = {"gate": str(gate), "gate_id": info["id"]}
    check_exportable(g, where)  # before a (slow) model load
    lm = load_model(model, device="cpu", dtype="float32")
    if lm.fingerprint != fingerprint:
        raise SafetyPatchError(f"{where}: the gate was fit on base {fingerprint[:12]}…, --model is {lm.fingerprint[:12]}…")
    with claim_output(out):
        export_gate(lm, g, out, where, source, overwrite)
    typer.echo(f"exported the gate of {where} (layer {g.layer}, threshold {g.threshold:+.3f}) to {out}")  # one layer

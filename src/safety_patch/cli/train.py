"""``train``: its flags are generated from ``train.config.FLAGS`` (one per config field, the field's
docstring as help), so the CLI and the typed config cannot drift apart (docs/training.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FieldError, SafetyPatchError
from .app import DeviceOpt, DtypeOpt, ModelOpt, app


def train(**kw) -> None:
    """Train a safety patch (LoRA adapter or full-parameter delta) on a data folder.

    Settings apply in order: the recipe (default: the gated default patch), --config FILE, then the flags and --set group.field=value (any field; docs/training.md).
    """
    from ..train.api import parse_set, resolve_config
    from ..train.config import FLAGS, check_layer, dotted_layer, field_label
    from ..train.run import train as run_train

    overrides = {key: kw[_flag_param(flag)] for key, flag in FLAGS.items() if kw[_flag_param(flag)] is not None}
    if overrides.get("gate.layer") == -1:  # the old "no gate" sentinel
        del overrides["gate.layer"]
        kw["no_gate"] = True
        typer.echo("[train] --gate-layer -1 is deprecated: use --no-gate", err=True)
    set_values = parse_set(kw["set_"])
    check_layer(dotted_layer(set_values, "--set"), "--set")  # an unknown or mistyped --set key, named as such
    both = sorted(k for k in set_values if k in overrides)
    if both:  # one would silently win whatever the order on the command line
        k = both[0]
        raise SafetyPatchError(f"--set {k}={set_values[k]} and --{FLAGS[k]} {overrides[k]} set the same field; give one")
    overrides |= set_values
    if kw["no_gate"]:
        overrides["gate"] = None  # after the gate flags: dotted_layer refuses the two together
    data, out, model, config = kw["data"], kw["out"], kw["model"], kw["config"]
    try:
        cfg = resolve_config(kw["recipe"], config, overrides)
    except FieldError as e:  # a value `--set` gave: name it as written, not as the flag the user did not use
        key = next((k for k in e.keys if k in set_values), None)
        if key is None:
            raise
        msg, subject = str(e), field_label(key)
        raise SafetyPatchError(f"--set {key}" + msg[len(subject):] if msg.startswith(subject + " ") else msg) from None
    from ..outputs import check_out_dir

    check_out_dir(out, overwrite=kw["overwrite"], kind="patch", inputs=[data, model, config])  # claimed inside run_train
    typer.echo("[train] config: " + json.dumps(cfg.record()), err=True)  # as patch.json records it
    meta = run_train(data, out, cfg, model=model, device=kw["device"], dtype=kw["dtype"], resume=kw["resume"],
                     overwrite=kw["overwrite"])
    if meta:
        t = meta["training"]
        loss = " -> ".join("n/a" if v is None else f"{v:.4g}" for v in (t["loss_first"], t["loss_last"]))
        g = meta.get("gate")
        layers = [g["layer"], *g.get("extra_layers", [])] if g else []
        gated = f"gated (gate layer{'s' * (len(layers) > 1)} {','.join(map(str, layers))}) " if g else ""
        typer.echo(f"wrote {out}: {gated}{meta['format']} patch, {t['steps']} steps, loss {loss} (first and last step), "
                   f"{t['tokens_seen']} tokens in {t['wall_seconds']}s ({t['tokens_per_s']} tokens/s), "
                   f"{t['trainable_parameters']:,} trainable parameters")


def _flag_param(flag: str) -> str:
    return flag.replace("-", "_")


def _train_signature():
    """The ``train`` command's parameters: its own options, then one flag per field in
    ``train.config.FLAGS`` with the field's docstring as help (typer reads ``__signature__``)."""
    import inspect

    from ..train.config import FLAGS, GROUPS, TrainConfig, field_types, help_text, recipe_names

    def opt(name: str, annotation, default=None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    panels = {"method": "Method and loss", "loss": "Method and loss", "lora": "LoRA", "data": "Training data mix",
              "anchor": "KL anchor", "optim": "Optimiser and schedule", "gate": "Gate (the default patch is gated)"}
    defaults = TrainConfig()
    params = [
        opt("data", Annotated[Path, typer.Option(help="Data folder from `data build`.")], inspect.Parameter.empty),
        opt("out", Annotated[Path, typer.Option(help="Patch folder to write (atomically).")], inspect.Parameter.empty),
        opt("model", ModelOpt, "default"),
        opt("recipe", Annotated[str | None, typer.Option(
            help=f"Named recipe, a file in train/recipes/: {', '.join(recipe_names())} (default: default).",
            rich_help_panel="Config")]),
        opt("config", Annotated[Path | None, typer.Option(
            help="YAML file in grouped form (lora: {rank: 16}), applied over the recipe.", rich_help_panel="Config")]),
        opt("set_", Annotated[list[str] | None, typer.Option(
            "--set", metavar="GROUP.FIELD=VALUE", rich_help_panel="Config",
            help=f"Set any field, e.g. --set optim.grad_accum=2 (repeatable; groups: {', '.join(GROUPS)}).")]),
    ]
    for key, flag in FLAGS.items():
        if key == "gate.layer":
            params.append(opt("no_gate", Annotated[bool, typer.Option(
                "--no-gate", help="Train an always-on patch: no gate (the paper, always-on and full-* recipes have none).",
                rich_help_panel=panels["gate"])], False))
        typ = [a for a in (field_types()[key].__args__ if hasattr(field_types()[key], "__args__")
                           else (field_types()[key],)) if a is not type(None)][0]
        group = key.split(".")[0]
        default = _default_of(defaults, key)
        text = help_text(key) + (f" (default {default})" if default is not None else "")
        if key == "gate.layer":
            text += " (-1, deprecated: --no-gate)"
        params.append(opt(_flag_param(flag), Annotated[typ | None, typer.Option(
            f"--{flag}", help=text, rich_help_panel=panels[group])]))  # ranges: TrainConfig.validate names the flag
    params += [
        opt("resume", Annotated[bool, typer.Option(
            help="Continue an interrupted run from its newest complete checkpoint (same settings, model and data, "
                 "or refused).")], False),
        opt("overwrite", bool, False),
        opt("device", DeviceOpt, "auto"),
        opt("dtype", DtypeOpt, "auto"),
    ]
    return inspect.Signature(params)


def _default_of(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


train.__signature__ = _train_signature()  # type: ignore[attr-defined]
app.command()(train)

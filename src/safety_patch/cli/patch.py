"""``patch info``, ``patch gate``, ``patch verify`` and ``patch merge`` (docs/patches.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import DeviceOpt, DtypeOpt, ModelOpt, patch_app


@patch_app.command("info")
def patch_info_cmd(patch: Annotated[Path, typer.Argument(help="Patch folder.")]) -> None:
    """What a patch is and what made it."""
    from ..patches import info, read_patch

    p = read_patch(patch)
    for k, v in info(p).items():
        if k == "files":  # one line each: a file and its sha256
            for name, sha in (v or {}).items():
                typer.echo(f"{'file':<22}{name}  sha256 {sha}")
            continue
        typer.echo(f"{k:<22}{json.dumps(v) if isinstance(v, (dict, list)) else v}")
    typer.echo(f"{'':<22}(the whole record{', the gate validation report included' if p.gated else ''}: "
               f"{p.path / 'patch.json'})")


@patch_app.command("gate")
def patch_gate_cmd(
    patch: Annotated[Path, typer.Argument(help="A gated patch folder.")],
    prompt: Annotated[list[str], typer.Option(help="A user prompt to route (repeatable).")],
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option(help="Use a patch made for another base model (warns).")] = False,
    system: Annotated[str | None, typer.Option(help="The system prompt your deployment sends (the gate reads the "
                                                    "whole rendered prompt, so it can move the logit).")] = None,
    stack: Annotated[list[Path] | None, typer.Option(
        help="A patch attached before it (one it was trained on top of, or an always-on patch you serve it with); "
             "repeat, in stack order. Its gate then reads the model with them applied, as chat and serve do.")] = None,
) -> None:
    """Route prompts as a gated patch would: the probe's logit and whether the adapter applies.

    The same routing ``chat``, ``eval`` and ``serve`` use (the patch attached, its gate read by
    ``PatchedModel.routes``). Serving stacks that cannot run the gate themselves (vLLM) send a
    request with the patch's LoRA only when this says "adapter" (or use ``serve --upstream``)."""
    from ..generation import conversation, gate_views
    from ..models import load_model
    from ..patches import attached, item_names, read_patch

    if any(not t.strip() for t in prompt):  # the template alone would be routed, as if it were a prompt
        raise SafetyPatchError("--prompt is empty; give the text to route")
    if system is not None and not system.strip():
        raise SafetyPatchError("--system is empty; give the system prompt, or leave the option out")
    p = read_patch(patch)
    if not p.gated:
        raise SafetyPatchError(f"{patch} has no gate (patch.json has no 'gate'); it applies to every prompt")
    lm = load_model(model, device=device, dtype=dtype)
    from ..gate.features import check_context

    views = [[lm.tokenizer(v, add_special_tokens=False)["input_ids"] for v in gate_views(lm.tokenizer, conversation(t, system))]
             for t in prompt]  # with --system: the highest logit with and without it, as chat, eval and serve route
    check_context(lm.model, [v[0] for v in views], "--prompt")
    below = [read_patch(q) for q in stack or []]
    with attached(lm.model, [*below, p], lm.fingerprint, force) as pm:
        name = item_names([*below, p])[-1]  # this patch's gate, whatever gates the stack below holds
        scores, gate = pm.gate_scores_max(lm.tokenizer, views)[name], pm.gates[name]
    # route: which weights answer ("adapter": the patch applies; "base": the base model, bit for
    # bit); margin: logit - threshold, how far from flipping
    typer.echo(f"{'route':<7}  {'logit':>7}  {'margin':>7}  prompt")
    for text, z in zip(prompt, scores.tolist(), strict=True):
        typer.echo(f"{'adapter' if z > gate.threshold else 'base':<7}  {z:+7.2f}  {z - gate.threshold:+7.2f}  {text}")
    typer.echo(f"(gate: layer{'s' * bool(gate.extra_layers)} {', '.join(map(str, gate.layers))}, "
               f"threshold {gate.threshold:+.2f})")


@patch_app.command("verify")
def patch_verify_cmd(
    patch: Annotated[Path, typer.Argument(help="Patch folder.")],
    model: ModelOpt = "default",
    stack: Annotated[list[Path] | None, typer.Option(
        help="A patch it was trained on top of (a red-team round's earlier patches); repeat, in stack order. "
             "Each is verified too, and the patch is checked on top of them.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Check patch.json, file hashes, finite weights, base fingerprint, tensor shapes and that the patch changes the model."""
    from ..models import load_model
    from ..patches import probe_effect, probe_routing, read_patch, tied_targets, verify
    from ..patches.attach import refuse_merged

    p = read_patch(patch)  # schema, hashes, computed id, finite non-zero weights, gate, no pickles
    below = [read_patch(s) for s in stack or []]
    have = {b.id for b in below}
    missing = [s for s in p.stack if s not in have]
    if missing:  # before the model loads: the check needs the stack, and says how to give it
        raise SafetyPatchError(f"{patch} was trained on top of patch(es) {', '.join(missing)}; verify it on top of them: "
                               "pass --stack FOLDER for each, in order (for a red-team round: its --patch folders)")
    lm = load_model(model, device=device, dtype=dtype)
    # a patch this checkpoint's merged_from.json lists: said as such, not as "another base" (a user's trial)
    refuse_merged(lm.model, [*below, p])
    for q in [*below, p]:
        verify(q, lm.model, lm.fingerprint, remedy="it does not verify against this model (`patch verify` has no "
                                                   "--force; `chat`, `eval` and `serve` take --force to attach it anyway)")
    # every tensor loaded, and it changes logits (on top of its stack: what it adds)
    effect = probe_effect(lm.model, lm.tokenizer, [p], lm.fingerprint, below=below)
    on = f" on top of {len(below)} patch{'es' * (len(below) > 1)}" if below else ""
    typer.echo(f"OK: {patch} (id {p.id}) matches {model} (fingerprint {lm.fingerprint[:12]}…){on}; files intact; "
               f"all {'adapter tensors' if p.format == 'lora' else 'delta tensors'} loaded; changes logits by up "
               f"to {effect:.3g} on a probe batch")
    if p.gated:  # the adapter's effect above is with its gate open; where does the gate open it?
        r = probe_routing(lm.model, lm.tokenizer, p, lm.fingerprint)
        typer.echo(f"gate: opens the patch on {r['harmful'][0]}/{r['harmful'][1]} hand-written harmful probe requests "
                   f"and {r['general'][0]}/{r['general'][1]} ordinary instructions (a smoke test; `gate eval` "
                   "measures on held-out sets)")
    for _, name, shared in tied_targets(lm.model, [p]):  # attaches exactly, but `patch merge` will refuse it
        typer.echo(f"note: it adapts {name}, whose weight is shared with {shared} (tied embeddings): attach it; "
                   "`patch merge` and engines that merge adapters cannot apply it exactly")


@patch_app.command("merge")
def patch_merge_cmd(
    patch: Annotated[list[Path], typer.Option("--patch", "-p", help="Patch folder; repeat to fold in several.")],
    out: Annotated[Path, typer.Option(help="New folder for the merged Hugging Face checkpoint.")],
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: bool = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is a merged checkpoint safety-patch wrote.")] = False,
) -> None:
    """Fold patches into the base weights and save a standard checkpoint (usable as --model)."""
    from ..models import load_model
    from ..outputs import check_out_dir, claim_output
    from ..patches import merge_to_checkpoint

    check_out_dir(out, overwrite=overwrite, kind="merged", inputs=[model, *patch])
    with claim_output(out):  # a second merge into the same --out fails at once
        lm = load_model(model, device=device, dtype=dtype)
        merge_to_checkpoint(lm, patch, out, force, overwrite)
    typer.echo(f"wrote {out}")

"""``eval safety``, ``eval overrefusal``, ``eval capability`` and ``analyze`` (docs/evaluation.md,
docs/analysis.md)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import (
    DeviceOpt,
    DtypeOpt,
    JudgeOpt,
    LimitOpt,
    ModelOpt,
    NoCacheOpt,
    OutOpt,
    OverwriteResultsOpt,
    PatchOpt,
    PromptsOpt,
    app,
    eval_app,
)


def _eval(kind: str, model, patch, prompts, attacks, judge, limit, max_new_tokens, batch_size, out, device, dtype, force,
          no_cache, overwrite: bool = False, gcg_steps: int = 50, gcg_width: int = 128) -> None:
    from ..atomic import write_json
    from ..attacks import parse_attack_list
    from ..evaluation.safety import DEFAULT_ATTACKS, EvalConfig, evaluate, table

    cfg = EvalConfig(attacks=parse_attack_list(attacks) if attacks is not None else DEFAULT_ATTACKS,
                     judge=judge, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     gcg_steps=gcg_steps, gcg_search_width=gcg_width)
    from ..outputs import check_out_file, claim_output

    if out:  # before the evaluation, not after hours of it
        check_out_file(out, inputs=[prompts, model, *(patch or [])], overwrite=overwrite, kind=f"safety-patch/eval-{kind}")
    with claim_output(out) if out else contextlib.nullcontext():
        res = evaluate(kind, model, list(patch or []), str(prompts), cfg, device=device, dtype=dtype, force=force,
                       use_cache=not no_cache)
        if out:
            write_json(out, res)
    typer.echo(table(res))
    if out:
        typer.echo(f"wrote {out}")


@eval_app.command("safety")
def eval_safety_cmd(
    prompts: PromptsOpt,
    model: ModelOpt = "default",
    patch: PatchOpt = None,
    attacks: Annotated[str | None, typer.Option(help="Comma-separated attacks; compose with '+', e.g. past_tense+template.")] = None,
    judge: JudgeOpt = "refusal",
    limit: LimitOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 32,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: bool = False,
    no_cache: NoCacheOpt = False,
    overwrite: OverwriteResultsOpt = False,
    gcg_steps: Annotated[int, typer.Option(min=1, help="Optimisation steps per request of the gcg/gcg_gate attacks.")] = 50,
    gcg_width: Annotated[int, typer.Option(min=1, help="Candidate suffixes scored per gcg/gcg_gate step.")] = 128,
) -> None:
    """Attack success rate under jailbreak attacks, base vs patched, with Wilson intervals."""
    _eval("safety", model, patch, prompts, attacks, judge, limit, max_new_tokens, batch_size, out, device, dtype, force, no_cache,
          overwrite, gcg_steps, gcg_width)


@eval_app.command("overrefusal")
def eval_overrefusal_cmd(
    prompts: PromptsOpt,
    model: ModelOpt = "default",
    patch: PatchOpt = None,
    judge: JudgeOpt = "refusal",
    limit: LimitOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 32,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: bool = False,
    no_cache: NoCacheOpt = False,
    overwrite: OverwriteResultsOpt = False,
) -> None:
    """Refusal rate on borderline-benign and general prompts, base vs patched."""
    _eval("overrefusal", model, patch, prompts, "direct", judge, limit, max_new_tokens, batch_size, out, device, dtype, force,
          no_cache, overwrite)


@eval_app.command("capability")
def eval_capability_cmd(
    model: ModelOpt = "default",
    patch: PatchOpt = None,
    data: Annotated[Path | None, typer.Option(help="Data folder (held-out general answers and prompts).")] = None,
    suite: Annotated[str, typer.Option(help="offline | lm-eval")] = "offline",
    tasks: Annotated[str | None, typer.Option(help="offline: nll,kl,compliance,humaneval (runs the model's code only inside the sandbox of docs/evaluation.md; refused where it cannot be built); lm-eval: its task names")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N reference pairs (nll, kl) and N general prompts "
                                                        "(compliance); HumanEval has its own --humaneval-limit; "
                                                        "lm-eval: N examples per task.")] = None,
    humaneval_limit: Annotated[int | None, typer.Option(min=1, help="HumanEval tasks to run (164 in all; --limit does not "
                                                                  "apply to them).")] = 40,
    references: Annotated[Path | None, typer.Option(help="JSONL of prompt/reference pairs for nll/kl.")] = None,
    mc: Annotated[Path | None, typer.Option(help="Multiple-choice JSONL (question, choices, answer).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: bool = False,
    no_cache: NoCacheOpt = False,
    overwrite: OverwriteResultsOpt = False,
) -> None:
    """General capability: NLL and KL on benign answers, compliance, HumanEval, multiple choice; or lm-eval tasks."""
    from ..atomic import write_json
    from ..outputs import check_out_file

    if out:  # before the evaluation, not after it
        check_out_file(out, inputs=[model, data, references, mc, *(patch or [])], overwrite=overwrite,
                       kind="safety-patch/eval-lm-eval" if suite == "lm-eval" else "safety-patch/eval-capability")

    if suite == "lm-eval":
        from ..evaluation.lm_eval_adapter import evaluate_lm_eval, table
        lm_tasks = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        if not lm_tasks:
            raise SafetyPatchError("--suite lm-eval needs --tasks, e.g. --tasks arc_easy,hellaswag")
        res = evaluate_lm_eval(model, list(patch or []), lm_tasks, limit, batch_size,
                               device, dtype, force)
    elif suite == "offline":
        from ..evaluation.capability import OFFLINE_TASKS, CapabilityConfig, evaluate_capability, table

        # None is the default suite; "" or " , " names no task (it ran the whole suite for 6 min)
        task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks is not None else OFFLINE_TASKS
        if not task_list:
            raise SafetyPatchError(f"--tasks {tasks!r} names no task; offline tasks: {', '.join(OFFLINE_TASKS)} "
                                   "(leave --tasks out for all of them)")
        twice = sorted({t for t in task_list if task_list.count(t) > 1})
        if twice:
            raise SafetyPatchError(f"--tasks names {', '.join(twice)} twice; give each task once")
        if tasks and "kl" in task_list and not patch:  # asked for: refused; in the default list: said skipped (table)
            raise SafetyPatchError("--tasks kl compares the base with a patched model: give --patch (or drop kl)")
        cfg = CapabilityConfig(tasks=task_list,
                               limit=limit, humaneval_limit=humaneval_limit, batch_size=batch_size,
                               references=str(references) if references else None, mc_file=str(mc) if mc else None)
        res = evaluate_capability(model, list(patch or []), str(data) if data else None, cfg, device, dtype, force,
                                  use_cache=not no_cache)
    else:
        raise SafetyPatchError(f"--suite must be offline or lm-eval, got {suite!r}")
    if out:
        write_json(out, res)
    typer.echo(table(res))


@app.command()
def analyze(
    patch: Annotated[list[Path], typer.Option("--patch", "-p", help="Patch folder; repeat to compare patches.")],
    out: Annotated[Path, typer.Option(help="Output folder (CSV/JSON/PNG), written atomically.")],
    model: ModelOpt = "default",
    k: Annotated[str, typer.Option(help="Sizes of W0's top singular subspace to compare against.")] = "8,32,128",
    r: Annotated[int | None, typer.Option(min=1, help="Update directions to use (default: LoRA rank; 8 for deltas).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data folder for default benign/jailbreak prompts.")] = None,
    benign: Annotated[Path | None, typer.Option(help="JSONL/CSV of benign prompts (activation analysis).")] = None,
    jailbreak: Annotated[Path | None, typer.Option(help="JSONL/CSV of jailbreak prompts (activation analysis).")] = None,
    n_prompts: Annotated[int, typer.Option(min=1)] = 16,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option(help="Measure a patch of another base, or one trained on top of other "
                                             "patches, against --model's weights (recorded as 'forced').")] = False,
    overwrite: bool = False,
) -> None:
    """Per-layer subspace orthogonality, update magnitude, hidden-state shift and interference of patches."""
    from ..analysis.run import analyze as run_analyze
    from ..analysis.run import default_prompts, summary_text
    from ..evaluation.prompts import benign_prompts

    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise SafetyPatchError(f"--k must be comma-separated integers, got {k!r}") from None
    if not ks or min(ks) < 1:
        raise SafetyPatchError(f"--k must be positive integers, got {k!r}")
    if len(set(ks)) != len(ks):
        raise SafetyPatchError(f"--k names a size twice: {k!r}")
    from ..outputs import check_out_dir, claim_output

    check_out_dir(out, overwrite=overwrite, kind="analysis", inputs=[model, data, benign, jailbreak, *patch])
    b, j = default_prompts(data, n_prompts) if data else ([], [])
    if benign:
        b = [p["messages"] for p in benign_prompts(benign)][:n_prompts]
    if jailbreak:
        j = [p["messages"] for p in benign_prompts(jailbreak)][:n_prompts]
    from ..evaluation.prompts import source_identity

    sources = {"data": source_identity(data), "benign": source_identity(benign), "jailbreak": source_identity(jailbreak)}
    with claim_output(out):
        res = run_analyze(model, list(patch), out, ks, r, b, j, device=device, force=force, overwrite=overwrite,
                          prompt_sources={k: v for k, v in sources.items() if v is not None})
    typer.echo(summary_text(res["summary"], sorted(set(ks)), res["activations"], skipped=not (b or j),
                            gated=res["gated"], forced=res["forced"]))
    typer.echo(f"wrote {out}")

"""``reproduce``, ``report`` and ``redteam``: the commands that run several stages into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import DeviceOpt, DtypeOpt, LimitOpt, ModelOpt, PatchOpt, _finite, app


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Run folder (stages are cached inside; re-runs resume).")],
    model: ModelOpt = "default",
    quick: Annotated[bool, typer.Option(help="Small sizes: minutes on a laptop CPU.")] = False,
    full: Annotated[bool, typer.Option(help="Add DPO arms, a rank ablation and cross-domain arms.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Train every arm with this many seeds.")] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """The paper's experiments end to end: data, arms, evaluation, analysis, report with a verdict per claim."""
    from ..outputs import check_out_dir, claim_output
    from ..pipeline import make_plan
    from ..pipeline import reproduce as run_reproduce
    from ..report import write_report

    # re-runs resume in the run folder; any other non-empty folder is refused
    check_out_dir(out, reuse=True, kind="run", inputs=[model])
    with claim_output(out):
        info = run_reproduce(out, make_plan(model, quick, full, seeds), device=device, dtype=dtype)
    typer.echo(f"done in {info['total_seconds'] / 60:.1f} min; report: {out / 'report.md'} and {out / 'report.html'}")
    for c in write_report(out)["claims"]:
        typer.echo(f"  [{c['verdict'].upper()}] {c['claim']}: {c['evidence']}")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder from `reproduce`.")]) -> None:
    """(Re)write report.md and report.html from a run folder's stage outputs."""
    from ..report import write_report

    if not run.exists():
        from ..atomic import interrupted_note

        raise SafetyPatchError(f"{run} does not exist{interrupted_note(run)}")
    if not (run / "run.json").is_file():
        if (run / "settings.json").is_file():  # a run that stopped at a stage: its report comes at the end
            raise SafetyPatchError(f"the run in {run} has not finished (no run.json: a stage failed or was interrupted); "
                                   f"re-run `safety-patch reproduce --out {run}` with its options to resume it, which "
                                   "writes the report")
        raise SafetyPatchError(f"{run} is not a reproduce run folder (no run.json)")
    for c in write_report(run)["claims"]:
        typer.echo(f"[{c['verdict'].upper()}] {c['claim']}: {c['evidence']}")
    typer.echo(f"wrote {run / 'report.md'} and {run / 'report.html'}")


@app.command()
def redteam(
    attack: Annotated[str, typer.Option(help="Attack family for this round (compose with '+').")],
    data: Annotated[Path, typer.Option(help="Data folder from `data build`.")],
    out: Annotated[Path, typer.Option(help="Round folder to write.")],
    model: ModelOpt = "default",
    patch: PatchOpt = None,
    previous: Annotated[list[Path] | None, typer.Option(help="Earlier round folders (replay and regression).")] = None,
    method: Annotated[str, typer.Option(help="lora | full")] = "lora",
    replay: Annotated[float, typer.Option(min=0.0, max=1.0, callback=_finite,
                                          help="Share of each earlier round's rows to replay.")] = 0.5,
    limit: LimitOpt = 100,
    lr: Annotated[float | None, typer.Option()] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """One lifelong red-teaming round: attack, collect jailbreaks, train the next patch, regression-check."""
    from ..outputs import check_out_dir, claim_output
    from ..redteam import ROUND_MARKER, round_table, run_round

    # before the claim creates anything (run_round repeats this for API callers)
    check_out_dir(out, inputs=[data, model, *(patch or []), *(previous or [])], overwrite=None,
                  reuse=(out / ROUND_MARKER).is_file(), kind="round")
    with claim_output(out):
        t = run_round(model, list(patch or []), attack, data, out, method, list(previous or []), replay, limit,
                      train_overrides={k: v for k, v in {"optim.lr": lr, "optim.epochs": epochs}.items() if v is not None},
                      device=device, dtype=dtype)
    typer.echo(round_table(t))

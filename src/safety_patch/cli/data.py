"""``data build``, ``data show`` and ``data sources``: the data stage (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import DeviceOpt, DtypeOpt, ModelOpt, data_app


@data_app.command("build")
def data_build_cmd(
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).")],
    seed: Annotated[int | None, typer.Option(help="Seed for splits, wrapping and phrasing.")] = None,
    sources: Annotated[str | None, typer.Option(help="Comma-separated sources, e.g. harmbench,donotanswer,file:my.csv")] = None,
    max_per_source: Annotated[int | None, typer.Option(min=1)] = None,
    wrap_fraction: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    distill: Annotated[bool | None, typer.Option("--distill/--no-distill", help="Self-distil general/borderline answers.")] = None,
    dpo: Annotated[bool | None, typer.Option("--dpo/--no-dpo", help="Also write DPO pairs.")] = None,
    self_instruct: Annotated[int | None, typer.Option(min=0, help="Benign requests the base model writes itself: the "
                                                      "default recipe's gate negatives (default 600, ~10 min on a CPU; 0 = none).")] = None,
    borderline_extra: Annotated[bool | None, typer.Option(
        "--borderline-extra/--no-borderline-extra",
        help="Add 224 train-only safe look-alikes (default on; docs/data.md).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with DataConfig fields.")] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: bool = False,
) -> None:
    """Harmful requests x jailbreak wrappers -> refusals; general, borderline and test data; leak-free splits."""
    from .. import config as cfgmod
    from ..data.build import DataConfig, build, show

    if sources and sources.strip() and "" in [x.strip() for x in sources.split(",")]:  # named as the flag, not the field
        raise SafetyPatchError(f"--sources {sources!r} has an empty item (two commas, or one at an end); give "
                               "comma-separated sources, e.g. harmbench,donotanswer,file:my.csv")
    cfg = cfgmod.load(DataConfig, config, dict(seed=seed, sources=sources, max_per_source=max_per_source,
                                               wrap_fraction=wrap_fraction, distill=distill, dpo=dpo,
                                               self_instruct=self_instruct, borderline_train_extra=borderline_extra))
    from ..outputs import check_out_dir, claim_output

    files = [x.strip()[5:] for x in (sources or "").split(",") if x.strip().startswith("file:")]
    check_out_dir(out, overwrite=overwrite, kind="data", inputs=[model, config, *files])
    with claim_output(out):  # a second `data build` into the same --out fails at once
        build(out, cfg, model=model, device=device, dtype=dtype, overwrite=overwrite)
    typer.echo(show(out))


@data_app.command("show")
def data_show_cmd(data_dir: Annotated[Path, typer.Argument(help="A folder written by `data build`.")]) -> None:
    """Print the counts table of a data folder."""
    from ..data.build import show

    typer.echo(show(data_dir))


@data_app.command("sources")
def data_sources_cmd() -> None:
    """List the harmful-request sources."""
    from ..data.sources import DEFAULT_SOURCES, REGISTRY

    for name in sorted(REGISTRY):
        typer.echo(f"{name:<18}{'default' if name in DEFAULT_SOURCES else ''}")
    typer.echo("file:PATH         a JSONL or CSV with a 'prompt' (or 'goal') column")

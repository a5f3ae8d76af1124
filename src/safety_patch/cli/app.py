"""The typer app, its command groups, and what the commands share: the model/device/dtype/patch
options, the global flags (``--debug``, ``--verbose``, ``--threads``), loading a model with its
patches, and the parsers of list- and rate-valued flags (each error names its flag)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError

# Plain click help (rich_markup_mode=None): rich's option table cuts long flag names at 80
# columns ("--written-harm…" for two different flags); click wraps the text instead.
PLAIN_HELP = {"rich_markup_mode": None}
app = typer.Typer(
    help="Build, apply, measure and explain LoRA safety patches for chat LLMs.",
    no_args_is_help=True,
    **PLAIN_HELP,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(**PLAIN_HELP, help="Inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
patch_app = typer.Typer(**PLAIN_HELP, help="Inspect, verify and merge patches.", no_args_is_help=True)
app.add_typer(patch_app, name="patch")
eval_app = typer.Typer(**PLAIN_HELP, help="Evaluate safety, over-refusal and capability.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
data_app = typer.Typer(**PLAIN_HELP, help="Build and inspect training / evaluation data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
gate_app = typer.Typer(**PLAIN_HELP, help="The gate as its own stage: fit, evaluate, put behind a patch, export (docs/gate.md).",
                       no_args_is_help=True)
app.add_typer(gate_app, name="gate")

_STATE = {"debug": False}

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="`default` (embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file or a hub id.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")]
PatchOpt = Annotated[
    list[Path] | None, typer.Option("--patch", "-p", help="Patch folder; repeat to stack patches in the given order.")
]


def _finite(value: float | None) -> float | None:
    """typer callback: refuse nan and inf, which pass click's min/max range checks (nan compares false)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _open_unit(value: float | None) -> float | None:
    """typer callback: a rate strictly between 0 and 1 (click's ranges are closed, and nan passes them)."""
    import math

    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        raise typer.BadParameter(f"must be a number in (0, 1), got {value}")
    return value


def _quiet_libraries(verbose: bool) -> None:
    import transformers

    if not verbose:
        import warnings

        # transformers 5 deprecation notices raised inside TRL/PEFT calls we do not control
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            import datasets

            datasets.utils.logging.set_verbosity_error()
            datasets.disable_progress_bars()
        except ImportError:
            pass


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Library logs and progress bars.")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: $SAFETY_PATCH_THREADS or all cores).")] = None,
) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    from .. import runtime

    runtime.configure_threads(threads)
    _quiet_libraries(verbose)


def _load(model: str, device: str, dtype: str, patches: list[Path] | None = None, force: bool = False):
    """(LoadedModel, PatchedModel): the base, and the base with ``patches`` attached for the process."""
    from ..models import load_model
    from ..patched import PatchedModel

    read = []
    if patches:  # a malformed patch folder is refused before the (possibly minutes-long) model load
        from ..patches import read_patch

        read = [read_patch(p) for p in patches]
    lm = load_model(model, device=device, dtype=dtype)
    typer.echo(f"[model] {lm.name}: {lm.runtime.describe()}, loaded in {lm.load_seconds:.1f}s", err=True)
    if read:
        from ..patches import attach_for_inference

        return lm, attach_for_inference(lm, read, force=force)
    return lm, PatchedModel.base(lm)


LimitOpt = Annotated[int | None, typer.Option(min=1, help="At most N behaviours (safety), or N prompts per set (over-refusal: borderline and general each).")]
JudgeOpt = Annotated[str, typer.Option(help="refusal (default: refusal classifier) | substance (refusal + chatter read as degenerate) | keyword (marker baseline) | classifier:[harmbench|llamaguard:]MODEL | api:URL")]
OutOpt = Annotated[Path | None, typer.Option(help="results.json to write (atomically).")]
PromptsOpt = Annotated[Path, typer.Option(help="A data folder (held-out test split) or a JSONL/CSV with a prompt/goal column.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the generation cache.")]
OverwriteResultsOpt = Annotated[bool, typer.Option(help="Replace --out if it is a results file of this command.")]


def _int_list(text: str, flag: str) -> list[int]:
    """``"21"`` or ``"12,21"`` -> [21] / [12, 21], ``"none"`` -> []; SafetyPatchError naming ``flag`` otherwise."""
    return _number_list(text, flag, int, "layer numbers like 21 or 12,21", "layer")


def _float_list(text: str, flag: str) -> list[float]:
    """``"0.7"`` or ``"0.5,0.7"`` -> [0.7] / [0.5, 0.7], ``"none"`` -> []; SafetyPatchError naming ``flag`` otherwise."""
    return _number_list(text, flag, float, "fractions like 0.7 or 0.5,0.7", "depth")


def _number_list(text: str, flag: str, cast, example: str, noun: str) -> list:
    if text.strip().lower() == "none":
        return []
    try:
        out = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SafetyPatchError(f"{flag} must be comma-separated {example}, got {text!r}") from None
    if not out:
        raise SafetyPatchError(f"{flag} {text!r} names no {noun}")
    if len(out) < len(text.split(",")):  # "12,,21" or a trailing comma: a typo, not a shorter list
        raise SafetyPatchError(f"{flag} {text!r} has an empty entry; separate {example} by single commas")
    return out


def _rate_or_none(text: str, flag: str) -> float | None:
    """``"0.05"`` -> 0.05, ``"none"`` -> None; SafetyPatchError naming ``flag`` otherwise (the range is
    GateFitConfig.validate's)."""
    import math

    if text.strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise SafetyPatchError(f"{flag} must be a rate like 0.05 or none, got {text!r}") from None
    if not math.isfinite(v):
        raise SafetyPatchError(f"{flag} must be a finite rate like 0.05 or none, got {text!r}")
    return v

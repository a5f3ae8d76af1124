"""The ``safety-patch`` command: a thin table of subcommands over plain functions.

Each command parses flags, calls one importable function, prints its result. Errors the
user can fix are ``SafetyPatchError``: one line on stderr, exit code 2, the traceback only
with ``--debug``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from .errors import FieldError, SafetyPatchError

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
    from . import runtime

    runtime.configure_threads(threads)
    _quiet_libraries(verbose)


def _load(model: str, device: str, dtype: str, patches: list[Path] | None = None, force: bool = False):
    """(LoadedModel, PatchedModel): the base, and the base with ``patches`` attached for the process."""
    from .models import load_model
    from .patched import PatchedModel

    read = []
    if patches:  # a malformed patch folder is refused before the (possibly minutes-long) model load
        from .patches import read_patch

        read = [read_patch(p) for p in patches]
    lm = load_model(model, device=device, dtype=dtype)
    typer.echo(f"[model] {lm.name}: {lm.runtime.describe()}, loaded in {lm.load_seconds:.1f}s", err=True)
    if read:
        from .patches import attach_for_inference

        return lm, attach_for_inference(lm, read, force=force)
    return lm, PatchedModel.base(lm)


@model_app.command("info")
def model_info_cmd(
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Architecture, parameter count, layers, linear modules, chat template, fingerprint."""
    from .models import model_info

    info = model_info(_load(model, device, dtype)[0])
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for k, v in info.items():
        if isinstance(v, int) and not isinstance(v, bool) and v > 9999:
            v = f"{v:,}"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
def chat(
    model: ModelOpt = "default",
    patch: PatchOpt = None,
    prompt: Annotated[str | None, typer.Option(help="Answer this one prompt and exit; without it, chat interactively.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the model template's own).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, callback=_finite, help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(min=-(2**63), max=2**64 - 1,
                                             help="Sampling seed (with --temperature > 0; default 0).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option(help="Attach patches made for another base model (warns).")] = False,
) -> None:
    """Talk to a model, optionally with safety patches attached."""
    from .errors import check_text
    from .generation import GenerationConfig

    # what can be checked without the model fails before it loads
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=1,
                           seed=0 if seed is None else seed)
    if seed is not None and temperature == 0:  # greedy decoding draws nothing: say so rather than take the seed silently
        typer.echo("warning: --seed has no effect with greedy decoding (--temperature 0)", err=True)
    for name, text in (("--prompt", prompt), ("--system", system)):
        if text is not None:
            check_text(text, name)
    if prompt is not None and not prompt.strip():  # as `patch gate` (a user's trial: an empty turn was answered)
        raise SafetyPatchError("--prompt is empty; give the text to answer")
    lm, pm = _load(model, device, dtype, patch, force)
    try:
        _chat(lm, pm, prompt, system, cfg)
    finally:
        pm.close()  # detach before the process ends (the base restored exactly)


def _route_line(pm, logits: dict[str, float]) -> str:
    """One stderr line on how a gated stack routed a chat turn: per gate, its patch folder, logit,
    threshold and whether its patch answered (``adapter``) or the base did (``base``)."""
    folder = {item: str(p.path) for item, p in zip(pm.items, pm.patches, strict=True)}  # as given ("patch" alone is no name)
    return "[route] " + "; ".join(
        f"{folder[n]}: {'adapter' if logits[n] > g.threshold else 'base'} (gate logit {logits[n]:+.2f}, "
        f"threshold {g.threshold:+.2f})" for n, g in pm.gates.items())


def _chat(lm, pm, prompt: str | None, system: str | None, cfg) -> None:
    from .generation import conversation, generate

    def answer(msgs) -> str:
        logits: list[dict] = []
        text = generate(pm, lm.tokenizer, [msgs], cfg, gate_logits=logits)[0]
        if pm.gated:  # where the gate sent this turn: the answer alone does not say which weights wrote it
            typer.echo(_route_line(pm, logits[0]), err=True)
        return text

    if prompt is not None:
        typer.echo(answer(conversation(prompt, system)))
        return
    typer.echo("Interactive chat. /reset clears the history, /exit (or Ctrl-D) quits.", err=True)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        msgs = conversation(line, system, history)
        try:
            reply = answer(msgs)
        except SafetyPatchError as e:  # a line too long for the context, or not text: say so, keep the session
            typer.echo(f"error: {e}", err=True)
            continue
        typer.echo(f"bot> {reply}")
        history.extend([{"role": "user", "content": line}, {"role": "assistant", "content": reply}])


@app.command()
def serve(
    model: ModelOpt = "default",
    patch: Annotated[list[Path] | None, typer.Option("--patch", "-p", help="Serve this patch under its folder's name (repeatable: one model name each; --stack stacks).")] = None,
    stack: Annotated[list[str] | None, typer.Option(help="NAME=P1,P2: serve a patch stack under model name NAME (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    audit_log: Annotated[Path, typer.Option(help="JSONL audit log, one line per request (appended).")] = Path("safety-patch-audit.jsonl"),
    log_prompts: Annotated[bool, typer.Option(help="Also log prompt and answer text in the audit log.")] = False,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    default_max_tokens: Annotated[int | None, typer.Option(min=1, help="max_tokens when a request gives none (default 256, or --max-tokens-limit where lower).")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(min=1, help="Longest prompt accepted (default: the model's context).")] = None,
    batch_window_ms: Annotated[float, typer.Option(min=0.0, help="How long the first request of a batch waits for others.")] = 15.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests per batch (1: one at a time).")] = 16,
    shutdown_timeout: Annotated[float, typer.Option(min=0.0, callback=_finite, help="On SIGTERM or Ctrl-C, seconds the answers in flight get to finish before they are cut.")] = 30.0,
    upstream: Annotated[str | None, typer.Option(help="Forward to this OpenAI-compatible server (e.g. vLLM with --enable-lora); the gate runs here.")] = None,
    upstream_model: Annotated[str | None, typer.Option(help="The upstream's name for the base (default: --model).")] = None,
    upstream_timeout: Annotated[float, typer.Option(min=0.001, callback=_finite, help="Seconds the upstream gets to start and to continue an answer before the request is a 502 (between reads, not in all).")] = 600.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option(help="Attach patches made for another base model (warns).")] = False,
) -> None:
    """Serve the base and patch stacks over an OpenAI-compatible HTTP API (docs/deploy.md)."""
    from .serve.app import ServeConfig, bind, build_embedded, parse_stacks
    from .serve.app import serve as run_server

    if default_max_tokens is not None and default_max_tokens > max_tokens_limit:
        raise SafetyPatchError(f"--default-max-tokens {default_max_tokens} is over --max-tokens-limit {max_tokens_limit}")
    default_max_tokens = min(256, max_tokens_limit) if default_max_tokens is None else default_max_tokens
    stacks = parse_stacks([str(p) for p in patch or []], stack)
    sock = bind(host, port)
    cfg = ServeConfig(default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit,
                      max_prompt_tokens=max_prompt_tokens, audit_path=str(audit_log), log_prompts=log_prompts)
    from .serve.audit import check_audit_path

    check_audit_path(cfg.audit_path)  # a bad path fails before the model loads (opened, and created, by the app)
    if upstream:
        from .serve.upstream import build_upstream

        backend = build_upstream(model, stacks, upstream, upstream_model or model, device, dtype, force,
                                 timeout_s=upstream_timeout, on_warning=lambda w: typer.echo(f"[serve] warning: {w}", err=True))
    else:
        backend = build_embedded(model, stacks, device, dtype, force, batch_window_ms, max_batch)
    typer.echo(f"[serve] models: {', '.join(backend.names)}; http://{host}:{sock.getsockname()[1]}/v1 ; "
               f"audit log: {audit_log}", err=True)
    run_server(backend, host, port, cfg, sock, shutdown_timeout=shutdown_timeout)


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
    from . import config as cfgmod
    from .data.build import DataConfig, build, show

    cfg = cfgmod.load(DataConfig, config, dict(seed=seed, sources=sources, max_per_source=max_per_source,
                                               wrap_fraction=wrap_fraction, distill=distill, dpo=dpo,
                                               self_instruct=self_instruct, borderline_train_extra=borderline_extra))
    from .outputs import check_out_dir, claim_output

    files = [x.strip()[5:] for x in (sources or "").split(",") if x.strip().startswith("file:")]
    check_out_dir(out, overwrite=overwrite, kind="data", inputs=[model, config, *files])
    with claim_output(out):  # a second `data build` into the same --out fails at once
        build(out, cfg, model=model, device=device, dtype=dtype, overwrite=overwrite)
    typer.echo(show(out))


@data_app.command("show")
def data_show_cmd(data_dir: Annotated[Path, typer.Argument(help="A folder written by `data build`.")]) -> None:
    """Print the counts table of a data folder."""
    from .data.build import show

    typer.echo(show(data_dir))


@data_app.command("sources")
def data_sources_cmd() -> None:
    """List the harmful-request sources."""
    from .data.sources import DEFAULT_SOURCES, REGISTRY

    for name in sorted(REGISTRY):
        typer.echo(f"{name:<18}{'default' if name in DEFAULT_SOURCES else ''}")
    typer.echo("file:PATH         a JSONL or CSV with a 'prompt' (or 'goal') column")


def train(**kw) -> None:
    """Train a safety patch (LoRA adapter or full-parameter delta) on a data folder.

    Settings apply in order: the recipe (default: the gated default patch), --config FILE, then the flags and --set group.field=value (any field; docs/training.md).
    """
    from .train.api import parse_set, resolve_config
    from .train.config import FLAGS, check_layer, dotted_layer, field_label
    from .train.run import train as run_train

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
    from .outputs import check_out_dir

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

    from .train.config import FLAGS, GROUPS, TrainConfig, field_types, help_text, recipe_names

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


def _eval(kind: str, model, patch, prompts, attacks, judge, limit, max_new_tokens, batch_size, out, device, dtype, force,
          no_cache, overwrite: bool = False, gcg_steps: int = 50, gcg_width: int = 128) -> None:
    from .atomic import write_json
    from .attacks import parse_attack_list
    from .evaluation.safety import DEFAULT_ATTACKS, EvalConfig, evaluate, table

    cfg = EvalConfig(attacks=parse_attack_list(attacks) if attacks is not None else DEFAULT_ATTACKS,
                     judge=judge, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     gcg_steps=gcg_steps, gcg_search_width=gcg_width)
    from .outputs import check_out_file, claim_output

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


LimitOpt = Annotated[int | None, typer.Option(min=1, help="At most N behaviours (safety), or N prompts per set (over-refusal: borderline and general each).")]
JudgeOpt = Annotated[str, typer.Option(help="refusal (default: refusal classifier) | substance (refusal + chatter read as degenerate) | keyword (marker baseline) | classifier:[harmbench|llamaguard:]MODEL | api:URL")]
OutOpt = Annotated[Path | None, typer.Option(help="results.json to write (atomically).")]
PromptsOpt = Annotated[Path, typer.Option(help="A data folder (held-out test split) or a JSONL/CSV with a prompt/goal column.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the generation cache.")]
OverwriteResultsOpt = Annotated[bool, typer.Option(help="Replace --out if it is a results file of this command.")]


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
    from .atomic import write_json
    from .outputs import check_out_file

    if out:  # before the evaluation, not after it
        check_out_file(out, inputs=[model, data, references, mc, *(patch or [])], overwrite=overwrite,
                       kind="safety-patch/eval-lm-eval" if suite == "lm-eval" else "safety-patch/eval-capability")

    if suite == "lm-eval":
        from .evaluation.lm_eval_adapter import evaluate_lm_eval, table
        lm_tasks = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        if not lm_tasks:
            raise SafetyPatchError("--suite lm-eval needs --tasks, e.g. --tasks arc_easy,hellaswag")
        res = evaluate_lm_eval(model, list(patch or []), lm_tasks, limit, batch_size,
                               device, dtype, force)
    elif suite == "offline":
        from .evaluation.capability import OFFLINE_TASKS, CapabilityConfig, evaluate_capability, table

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
    from .analysis.run import analyze as run_analyze
    from .analysis.run import default_prompts, summary_text
    from .evaluation.prompts import benign_prompts

    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise SafetyPatchError(f"--k must be comma-separated integers, got {k!r}") from None
    if not ks or min(ks) < 1:
        raise SafetyPatchError(f"--k must be positive integers, got {k!r}")
    if len(set(ks)) != len(ks):
        raise SafetyPatchError(f"--k names a size twice: {k!r}")
    from .outputs import check_out_dir, claim_output

    check_out_dir(out, overwrite=overwrite, kind="analysis", inputs=[model, data, benign, jailbreak, *patch])
    b, j = default_prompts(data, n_prompts) if data else ([], [])
    if benign:
        b = [p["messages"] for p in benign_prompts(benign)][:n_prompts]
    if jailbreak:
        j = [p["messages"] for p in benign_prompts(jailbreak)][:n_prompts]
    from .evaluation.prompts import source_identity

    sources = {"data": source_identity(data), "benign": source_identity(benign), "jailbreak": source_identity(jailbreak)}
    with claim_output(out):
        res = run_analyze(model, list(patch), out, ks, r, b, j, device=device, force=force, overwrite=overwrite,
                          prompt_sources={k: v for k, v in sources.items() if v is not None})
    typer.echo(summary_text(res["summary"], sorted(set(ks)), res["activations"], skipped=not (b or j)))
    typer.echo(f"wrote {out}")


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
    from .outputs import check_out_dir, claim_output
    from .pipeline import make_plan
    from .pipeline import reproduce as run_reproduce
    from .report import write_report

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
    from .report import write_report

    if not run.exists():
        from .atomic import interrupted_note

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


@patch_app.command("info")
def patch_info_cmd(patch: Annotated[Path, typer.Argument(help="Patch folder.")]) -> None:
    """What a patch is and what made it."""
    from .patches import info, read_patch

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
    from .generation import conversation, gate_views
    from .models import load_model
    from .patches import attached, item_names, read_patch

    if any(not t.strip() for t in prompt):  # the template alone would be routed, as if it were a prompt
        raise SafetyPatchError("--prompt is empty; give the text to route")
    if system is not None and not system.strip():
        raise SafetyPatchError("--system is empty; give the system prompt, or leave the option out")
    p = read_patch(patch)
    if not p.gated:
        raise SafetyPatchError(f"{patch} has no gate (patch.json has no 'gate'); it applies to every prompt")
    lm = load_model(model, device=device, dtype=dtype)
    from .gate.features import check_context

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
    from .models import load_model
    from .patches import probe_effect, probe_routing, read_patch, tied_targets, verify

    p = read_patch(patch)  # schema, hashes, computed id, finite non-zero weights, gate, no pickles
    below = [read_patch(s) for s in stack or []]
    have = {b.id for b in below}
    missing = [s for s in p.stack if s not in have]
    if missing:  # before the model loads: the check needs the stack, and says how to give it
        raise SafetyPatchError(f"{patch} was trained on top of patch(es) {', '.join(missing)}; verify it on top of them: "
                               "pass --stack FOLDER for each, in order (for a red-team round: its --patch folders)")
    lm = load_model(model, device=device, dtype=dtype)
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
    from .models import load_model
    from .outputs import check_out_dir, claim_output
    from .patches import merge_to_checkpoint

    check_out_dir(out, overwrite=overwrite, kind="merged", inputs=[model, *patch])
    with claim_output(out):  # a second merge into the same --out fails at once
        lm = load_model(model, device=device, dtype=dtype)
        merge_to_checkpoint(lm, patch, out, force, overwrite)
    typer.echo(f"wrote {out}")


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
    from .outputs import check_out_dir, claim_output
    from .redteam import ROUND_MARKER, round_table, run_round

    # before the claim creates anything (run_round repeats this for API callers)
    check_out_dir(out, inputs=[data, model, *(patch or []), *(previous or [])], overwrite=None,
                  reuse=(out / ROUND_MARKER).is_file(), kind="round")
    with claim_output(out):
        t = run_round(model, list(patch or []), attack, data, out, method, list(previous or []), replay, limit,
                      train_overrides={k: v for k, v in {"optim.lr": lr, "optim.epochs": epochs}.items() if v is not None},
                      device=device, dtype=dtype)
    typer.echo(round_table(t))


def _summary(args: list[str], seconds: float) -> None:
    """The one line every command ends with: what it wrote (its checked outputs that exist) and how long it took."""
    from .outputs import CHECKED
    from .progress import duration

    cmd = _command_name(args)
    outs = list(dict.fromkeys(p for p in CHECKED if p.exists()))
    wrote = [str(p) for p in outs if not any(q != p and p.is_relative_to(q) for q in outs)]  # not a stage's inner folder
    if any(a in ("--help", "-h") for a in args) or cmd == "safety-patch":
        return
    typer.echo(f"[{cmd}] {'wrote ' + ', '.join(wrote) + ' ' if wrote else 'done '}in {duration(seconds)}", err=True)


def _command_name(args: list[str]) -> str:
    """The command ``args`` run, as typed: ``train``, ``data build``; ``safety-patch`` when none. Read from
    the first word that names a command or group and, for a group, the next word (an option's value that
    happens to be a command's name, ``train --data data``, once made the line say ``[train data]``)."""
    top = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name: {c.name or c.callback.__name__ for c in g.typer_instance.registered_commands}
              for g in app.registered_groups}
    for i, a in enumerate(args):
        if a in top:
            return a
        if a in groups:
            sub = next((b for b in args[i + 1:] if not b.startswith("-")), None)
            return f"{a} {sub}" if sub in groups[a] else a
    return "safety-patch"


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

    from .gate.config import GateFitConfig
    from .gate.evaluate import report_table
    from .gate.folder import fit_gate_folder
    from .models import load_model
    from .outputs import check_out_dir, claim_output

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
        from .data.folder import DataFolder

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
    from .gate.folder import apply_gate
    from .outputs import check_out_dir, claim_output

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
    from .gate.evaluate import evaluate_gate, report_table, user_prompt_sets
    from .gate.folder import read_gate_source
    from .gate.pool import RULE_ATTACKS
    from .models import load_model
    from .outputs import check_out_file

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
    read_gate_source(gate)  # a bad gate folder, patch or prompt file fails before the model loads
    user_sets = user_prompt_sets(harmful, benign)
    if out is not None:
        check_out_file(out, inputs=[gate, data, *(p for p in (harmful, benign) if p is not None)], overwrite=overwrite,
                       kind="safety-patch/gate-eval")
    lm = load_model(model, device=device, dtype=dtype)
    rep = evaluate_gate(lm, gate, data, split, seed, loso=leave_one_source_out, attacks=attack_list,
                        lofo=leave_one_family_out, user_sets=user_sets)
    typer.echo(report_table(rep))
    if "note" in rep:
        typer.echo(f"note: {rep['note']}")
    if out is not None:
        from .atomic import write_json

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
    from .gate.folder import read_gate_folder
    from .models import load_model
    from .outputs import check_out_dir, claim_output
    from .serve.export import check_exportable, export_gate

    if (gate is None) == (patch is None):
        raise SafetyPatchError("give exactly one of --gate and --patch")
    check_out_dir(out, overwrite=overwrite, kind="exported-gate", inputs=[model, gate, patch])
    if patch is not None:
        from .gate.probe import Gate
        from .patches import read_patch

        p = read_patch(patch)
        if not p.gated:
            raise SafetyPatchError(f"{p.path}: not a gated patch; there is no gate to export")
        g, fingerprint, where = Gate.load(p.path), p.base_fingerprint, p.path
        source = {"patch": str(p.path), "patch_id": p.id}
    else:
        if (Path(gate) / "patch.json").is_file() and not (Path(gate) / "gate.json").is_file():
            from .patches import read_patch

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


def _repeated_option(args: list[str]) -> str | None:
    """The first option of the command ``args`` runs (or of a group above it: ``--threads``) that is
    given twice though it takes one value, as a message; None when there is none. Click keeps the last
    silently: `--rank 4 ... --rank 8` trained rank 8 without a word. Options that take many values
    (``--patch P --patch Q``) may repeat."""
    # typer vendors its own click (typer._click, no public Group/Option names): groups are told by
    # their `commands`, options by their `param_type_name`.
    cmd, i = typer.main.get_command(app), 0
    while True:
        by_name = {o: p for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        seen: dict[str, str | bool] = {}
        while i < len(args):
            tok = args[i]
            if tok == "--":
                return None
            if not tok.startswith("-") and hasattr(cmd, "commands"):
                break  # the subcommand's name
            i += 1
            name, has_value = (tok.split("=", 1)[0], True) if tok.startswith("--") and "=" in tok else (tok, False)
            p = by_name.get(name)
            if p is None:
                continue
            if not (p.is_flag or p.count or has_value):
                i += 1  # its value, which may itself start with "-"
            if p.multiple or p.count:
                continue
            if p.is_flag and not has_value:  # `--force --force` says one thing; `--x --no-x` two
                said = name in p.secondary_opts
                if seen.setdefault(p.name, said) != said:
                    return f"{' and '.join([*p.opts[:1], *p.secondary_opts[:1]])} are both given; give one of them"
                continue
            if p.name in seen:
                also = "" if seen[p.name] == name else f" (also as {seen[p.name]})"
                return f"{name} is given twice{also}; it takes one value: give it once"
            seen[p.name] = name
        sub = cmd.commands.get(args[i]) if hasattr(cmd, "commands") and i < len(args) else None
        if sub is None:
            return None
        cmd, i = sub, i + 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    import time

    from .outputs import CHECKED

    if argv is None:  # a real command's process (tests pass argv and keep their own allocator)
        from . import allocator

        allocator.configure()

    t0 = time.time()
    CHECKED.clear()  # one command's outputs (tests call main() repeatedly in one process)
    with contextlib.suppress(AttributeError, ValueError):  # stage lines reach a log file as they happen
        sys.stdout.reconfigure(line_buffering=True)
    with _sigterm_interrupts() as terminated:
        return _run(args, t0, terminated)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a command runs, SIGTERM (``kill``, a scheduler's stop, ``timeout``) interrupts it the way
    Ctrl-C does: the cleanups on the way out run (temporary folders of unfinished outputs are
    removed, claims released) and the command says it was terminated. Python's default for SIGTERM
    ends the process at once, silently, leaving that debris for the next run. Yields a list that
    holds True once SIGTERM arrived; the previous handler is restored after the command."""
    import signal
    import threading

    got: list = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield got
        return

    def on_term(signum, frame):
        if got:  # a second SIGTERM while the first one's cleanups run: let them finish
            return
        got.append(True)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)


_RESUME_HINTS = {
    "train": "the same command with --resume continues, bit for bit, from its last checkpoint where one was "
             "saved (every optim.save_steps steps)",
    "reproduce": "the same command resumes: finished stages are kept",
}
"""What the line of an interrupted command adds, per command: how to go on from where it stopped."""


def _stopped(terminated: list, args: list[str] | None = None) -> int:
    """The line and exit code of an interrupted command: 143 (128 + SIGTERM) or 130 (Ctrl-C)."""
    hint = _RESUME_HINTS.get(next((a for a in args or [] if not a.startswith("-")), ""))
    typer.echo(("terminated" if terminated else "interrupted") + (f"; {hint}" if hint else ""), err=True)
    return 143 if terminated else 130


def _run(args: list[str], t0: float, terminated: list) -> int:
    import time

    import typer._click.exceptions as tx  # typer vendors its own click; its exception types live here

    try:
        twice = _repeated_option(args)
        if twice:
            raise SafetyPatchError(twice)
        rc = app(args=args, prog_name="safety-patch", standalone_mode=False)
        # Without standalone mode click *returns* the code of an abort (Ctrl-C: typer's Abort/Exit
        # become 1 or 130) instead of raising: a command that did not finish must not say "done" and exit 0.
        if isinstance(rc, int) and rc != 0:
            if rc == 130 or terminated:
                return _stopped(terminated, args)
            typer.echo(f"stopped (exit {rc})", err=True)
            return rc
        _summary(args, time.time() - t0)
    except SafetyPatchError as e:
        if _STATE["debug"] or "--debug" in args:
            traceback.print_exc()
        typer.echo(f"safety-patch: error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except tx.NoArgsIsHelpError as e:
        e.show()
        return 0
    except tx.ClickException as e:
        e.show()
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _stopped(terminated, args)
    return 0


if __name__ == "__main__":  # python -m safety_patch.cli (accelerate launch): the console script's path
    from safety_patch.entry import main as _entry

    sys.exit(_entry())

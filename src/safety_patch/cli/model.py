"""``model info``, ``chat`` and ``serve``: a model, with patches attached, answering prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SafetyPatchError
from .app import DeviceOpt, DtypeOpt, ModelOpt, PatchOpt, _finite, _load, app, model_app


@model_app.command("info")
def model_info_cmd(
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Architecture, parameter count, layers, linear modules, chat template, fingerprint."""
    from ..models import model_info

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
    from ..errors import check_text
    from ..generation import GenerationConfig

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
    from ..generation import conversation, generate

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
    from ..serve.embedded import build_embedded, parse_stacks
    from ..serve.protocol import ServeConfig
    from ..serve.server import bind
    from ..serve.server import serve as run_server

    if default_max_tokens is not None and default_max_tokens > max_tokens_limit:
        raise SafetyPatchError(f"--default-max-tokens {default_max_tokens} is over --max-tokens-limit {max_tokens_limit}")
    default_max_tokens = min(256, max_tokens_limit) if default_max_tokens is None else default_max_tokens
    stacks = parse_stacks([str(p) for p in patch or []], stack)
    sock = bind(host, port)
    cfg = ServeConfig(default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit,
                      max_prompt_tokens=max_prompt_tokens, audit_path=str(audit_log), log_prompts=log_prompts)
    from ..serve.audit import check_audit_path

    check_audit_path(cfg.audit_path)  # a bad path fails before the model loads (opened, and created, by the app)
    if upstream:
        from ..serve.upstream import build_upstream

        backend = build_upstream(model, stacks, upstream, upstream_model or model, device, dtype, force,
                                 timeout_s=upstream_timeout, on_warning=lambda w: typer.echo(f"[serve] warning: {w}", err=True))
    else:
        backend = build_embedded(model, stacks, device, dtype, force, batch_window_ms, max_batch)
    from ..patch_schema import read_manifest
    from ..patches import PATCH_JSON
    from ..patches.folder import gate_summary

    # what each gate was measured to route, before the first request; the backend has checked every
    # patch whole already, so only patch.json is read here (hashing a large delta again costs minutes)
    for name, paths in stacks.items():
        for path in paths:
            meta, _ = read_manifest(Path(path) / PATCH_JSON)
            if meta.get("gate"):
                line, *warnings = gate_summary(meta["gate"])
                typer.echo(f"[serve] {name}: the gate of {path}: {line}", err=True)
                for w in warnings:
                    typer.echo(f"[serve] {name}: {w}", err=True)
    typer.echo(f"[serve] models: {', '.join(backend.names)}; http://{host}:{sock.getsockname()[1]}/v1 ; "
               f"audit log: {audit_log}", err=True)
    run_server(backend, host, port, cfg, sock, shutdown_timeout=shutdown_timeout)

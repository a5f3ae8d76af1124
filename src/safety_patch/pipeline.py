"""``safety-patch reproduce``: the paper's experiments as numbered stages in one run folder.

RUN/
  settings.json            what the folder is bound to (mode, model and its weights' fingerprint,
                           seeds, device type, dtype),
                           written before the first stage
  run.json                 resolved plan, provenance, per-stage timings
  01-data/                 data folder (data build)
  02-gate/                 the gate (gate fit) and its reliability on the test split (eval.json)
  02-arms/<arm>/           one patch per arm (train); <lora arm>+gate: that adapter behind the gate
  03-eval/<model>/         safety.json, overrefusal.json per model (base and arms), capability.json per arm
  04-plug/plug.json        plug-and-play checks (detach exactness, merge vs attach) on the real model
  05-analysis/             analyze over every arm
  report.md, report.html   the report (a pure reader of the stage outputs)

Every stage folder carries ``stage.json`` with a content hash of its inputs (its settings
and the hashes of the stages it reads). A re-run skips stages whose hash matches, so an
interrupted run resumes where it stopped and a changed setting re-runs only what depends
on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import sha256_file, write_json
from .errors import SafetyPatchError


@dataclass
class Arm:
    name: str
    train: dict  # "recipe", "general_only" and the TrainConfig fields it changes, as dotted keys ("lora.rank");
    # for a gated arm {"from": arm}: that arm's patch behind the run's gate (no training of its own)
    role: str  # "lora-safety" | "lora-safety-gated" | "full-safety" | "full-mix" | "lora-dpo" | "full-dpo" | "rank" | "cross-domain"


@dataclass
class Plan:
    model: str = "default"
    mode: str = "default"  # quick | default | full
    seeds: int = 1
    data: dict = field(default_factory=dict)
    arms: list[Arm] = field(default_factory=list)
    eval_limit: int | None = 100
    eval_attacks: tuple[str, ...] = ("direct", "template")
    max_new_tokens: int = 48
    capability_tasks: tuple[str, ...] = ("nll", "kl", "compliance", "humaneval")
    humaneval_limit: int = 20
    capability_limit: int | None = None
    analysis_ks: tuple[int, ...] = (8, 32, 128)
    analysis_prompts: int = 12
    gate: dict | None = field(default_factory=lambda: {"self_instruct": 0})
    """GateFitConfig fields of the run's gate (the default gate's, less the self-written negatives
    the plan's data folder does not build); None = no gate and no gated arm."""
    gate_attacks: tuple[str, ...] | None = None
    """Rule attacks of the gate's reliability report; None = those the train split never used."""
    gate_source_shots: tuple[int, ...] = (25, 50, 100)
    """The report's leave-one-source-out learning curve (`gate eval --source-shots`): how many of a
    held-out source's own requests the gate needs; () = none (quick mode: its sources are too small
    to leave enough to measure)."""


QUICK_LORA = {"optim.epochs": 3.0, "optim.lr": 1e-3}
"""Quick mode's LoRA arms: the paper's recipe at 5x its learning rate for three epochs (see make_plan)."""
QUICK_FULL = {"optim.epochs": 3.0, "optim.lr": 5e-5}
"""Quick mode's full-parameter arms: 5x the full-safety recipe's learning rate for three epochs."""


MIX_RATIOS = (1, 2)
"""General:safety row ratios of the data-mixing arms (the paper's baseline)."""
QUICK_MIX_RATIOS = (1,)
"""Quick mode's mixing arms: ratio 1 only (see make_plan)."""


_GATE_FIT_FLAGS = ("layer", "depth", "wrapped_benign", "wrapped_harmful", "self_instruct", "rephrased", "seed",
                   "extra_weight")
"""The plan's gate settings that `gate fit` takes as flags of their own (numbers)."""


def _gate_fit_flags(gate: dict) -> str:
    """`` --self-instruct 0 --wrapped-benign 200 ...``: the plan's gate settings as `gate fit` flags, so
    the command an error suggests fits the gate reproduce fit (a folder built without self-written
    requests has no selfinstruct.jsonl for gate fit's default to read)."""
    return "".join(f" --{k.replace('_', '-')} {gate[k]}" for k in _GATE_FIT_FLAGS
                   if isinstance(gate.get(k), (int, float)) and not isinstance(gate.get(k), bool))


def make_plan(model: str = "default", quick: bool = False, full: bool = False, seeds: int = 1) -> Plan:
    if quick and full:
        raise SafetyPatchError("--quick and --full exclude each other")
    if seeds < 1:
        raise SafetyPatchError("--seeds must be >= 1")
    mode = "quick" if quick else "full" if full else "default"
    rows = {"quick": 32, "default": 200, "full": 400}[mode]
    common = {"data.max_train_rows": rows, "data.max_seq_len": 320 if quick else 512, "optim.save_steps": 10**6}
    # The arms are recipes (train/recipes/: the paper's LoRA r 8, alpha 16, lr 2e-4; every weight at
    # lr 1e-5) plus what each arm changes.
    lora = {"recipe": "paper"} | common
    fullp = {"recipe": "full-safety"} | common
    if quick:
        # 32 rows for one epoch at the recipes' learning rates is 4 optimiser steps, which moves a
        # 135M model's attack success by nothing measurable (demo of 2026-12-01: 90% -> 82.5%,
        # n 40, intervals overlapping). Three epochs at 5x the rates (12 steps) move it: on that
        # demo's data, LoRA 90% -> 10% direct, full-parameter 90% -> 0%, both refusing most safe
        # prompts too, which is the paper's trade-off in small (docs/lab-notebook.md, session 13).
        lora |= QUICK_LORA
        fullp |= QUICK_FULL
    # The data-mixing baseline at general:safety ratios 1 and 2; quick mode trains ratio 1 only: the
    # ratio-2 arm trains three times the full-safety arm's rows and was the demo's longest stage
    # (147 of its 924 s, 2026-12-02), while the report's claim compares LoRA with every mixing arm run.
    ratios = QUICK_MIX_RATIOS if quick else MIX_RATIOS
    arms = [Arm("lora-safety", lora, "lora-safety"), Arm("full-safety", fullp, "full-safety")]
    arms += [Arm(f"full-mix-{r:g}", fullp | {"data.general_ratio": float(r)}, "full-mix") for r in ratios]
    if full:
        arms += [Arm("lora-dpo", lora | {"loss.objective": "dpo", "optim.lr": 5e-5}, "lora-dpo"),
                 Arm("full-dpo", fullp | {"loss.objective": "dpo", "optim.lr": 5e-7}, "full-dpo")]
        arms += [Arm(f"lora-r{r}", lora | {"lora.rank": r, "lora.alpha": 2.0 * r}, "rank") for r in (1, 2, 4, 16, 32)]
        arms += [Arm("lora-code", lora | {"general_only": True}, "cross-domain"),
                 Arm("full-code", fullp | {"general_only": True}, "cross-domain")]
    if seeds > 1:
        arms = [Arm(f"{a.name}@s{s}", a.train | {"optim.seed": s}, a.role) for a in arms for s in range(seeds)]
    # The product's default patch is the paper's LoRA behind a gate (docs/gate.md): each LoRA
    # safety arm also runs gated, next to itself, so the report shows what the gate changes.
    arms += [Arm(f"{a.name}+gate", {"from": a.name}, "lora-safety-gated") for a in arms if a.role == "lora-safety"]
    # No self-written anchor prompts: the arms here train the paper's recipe and its baselines,
    # none of which anchors (saves ~10 min of sampling on a CPU).
    data = {"distill_max_new_tokens": 128, "dpo": full, "self_instruct": 0, "borderline_train_extra": False}
    if quick:
        data |= {"max_per_source": 120, "general_limit": 96, "distill_max_new_tokens": 48, "template_max_chars": 1000}
    plan = Plan(model=model, mode=mode, seeds=seeds, data=data, arms=arms)
    if quick:
        plan.eval_limit, plan.max_new_tokens, plan.humaneval_limit, plan.capability_limit = 20, 32, 0, 24
        plan.capability_tasks = ("nll", "kl", "compliance")
        plan.analysis_prompts = 6
        # a smaller gate pool and four of the unseen attacks (one per kind: rephrasing, encoding,
        # history, prefill) keep the gate stage to a few minutes on a CPU
        plan.gate = {"self_instruct": 0, "wrapped_benign": 200, "wrapped_harmful": 100, "rephrased": 150}
        plan.gate_attacks = ("past_tense", "base64", "multi_turn", "prefill")
        plan.gate_source_shots = ()
    return plan


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Content-hash bookkeeping: ``done(dir, key)`` / ``mark(dir, key, seconds)``."""

    def __init__(self, run: Path):
        self.run = run
        self.timings: dict[str, float] = {}
        self.t0 = time.time()

    def done(self, d: Path, key: str) -> bool:
        """Whether the stage in ``d`` ran with ``key`` and every file it wrote is still there as it
        wrote it: same size and, where recorded (runs since 2026-12-04), same sha256. A deleted,
        cut-short or changed output (even one of the same size) re-runs the stage rather than
        being served "cached" and then refused by the report for good; a stage.json that is not
        JSON counts as not done."""
        f = d / "stage.json"
        try:
            info = json.loads(f.read_text()) if f.is_file() else None
        except (ValueError, OSError):
            return False
        if not isinstance(info, dict) or info.get("key") != key:
            return False
        files = info.get("files")
        if not isinstance(files, dict):  # a stage marked before files were recorded: as before
            return True
        for name, want in files.items():
            p = d / name
            size, digest = (want.get("size"), want.get("sha256")) if isinstance(want, dict) else (want, None)
            if not p.is_file() or p.stat().st_size != size:
                return False
            if digest is not None and sha256_file(p) != digest:
                return False
        return True

    def mark(self, d: Path, key: str, seconds: float, **extra) -> None:
        files = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(d.rglob("*")) if p.is_file() and p.name != "stage.json"}
        write_json(d / "stage.json", {"key": key, "seconds": round(seconds, 1), **extra, "files": files})
        self.timings[str(d.relative_to(self.run))] = round(seconds, 1)

    def say(self, i: int, n: int, what: str, skipped: bool = False) -> None:
        el = time.time() - self.t0
        print(f"[{i}/{n}] {what}{' (cached)' if skipped else ''}  elapsed {el / 60:.1f} min", flush=True)


def reproduce(out: str | Path, plan: Plan, device: str = "auto", dtype: str = "auto") -> dict:
    from . import runtime as rt_
    from .data.build import DataConfig, build, manifest_sha256
    from .evaluation.capability import CapabilityConfig, evaluate_capability
    from .evaluation.safety import EvalConfig, evaluate
    from .models import load_model, model_fingerprint
    from .provenance import code_key, provenance
    from .report import write_report
    from .train.api import resolve_config
    from .train.run import train

    run = Path(out)
    resolved = rt_.resolve(device, dtype)
    plan_dict = _plan_dict(plan)
    settings = {"plan": {k: plan_dict[k] for k in SETTINGS},
                "runtime": {"device": resolved.device.type, "dtype": str(resolved.dtype).removeprefix("torch.")}}
    # the weights, not the path, are what a run is bound to and what its stages are keyed on (a
    # user's trial swapped a folder's weights between two invocations: the old model's data was
    # served "cached" to the new one; and the same folder spelled ./m was refused as another model).
    # Fails early on a bad --model (and converts a GGUF once), before --out is made.
    settings["model_fingerprint"] = model_fp = model_fingerprint(plan.model, device, dtype)
    _check_same_plan(run, settings)
    run.mkdir(parents=True, exist_ok=True)
    # written before the first stage: an interrupted first run is refused in other settings too
    # (run.json exists only once a run ends, and resuming in another mode deleted 01-data)
    write_json(run / "settings.json", settings)
    st = Stages(run)
    n_steps = 1 + (plan.gate is not None) + len(plan.arms) + (1 + len(plan.arms)) + 1 + 1 + 1
    step = 0

    # 1. data
    step += 1
    data_dir = run / "01-data"
    # Every stage key holds the code identity: after any edit to the package, stages re-run
    # instead of being served from a folder that other code computed (provenance.py says why).
    code = code_key()
    data_key = _hash({"data": plan.data, "model": model_fp, "code": code})
    if not st.done(data_dir, data_key):
        st.say(step, n_steps, "data: building harmful, general and borderline sets")
        t = time.time()
        shutil.rmtree(data_dir, ignore_errors=True)
        build(data_dir, DataConfig(**plan.data), model=plan.model, device=device, dtype=dtype)
        st.mark(data_dir, data_key, time.time() - t)
    else:
        st.say(step, n_steps, "data", skipped=True)
    data_hash = manifest_sha256(data_dir)

    # 2a. the gate (its own stage: gate fit), and its reliability on the held-out test split
    gate_dir = run / "02-gate"
    gate_key = _hash({"gate": plan.gate, "attacks": plan.gate_attacks, "data": data_hash, "model": model_fp,
                      "code": code, **({"shots": plan.gate_source_shots} if plan.gate_source_shots else {})})
    if plan.gate is not None:
        step += 1
        if not st.done(gate_dir, gate_key):
            from .gate.config import GateFitConfig
            from .gate.evaluate import evaluate_gate
            from .gate.folder import GateNeverFires, fit_gate_folder

            st.say(step, n_steps, "gate: fit on the train split, reliability on the test split")
            t = time.time()
            shutil.rmtree(gate_dir, ignore_errors=True)
            gate_dir.mkdir(parents=True)
            lm = load_model(plan.model, device=device, dtype=dtype)
            try:
                fit_gate_folder(lm, data_dir, GateFitConfig(**plan.gate), gate_dir / "gate")
            except GateNeverFires as e:  # its advice names `gate fit`'s flags, which reproduce does not take
                raise SafetyPatchError(
                    f"{str(e).split(': it would never apply')[0]}: the gated arms would protect nothing (fail closed). "
                    "reproduce fits the gate with the plan's fixed settings and cannot go on with this model; see whether "
                    f"any threshold gives it a working gate with `safety-patch gate fit --data {data_dir} --out GATE "
                    f"--model {plan.model}{_gate_fit_flags(plan.gate)} --target-fpr 0.05` (or --threshold)") from None
            write_json(gate_dir / "eval.json", evaluate_gate(lm, gate_dir / "gate", data_dir, "test", loso=True,
                                                             attacks=plan.gate_attacks, lofo=True,
                                                             shots=plan.gate_source_shots))
            del lm
            st.mark(gate_dir, gate_key, time.time() - t)
        else:
            st.say(step, n_steps, "gate", skipped=True)

    # 2b. arms: one patch each; the LoRA and full arms share the trainer and differ in what trains
    arm_keys = {}
    for arm in plan.arms:
        step += 1
        d = run / "02-arms" / arm.name
        key = _hash({"arm": asdict(arm), "data": data_hash, "model": model_fp, "code": code,
                     **({"from": arm_keys[arm.train["from"]], "gate": gate_key} if "from" in arm.train else {})})
        arm_keys[arm.name] = key
        if st.done(d, key):
            st.say(step, n_steps, f"train {arm.name}", skipped=True)
            continue
        if "from" in arm.train:  # the source arm's patch behind the run's gate: gate apply, no training
            from .gate.folder import apply_gate

            if plan.gate is None:
                raise SafetyPatchError(f"arm {arm.name}: a gated arm needs the plan's gate")
            st.say(step, n_steps, f"gate {arm.train['from']} -> {arm.name}")
            t = time.time()
            d.mkdir(parents=True, exist_ok=True)
            apply_gate(run / "02-arms" / arm.train["from"] / "patch", gate_dir / "gate", d / "patch", overwrite=True)
            st.mark(d, key, time.time() - t)
            continue
        fields = dict(arm.train)
        recipe = fields.pop("recipe", None)
        general_only = fields.pop("general_only", False)
        cfg = resolve_config(recipe, None, fields, where=f"arm {arm.name}")
        st.say(step, n_steps, f"train {arm.name} ({cfg.method}, {cfg.loss.objective})")
        t = time.time()
        src = _general_only_data(data_dir, run / "02-arms" / ".general-data") if general_only else data_dir
        d.parent.mkdir(parents=True, exist_ok=True)
        # with train's own progress: a bar on a terminal, a line every 10 s in a log (the arms are
        # the demo's longest silent stretch otherwise: minutes each)
        train(src, d / "patch", cfg, model=plan.model, device=device, dtype=dtype, overwrite=True)
        st.mark(d, key, time.time() - t)

    # 3. evaluation of the base and every arm
    ecfg = EvalConfig(attacks=plan.eval_attacks, limit=plan.eval_limit, max_new_tokens=plan.max_new_tokens)
    ocfg = EvalConfig(attacks=("direct",), limit=plan.eval_limit, max_new_tokens=plan.max_new_tokens)
    tasks = plan.capability_tasks
    skipped = {}
    if "humaneval" in tasks:
        from .evaluation.execution import sandbox_check

        # Model-written code runs only inside the sandbox; where the platform cannot build it
        # (e.g. user namespaces disabled), the reproduction goes on without HumanEval and says so
        # in run.json and on stdout, rather than failing late or running code unconfined.
        reason = sandbox_check()
        if reason:
            tasks = tuple(t for t in tasks if t != "humaneval")
            skipped["humaneval"] = reason
            print(f"note: HumanEval skipped: no code-execution sandbox here ({reason})", flush=True)
    ccfg = CapabilityConfig(tasks=tasks, limit=plan.capability_limit, humaneval_limit=plan.humaneval_limit,
                            compliance_max_new_tokens=plan.max_new_tokens)
    for name in ["base"] + [a.name for a in plan.arms]:
        step += 1
        d = run / "03-eval" / name
        patches = [] if name == "base" else [run / "02-arms" / name / "patch"]
        key = _hash({"e": asdict(ecfg), "o": asdict(ocfg), "c": asdict(ccfg), "data": data_hash,
                     "arm": arm_keys.get(name, "base"), "model": model_fp, "code": code})
        if st.done(d, key):
            st.say(step, n_steps, f"evaluate {name}", skipped=True)
            continue
        st.say(step, n_steps, f"evaluate {name}: attacks, over-refusal, capability")
        t = time.time()
        d.mkdir(parents=True, exist_ok=True)
        lm = load_model(plan.model, device=device, dtype=dtype)  # once for the three evaluations
        # patched runs also compute the base (served from the generation cache after the first model)
        write_json(d / "safety.json", evaluate("safety", plan.model, patches, str(data_dir), ecfg, lm=lm))
        write_json(d / "overrefusal.json", evaluate("overrefusal", plan.model, patches, str(data_dir), ocfg, lm=lm))
        if name != "base":
            write_json(d / "capability.json", evaluate_capability(plan.model, patches, str(data_dir), ccfg, lm=lm))
        del lm
        st.mark(d, key, time.time() - t)

    # 4. plug-and-play on the real model: detach exactness, merge == attach, stacking
    step += 1
    d = run / "04-plug"
    lora_arms = [a.name for a in plan.arms if a.role in ("lora-safety",)]
    key = _hash({"arms": [arm_keys[a] for a in lora_arms], "model": model_fp, "code": code})
    if lora_arms and not st.done(d, key):
        st.say(step, n_steps, "plug-and-play checks")
        t = time.time()
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "plug.json", plug_checks(plan.model, run / "02-arms" / lora_arms[0] / "patch",
                                                [run / "02-arms" / a.name / "patch" for a in plan.arms if a.role == "full-safety"],
                                                device, dtype))
        st.mark(d, key, time.time() - t)
    else:
        st.say(step, n_steps, "plug-and-play checks", skipped=True)

    # 5. analysis of every arm (weights; activations on a few benign and jailbreak prompts)
    step += 1
    d = run / "05-analysis"
    gated = {a.name for a in plan.arms if "from" in a.train}
    key = _hash({"arms": {a: k for a, k in arm_keys.items() if a not in gated}, "ks": plan.analysis_ks, "n": plan.analysis_prompts, "data": data_hash,
                 "code": code})
    if not st.done(d, key):
        st.say(step, n_steps, "analysis: subspaces, magnitudes, hidden shifts")
        t = time.time()
        from .analysis.run import analyze, default_prompts

        benign, jail = default_prompts(data_dir, plan.analysis_prompts)
        arm_dirs = _analysis_links(run, plan)
        analyze(plan.model, arm_dirs, d / "out", plan.analysis_ks, None, benign, jail, device=device, overwrite=True)
        st.mark(d, key, time.time() - t)
    else:
        st.say(step, n_steps, "analysis", skipped=True)

    # 6. report: reads the stage outputs only
    step += 1
    st.say(step, n_steps, "report")
    info = {"plan": plan_dict, "runtime": settings["runtime"], "model_fingerprint": model_fp, "timings": st.timings,
            "total_seconds": round(time.time() - st.t0, 1), "skipped": skipped, **provenance()}
    try:  # keep the order the stages first ran in (a damaged run.json is replaced: each stage.json has its seconds)
        old = json.loads((run / "run.json").read_text()).get("timings")
    except (ValueError, OSError, AttributeError):
        old = None
    info["timings"] = (old if isinstance(old, dict) else {}) | st.timings
    # ...and of stages an interrupted invocation computed (it wrote no run.json; each stage.json
    # holds its own seconds): the table lists every stage whose result the report reads
    for f in sorted(run.rglob("stage.json")):
        name = str(f.parent.relative_to(run))
        if name not in info["timings"]:
            try:
                seconds = json.loads(f.read_text()).get("seconds")
            except (ValueError, OSError, AttributeError):
                continue
            if isinstance(seconds, (int, float)):
                info["timings"][name] = seconds
    write_json(run / "run.json", info)
    write_report(run)
    return info


STAGE_PREFIXES = ("01-", "02-", "03-", "04-", "05-")
SETTINGS = ("mode", "model", "seeds")
"""Plan fields a run folder is bound to, with the resolved device type and dtype: resuming with
another value would rebuild every stage, or mix precisions in one report."""


def _check_same_plan(run: Path, settings: dict) -> None:
    """Refuse to resume a run folder made in another mode, model or seed count, or on another
    device type or dtype: its stages would be deleted and rebuilt at the new sizes (a forgotten
    --quick once started rebuilding a quick run's data at default sizes, its 01-data already
    gone), or a stage re-run in bf16 would sit beside fp32 ones in one report. Reads
    ``settings.json`` (written before a run's first stage), else a finished run's ``run.json``
    (runs before 2026-12-04; those record no runtime), against ``settings``: this run's, as it will
    write them to settings.json. Raises SafetyPatchError naming what differs."""
    f = run / "settings.json"
    if not f.is_file():
        f = run / "run.json"
    if not f.is_file():
        return
    if f.name == "settings.json" and not any(p.is_dir() and p.name[:3] in STAGE_PREFIXES for p in run.iterdir()):
        return  # a run that stopped before its first stage made anything: nothing to lose, nothing to mix
    try:
        info = json.loads(f.read_text())
        old = info.get("plan") or {}
        old_rt = info.get("runtime") or {}
        if not isinstance(old, dict) or not isinstance(old_rt, dict):
            raise AttributeError
    except (ValueError, OSError, AttributeError):
        raise SafetyPatchError(f"{f}: not valid JSON or not a run's record; cannot tell which run this folder holds "
                               "(choose another --out, or remove the folder)") from None
    new, runtime = settings["plan"], settings["runtime"]
    old_fp, new_fp = info.get("model_fingerprint"), settings.get("model_fingerprint")
    # a run that recorded its model's fingerprint is bound to those weights, whatever the path is
    # called (./m, an absolute path, another working directory); one that did not (before
    # 2026-12-04, session 40) to the --model string, as it was
    bound = [k for k in SETTINGS if not (k == "model" and old_fp and new_fp)]
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in bound if old.get(k) != new.get(k)]
    other_weights = bool(old_fp and new_fp and old_fp != new_fp)
    if other_weights:
        diff.append(f"model weights {old_fp[:12]} -> {new_fp[:12]} ({new.get('model')!r}"
                    f"{' was ' + repr(old.get('model')) if old.get('model') != new.get('model') else ''}: other weights)")
    if old_rt:
        diff += [f"{k} {old_rt.get(k)!r} -> {runtime.get(k)!r}" for k in ("device", "dtype")
                 if old_rt.get(k) != runtime.get(k)]
    if diff:
        flags = {"quick": " --quick", "full": " --full"}.get(str(old.get("mode")), "")
        where = "".join(f" --{k} {old_rt[k]}" for k in ("device", "dtype") if old_rt.get(k))
        if other_weights:  # the old path may hold the new weights: naming it would not resume
            model = f"--model <a folder holding the weights {old_fp[:12]}>"
        else:
            model = f"--model {old.get('model')}"
        raise SafetyPatchError(f"{run} holds a run made with other settings ({'; '.join(diff)}): resuming would "
                               f"rebuild its stages or mix them; resume it with the same ones (reproduce{flags} "
                               f"{model} --seeds {old.get('seeds')}{where}), or choose another --out")


def _plan_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["arms"] = [asdict(a) for a in plan.arms]
    return d


def _analysis_links(run: Path, plan: Plan) -> list[Path]:
    """Patch folders named after their arms (analysis labels results by folder name)."""
    links = run / "05-analysis" / "patches"
    links.mkdir(parents=True, exist_ok=True)
    out = []
    for a in plan.arms:
        if a.train.get("loss.objective", "sft") == "dpo" and a.role != "lora-dpo":
            continue
        if "from" in a.train:  # a gated twin: the same weights as its source arm
            continue
        link = links / a.name.replace("@", "_")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((run / "02-arms" / a.name / "patch").resolve(), target_is_directory=True)
        out.append(link)
    return out


def _general_only_data(data_dir: Path, out: Path) -> Path:
    """A data folder whose 'safety' rows are the general (self-distilled) train conversations: the
    cross-domain arm trains on non-safety data with the same trainer."""
    from .data.folder import FILES, DataFolder

    rows = DataFolder(data_dir).distilled("general", "train")  # checked before the copy replaces anything
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(data_dir, out, ignore=shutil.ignore_patterns("stage.json"))
    from .atomic import write_jsonl

    write_jsonl(out / FILES["train"], rows)
    return out


def plug_checks(model: str, lora: Path, fulls: list[Path], device: str, dtype: str) -> dict:
    """Exactness of attach/detach/merge on the real model, for the report's plug-and-play claim."""
    import torch

    from .models import load_model
    from .patches import attached, merged_state_dict, read_patch

    lm = load_model(model, device=device, dtype=dtype)
    ids = lm.tokenizer(["What is the capital of France?", "How do I kill a Python process?"], return_tensors="pt",
                       padding=True)["input_ids"].to(lm.runtime.device)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    base = logits(lm.model)
    p = read_patch(lora)
    with attached(lm.model, [p], lm.fingerprint) as pm:
        att = logits(pm)
    after = logits(lm.model)
    merged_sd = merged_state_dict(lm.model, [p], lm.fingerprint)
    backup = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.model.load_state_dict(merged_sd, strict=False)
    merged = logits(lm.model)
    lm.model.load_state_dict(backup)
    out = {"detach_max_abs_diff": (after - base).abs().max().item(), "merge_vs_attach_max_abs_diff": (merged - att).abs().max().item(),
           "patch_effect_max_abs_diff": (att - base).abs().max().item()}
    if fulls:
        q = read_patch(fulls[0])
        with attached(lm.model, [p, q], lm.fingerprint) as pm:
            pq = logits(pm)
        with attached(lm.model, [q, p], lm.fingerprint) as pm:
            qp = logits(pm)
        out["stack_order_max_abs_diff"] = (pq - qp).abs().max().item()
        out["detach_after_stack_max_abs_diff"] = (logits(lm.model) - base).abs().max().item()
    return out

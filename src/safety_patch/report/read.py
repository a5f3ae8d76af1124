"""The run folder's stage outputs, read and checked: :class:`RunData`.

Every file the report reads is refused when it is not the one its stage recorded (sha256 in
``stage.json``), is not JSON, or holds figures that contradict their own counts, so the report
never prints an edited or broken figure as a verdict.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from ..atomic import sha256_file


def _check_recorded(p: Path) -> None:
    """Refuse a results file that is not the one its stage wrote: the nearest stage folder above it
    (the one holding ``stage.json``) records each file's sha256 (runs since 2026-12-04). A user's
    trial changed plug.json's detach difference by hand and the report printed the edited figure
    as the claim's verdict. Files a stage did not record, and older runs, are read as before."""
    from ..errors import SafetyPatchError

    for d in list(p.parents)[:4]:
        f = d / "stage.json"
        if not f.is_file():
            continue
        try:
            want = (json.loads(f.read_text()).get("files") or {}).get(str(p.relative_to(d)))
        except (ValueError, OSError, AttributeError):
            return  # a stage.json that is not ours to read: reproduce re-runs that stage
        digest = want.get("sha256") if isinstance(want, dict) else None
        if digest is not None and sha256_file(p) != digest:
            raise SafetyPatchError(f"{p}: changed since its stage wrote it (its sha256 differs from {f}'s record); "
                                   "the report prints only what the run measured: run `safety-patch reproduce` "
                                   "again with this run's --out and settings (it recomputes the stage whose file "
                                   "changed)")
        return


def _load(p: Path):
    """A results file's JSON, None where absent; a file that is not JSON is one SafetyPatchError line."""
    if not p.is_file():
        return None
    _check_recorded(p)
    from ..jsonl import read_text

    try:
        return json.loads(read_text(p, "results file "))  # bad UTF-8 named by line, as every reader of ours
    except ValueError as e:
        from ..errors import SafetyPatchError

        raise SafetyPatchError(f"{p}: not valid JSON ({e}); the file is cut short or damaged: run `safety-patch "
                               "reproduce` again with this run's --out and settings (it recomputes the stage "
                               "whose file changed)") from None


# The rates the report reads from each kind of results file: each is counted again from the
# file's records before it is shown (``_eval_file``).
_READ = {"safety": ("overall", "per_attack", "per_category", "answered", "refused", "harmless", "degenerate"),
         "overrefusal": ("overall", "per_set", "per_category", "answered", "refused", "harmless", "degenerate")}


_RECORD_KEYS = {"safety": ("attack", "category"), "overrefusal": ("set", "category")}


def _counts(agg) -> object:
    """A rate or a map of rates as (k, n, value, ci95), rounded to 9 digits: every figure of a rate the
    report prints, each determined by the records (an edited value or interval differs as an edited
    count does)."""
    if isinstance(agg, dict) and "k" in agg and "n" in agg:
        def r9(x):
            return round(x, 9) if isinstance(x, float) else x
        return (agg["k"], agg["n"], r9(agg.get("value")), tuple(r9(x) for x in agg.get("ci95") or ()))
    if isinstance(agg, dict):
        return {g: _counts(v) for g, v in agg.items()}
    return agg


_PLUG_KEYS = ("detach_max_abs_diff", "merge_vs_attach_max_abs_diff", "patch_effect_max_abs_diff")


def _check_plug(plug, path: Path) -> None:
    """plug.json (reproduce's plug-and-play stage): an object holding each max |logit diff| the claim
    reads, every value a finite number >= 0. Raises SafetyPatchError naming the file and field (an
    empty object or a NaN once flipped the claim's verdict with no error)."""
    import math

    from ..errors import SafetyPatchError

    if plug is None:
        return
    if not isinstance(plug, dict):
        raise SafetyPatchError(f"{path}: not a JSON object; run the plug-and-play stage again")
    for k in _PLUG_KEYS:
        if k not in plug:
            raise SafetyPatchError(f"{path}: field '{k}' is missing; run the plug-and-play stage again")
    for k, v in plug.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SafetyPatchError(f"{path}: field '{k}' must be a finite number >= 0 (a max |logit diff|), got {v!r}")


def _check_analysis(summary, rows, path: Path) -> None:
    """The analysis summary's per-arm medians, counted again from the per-module rows of weights.json
    beside it (``analysis.run.summarise``): an edited median (which once flipped the orthogonality
    claim while its sign test still read the rows) is refused. Raises SafetyPatchError naming the
    arm and figure. Without weights.json the caller leaves the summary unread (its claims are not
    evaluated, and the report's list of missing files names weights.json)."""
    import math

    from ..analysis.run import summarise
    from ..errors import SafetyPatchError

    if summary is None or rows is None:
        return
    weights = path.parent / "weights.json"
    try:
        again = summarise(rows, list(summary["ks"]))
        stored = summary["summary"]
    except (KeyError, TypeError, ValueError, statistics.StatisticsError) as e:
        raise SafetyPatchError(f"{path} or {weights} is malformed ({type(e).__name__}: {e}); run the analysis "
                               "stage again") from None
    for arm, figs in again.items():
        for k, v in figs.items():
            got = (stored.get(arm) or {}).get(k) if isinstance(stored, dict) else None
            if not isinstance(v, (int, float)):  # lists (the worst modules): equal as written
                bad = got != v
            else:
                bad = isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isclose(
                    got, v, rel_tol=1e-9, abs_tol=1e-12)
            if bad:
                raise SafetyPatchError(f"{path}: summary.{arm}.{k} is {got!r} but the modules in {weights.name} give "
                                       f"{v!r}: one of the two was edited; run the analysis stage again")


def _check_figures(obj, path: Path, where: str = "") -> None:
    """Every figure dict in a results file the report reads without records behind it (capability,
    the gate's report) must be coherent: a finite value inside its own 95% interval, a proportion's
    value k/n. Raises SafetyPatchError naming the file and field. A consistent forgery (value and
    interval edited together) is not detectable without the records: results files are not signed."""
    import math

    from ..errors import SafetyPatchError

    def slack(o: dict, ci: list) -> float:
        # Wilson and Newcombe score intervals always hold their estimate; a bootstrap percentile
        # interval of a biased statistic (an AUROC with ties at small n, in gate files before
        # 2026-12-04) may miss it a little, never by its own width
        return 1e-9 + (abs(ci[1] - ci[0]) if o.get("interval") == "bootstrap" else 0.0)

    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_figures(v, path, f"{where}[{i}]")
        return
    if not isinstance(obj, dict):
        return
    v, ci = obj.get("value"), obj.get("ci95")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(ci, list) and len(ci) == 2:
        bad = None
        if not math.isfinite(v):
            bad = f"value {v} is not finite"
        elif None not in ci and not (ci[0] - slack(obj, ci) <= v <= ci[1] + slack(obj, ci)):
            bad = f"value {v} lies outside its own interval {ci}"
        elif isinstance(obj.get("k"), int) and isinstance(obj.get("n"), int) and obj["n"] > 0 and \
                abs(v - obj["k"] / obj["n"]) > 1e-9:
            bad = f"value {v} is not k/n = {obj['k']}/{obj['n']}"
        if bad:
            raise SafetyPatchError(f"{path}: {where.lstrip('.') or 'a figure'}: {bad} (the file was edited or is "
                                   "damaged: run `safety-patch reproduce` again with this run's --out and settings, "
                                   "which recomputes the stage whose file changed)")
    for k, sub in obj.items():
        if isinstance(sub, (dict, list)):
            _check_figures(sub, path, f"{where}.{k}")


def _eval_file(path: Path, kind: str) -> dict | None:
    """A safety or over-refusal results file (None where absent), its counts checked: every rate the
    report shows is counted again from the file's own records, so an edited or truncated file, or
    one whose aggregates another program wrote, is refused instead of reported. Raises
    SafetyPatchError naming the file and the field."""
    from ..errors import SafetyPatchError
    from ..evaluation.safety import overrefusal_aggregates, safety_aggregates
    from ..judges import VERDICTS

    d = _load(path)
    if d is None:
        return None
    runs = d.get("runs") if isinstance(d, dict) else None
    if not isinstance(runs, dict) or not runs:
        raise SafetyPatchError(f"{path}: no runs (not a results file of `eval {kind}`)")
    count = safety_aggregates if kind == "safety" else overrefusal_aggregates
    for side, r in runs.items():
        recs = r.get("records") if isinstance(r, dict) else None
        if not isinstance(recs, list) or not recs:
            raise SafetyPatchError(f"{path}: runs.{side}.records is missing or empty: there is nothing behind its rates")
        for i, rec in enumerate(recs):
            label = ((rec.get("verdict") if isinstance(rec, dict) else None) or {}).get("label")
            if label not in VERDICTS:
                raise SafetyPatchError(f"{path}: runs.{side}.records[{i}].verdict.label is {label!r}, not one of "
                                       f"{', '.join(VERDICTS)}")
            missing = [k for k in _RECORD_KEYS[kind] if not isinstance(rec.get(k), str)]
            if missing:
                raise SafetyPatchError(f"{path}: runs.{side}.records[{i}] has no {', '.join(missing)}")
        want, got = count(recs), r.get("aggregates") or {}
        routing = ("routing",) if "routing" in want or "routing" in got else ()  # a gated arm's routes
        for key in _READ[kind] + routing:
            if _counts(got.get(key)) != _counts(want.get(key)):
                raise SafetyPatchError(f"{path}: runs.{side}.aggregates.{key} does not match the file's own records "
                                       f"(recounted: {_counts(want[key])}, in the file: {_counts(got.get(key))}); "
                                       f"the file was edited or cut short: run `eval {kind}` again")
    return d


def _run_info(run: Path) -> dict:
    """run.json as an object whose ``plan`` and ``timings`` are objects; anything else is one
    SafetyPatchError naming the file (a list or a number there was a traceback, or a report of
    "Model `None`" with claims marked missing whose files were present)."""
    from ..errors import SafetyPatchError

    f = run / "run.json"
    info = _load(f)
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise SafetyPatchError(f"{f}: must be a JSON object (a reproduce run's record), not {type(info).__name__}")
    for key in ("plan", "timings"):
        if key in info and not isinstance(info[key], dict):
            raise SafetyPatchError(f"{f}: {key} must be an object, not {type(info[key]).__name__}")
    if not isinstance(info.get("plan"), dict):
        raise SafetyPatchError(f"{f}: has no plan (not a reproduce run's record, or damaged): run `safety-patch "
                               "reproduce` again with this run's --out and settings")
    return info


# Arm names become folder names under the run (02-arms/<name>, 03-eval/<name>): one plain path
# component, so a run.json from elsewhere cannot make `report` read files outside the run folder.
_ARM_NAME = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]*")


def _arm_names(run: Path, arms) -> list[dict]:
    """The plan's arms, each with a name that is a plain folder name; raises SafetyPatchError otherwise."""
    from ..errors import SafetyPatchError

    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise SafetyPatchError(f"{run / 'run.json'}: plan.arms must be a list of objects")
    for i, a in enumerate(arms):
        name = a.get("name")
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
            raise SafetyPatchError(f"{run / 'run.json'}: arm name {name!r} is not a plain folder name "
                                   "(letters, digits, . _ @ + -; no '/' or leading '.')")
        for key, kind in (("role", str), ("train", dict)):  # the fields the report reads of every arm
            if not isinstance(a.get(key), kind):
                raise SafetyPatchError(f"{run / 'run.json'}: plan.arms[{i}] ({name}) has no {key} "
                                       f"({'a string' if kind is str else 'an object'}); the file was edited or "
                                       "another program wrote it: run `reproduce` again")
    return arms


def _check_capability(c: dict, path: Path) -> None:
    """A capability results file holds every figure its own ``config.tasks`` names (the report shows a
    missing one as "-", which must mean "not asked for", never "lost"). SafetyPatchError naming the field."""
    from ..errors import SafetyPatchError

    runs = c.get("runs") if isinstance(c, dict) else None
    tasks = (c.get("config") or {}).get("tasks") if isinstance(c, dict) else None
    if not isinstance(runs, dict) or not isinstance(tasks, list):
        raise SafetyPatchError(f"{path}: no runs or config.tasks (not a results file of `eval capability`)")
    want = []  # the figures the report reads (humaneval, mc and compliance are absent when they had no items)
    if "kl" in tasks:
        want.append(("patched", "kl"))
    if "nll" in tasks:
        want += [("base", "nll"), ("patched", "nll"), ("delta", "nll"), ("delta", "nll_ratio")]
    for side, key in want:
        if side in runs or side == "base":
            if not isinstance(runs.get(side), dict) or key not in runs[side]:
                raise SafetyPatchError(f"{path}: runs.{side}.{key} is missing though config.tasks has it; the file was "
                                       "edited or cut short: run the evaluation again")


def _check_measured_arm(d: dict | None, path: Path, want: list[str]) -> None:
    """An arm's results file was measured on exactly that arm's patch (``want``: its patch id; [] for the
    base): ``provenance.patches`` of another stack would report one patch's numbers under another's name."""
    from ..errors import SafetyPatchError

    if d is None:
        return
    got = [p.get("id") for p in ((d.get("provenance") or {}).get("patches") or []) if isinstance(p, dict)]
    if got != want:
        raise SafetyPatchError(f"{path}: measured on patches {got or 'none'}, but this arm is "
                               f"{want or 'the base (no patch)'}; the file belongs to another arm or stack: run the "
                               "evaluation stage again")


class RunData:
    def __init__(self, run: Path):
        self.run = run
        self.info = _run_info(run)
        self.arms = _arm_names(run, self.info.get("plan", {}).get("arms", []))
        self.models = ["base"] + [a["name"] for a in self.arms]
        self.eval = {m: {k: _eval_file(run / "03-eval" / m / f"{k}.json", k) if k in _READ
                         else _load(run / "03-eval" / m / f"{k}.json") for k in ("safety", "overrefusal", "capability")}
                     for m in self.models}
        for m in self.models:  # no records behind these: their figures are checked for coherence
            if self.eval[m]["capability"] is not None:
                _check_capability(self.eval[m]["capability"], run / "03-eval" / m / "capability.json")
                _check_figures(self.eval[m]["capability"], run / "03-eval" / m / "capability.json")
        self.patch = {a["name"]: _load(run / "02-arms" / a["name"] / "patch" / "patch.json") for a in self.arms}
        for m in self.models:  # each arm's numbers were measured on that arm's patch
            pj = self.patch.get(m) if m != "base" else None
            if m != "base" and not isinstance((pj or {}).get("id"), str):
                continue  # no patch written: `missing` lists it
            for k in ("safety", "overrefusal", "capability"):
                _check_measured_arm(self.eval[m][k], run / "03-eval" / m / f"{k}.json", [pj["id"]] if pj else [])
        self.weights = _load(run / "05-analysis" / "out" / "weights.json")  # per-module rows (the sign test's)
        # a summary is read only with the per-module rows that check it
        self.analysis = _load(run / "05-analysis" / "out" / "summary.json") if self.weights is not None else None
        _check_analysis(self.analysis, self.weights, run / "05-analysis" / "out" / "summary.json")
        self.activ = _load(run / "05-analysis" / "out" / "activations.json")
        self.plug = _load(run / "04-plug" / "plug.json")
        _check_plug(self.plug, run / "04-plug" / "plug.json")
        self.gate_eval = _load(run / "02-gate" / "eval.json")
        if self.gate_eval is not None:
            _check_figures(self.gate_eval, run / "02-gate" / "eval.json")
        from ..data.folder import MANIFEST, DataFolder

        # the data stage's manifest, checked like every reader's (one line naming the field if malformed)
        self.manifest = DataFolder(run / "01-data").manifest if (run / "01-data" / MANIFEST).is_file() else None

    def stage_seconds(self) -> float:
        """Seconds the run's stages took when they ran, whichever invocation ran them: run.json's
        ``timings``, which ``reproduce`` keeps across resumes."""
        return float(sum(v for v in (self.info.get("timings") or {}).values() if isinstance(v, (int, float))))

    def missing(self) -> list[str]:
        """The files a complete run of this plan holds that this folder lacks (paths inside the run)."""
        want = ["01-data/manifest.json", "04-plug/plug.json", "05-analysis/out/summary.json",
                "05-analysis/out/weights.json", "05-analysis/out/activations.json"]
        if self.info.get("plan", {}).get("gate") is not None:
            want.append("02-gate/eval.json")
        want += [f"03-eval/{m}/{k}.json" for m in self.models for k in ("safety", "overrefusal", "capability")
                 if not (m == "base" and k == "capability")]  # the base's capability is in each arm's file
        want += [f"02-arms/{a['name']}/patch/patch.json" for a in self.arms]
        return [w for w in want if not (self.run / w).is_file()]

    def run_of(self, model: str, kind: str) -> dict | None:
        r = self.eval[model][kind]
        if not r:
            return None
        return r["runs"]["base" if model == "base" else "patched"]

    def judge(self) -> str:
        """The judge the safety evaluations used (their saved config), for the report's wording."""
        names = {(self.eval[m]["safety"] or {}).get("config", {}).get("judge") for m in self.models} - {None}
        return ", ".join(sorted(names)) or "unknown"

    def asr(self, model: str):
        r = self.run_of(model, "safety")
        return r["aggregates"]["overall"] if r else None

    def borderline(self, model: str):
        r = self.run_of(model, "overrefusal")
        return r["aggregates"]["per_set"].get("borderline") if r else None

    def general_refusal(self, model: str):
        r = self.run_of(model, "overrefusal")
        return r["aggregates"]["per_set"].get("general") if r else None

    def cap(self, model: str, key: str):
        c = self.eval[model]["capability"]
        return c["runs"]["patched"].get(key) if c and "patched" in c["runs"] else None

    def nll_ratio(self, model: str):
        c = self.eval[model]["capability"]
        return c["runs"]["delta"].get("nll_ratio") if c and "delta" in c["runs"] else None

    def by_role(self, role: str) -> list[str]:
        return [a["name"] for a in self.arms if a["role"] == role]

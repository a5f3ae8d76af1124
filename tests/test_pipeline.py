"""End to end: `reproduce` on a tiny random model produces the exact run tree and the report."""

import hashlib
import json
import re
import time

import pytest

from safety_patch.pipeline import make_plan, reproduce


def _rewrite_recorded(f, text: str) -> None:
    """Write ``f`` and its stage's sha256 record with it (stage.json in the nearest folder above), as
    an older run without records, or an edit of both, would look to the report."""
    f.write_text(text)
    for d in f.parents:
        if (d / "stage.json").is_file():
            rec = json.loads((d / "stage.json").read_text())
            rec["files"][str(f.relative_to(d))] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            (d / "stage.json").write_text(json.dumps(rec))
            return


def tiny_plan(model: str):
    plan = make_plan(model, quick=True)
    plan.data = {"max_per_source": 24, "general_limit": 24, "distill_max_new_tokens": 4, "template_max_chars": 300,
                 "self_instruct": 0}
    for a in plan.arms:
        if "from" not in a.train:  # gated twins train nothing
            a.train.update({"data.max_train_rows": 8, "optim.batch_size": 4, "data.max_seq_len": 1024})
    plan.gate = {"self_instruct": 0, "wrapped_benign": 6, "wrapped_harmful": 4}
    plan.gate_attacks = ("past_tense", "prefill")
    plan.gate_source_shots = (2,)  # quick mode has none; the full report's learning curve, on the tiny run
    plan.eval_limit, plan.max_new_tokens, plan.capability_limit, plan.analysis_prompts = 4, 4, 6, 2
    plan.analysis_ks = (4, 8)
    return plan


def test_reproduce_tiny_run_tree_and_report(tiny_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    t0 = time.time()
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    first = time.time() - t0
    # each trained arm shows its steps (in a log: lines), not minutes of silence
    assert capsys.readouterr().err.count("[train] steps") >= 3
    arms = ["lora-safety", "full-safety", "full-mix-1", "lora-safety+gate"]  # quick: one mixing ratio
    tree = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "01-data" not in p.parts
                  and "patch" not in p.parts and "out" not in p.parts)
    expected = sorted(
        ["run.json", "settings.json", "report.md", "report.html", "tradeoff.png", "05-analysis/stage.json",
         "02-gate/stage.json", "02-gate/eval.json", "02-gate/gate/gate.json", "02-gate/gate/gate.safetensors",
         "04-plug/plug.json", "04-plug/stage.json"]
        + [f"02-arms/{a}/stage.json" for a in arms]
        + [f"03-eval/{m}/{f}" for m in ["base"] + arms for f in ("safety.json", "overrefusal.json", "stage.json")]
        + [f"03-eval/{a}/capability.json" for a in arms]
    )
    assert tree == expected
    assert {p.name for p in (run / "01-data").iterdir()} >= {"train.jsonl", "test.jsonl", "manifest.json", "stage.json"}
    for a in arms:
        assert (run / "02-arms" / a / "patch" / "patch.json").is_file()
    assert (run / "05-analysis" / "out" / "weights.csv").is_file()
    md = (run / "report.md").read_text()
    for section in ("## Claims", "## Trade-off", "## Attack success per attack", "## Attack success per category",
                    "## Over-refusal", "## Capability", "## Cost", "## Orthogonality and magnitude", "## Hidden-state shifts",
                    "## Plug-and-play", "## Stage timings", "## Gate reliability", "## Gate routing"):
        assert section in md, section
    # the gated arm's routes are in its records, and the report's routing row is counted from them
    recs = json.loads((run / "03-eval/lora-safety+gate/safety.json").read_text())["runs"]["patched"]["records"]
    k = sum(bool(r["route"]["on"]) for r in recs)
    routing_rows = [r for r in md.split("## Gate routing")[1].split("##")[0].splitlines() if r.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in routing_rows[1:]] == ["lora-safety+gate"]
    assert f"({k}/{len(recs)})" in routing_rows[1]
    assert all("route" not in r for r in json.loads((run / "03-eval/lora-safety/safety.json").read_text())
               ["runs"]["patched"]["records"])
    for claim in ("strong safety", "better than full-parameter", "data-mixing baselines", "more orthogonal",
                  "larger weight updates", "plug-and-play"):
        assert claim in md, claim
    assert "**Quick sizes.**" in md  # the report says its numbers come from quick sizes
    # quick mode runs no HumanEval: a sentence, not a column of dashes; the data line says how many behaviours are used
    assert "HumanEval was not run: this plan's capability tasks are nll, kl, compliance (quick mode)." in md
    assert "HumanEval pass@1" not in md and "held-out test behaviours (the evaluations use 4 of them)" in md
    # each table names what it measures: the two "answered" figures' judges, the gated arm's training row,
    # the claims' "not answered" (refused or degenerate), the mixing arm's doubled steps
    assert "judged by the `keyword` judge" in md and "uses the `refusal` judge" in md
    assert "lora-safety+gate: the row repeats the training of the patch put behind the gate" in md
    assert "borderline not answered base" in md and "borderline refusal" not in md
    assert "24 for a data-mixing arm" in md
    assert "for LoRA)" not in md and ("KL interval" in md or "KL intervals overlap" in md)
    # every markdown table row has as many cells as its header (a "||" in a header is escaped, not a column)
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            cols = line.count("|") - 1
            for row in [lines[i - 1]] + [r for r in lines[i + 1:] if r.startswith("| ")][:1]:
                assert row.replace("\\|", "").count("|") - 1 == cols, row
    assert "KL(base\\|\\|patched)" in md
    # attack success shows the count behind each rate; the stages are listed in the order they ran, then the whole run
    run_info = json.loads((run / "run.json").read_text())
    per_attack = md.split("## Attack success per attack")[1].split("##")[0]
    assert re.search(r"\] \(\d+/\d+\) \|", per_attack)
    assert re.search(r"\] \(\d+/\d+\) \|", md.split("## Over-refusal")[1].split("##")[0])  # and each refusal rate
    timing_rows = [r.split(" | ")[0][2:] for r in md.split("## Stage timings")[1].splitlines() if r.startswith("| ")][1:]
    assert timing_rows == list(run_info["timings"]) + ["this invocation (the stages it ran + loading and bookkeeping)"]
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    plug = json.loads((run / "04-plug" / "plug.json").read_text())
    assert plug["detach_max_abs_diff"] == 0.0 and plug["merge_vs_attach_max_abs_diff"] < 1e-3
    # a report over a run missing a stage's files lists the claims it cannot evaluate; it never drops them
    import shutil

    from safety_patch.report import write_report

    part = tmp_path / "partial"
    shutil.copytree(run, part)
    shutil.rmtree(part / "05-analysis")
    (part / "03-eval" / "base" / "safety.json").unlink()
    write_report(part)
    rows = [r for r in (part / "report.md").read_text().split("## Claims")[1].split("##")[0].splitlines()
            if r.startswith("| ") and not r.startswith("| claim")]
    assert len(rows) == 6 and [r.split(" | ")[1] for r in rows].count("NOT EVALUATED") == 3

    # the report counts every rate it shows again from the file's records: an edited file is refused
    from safety_patch.errors import SafetyPatchError

    arm = arms[0]
    for kind, edit, says in [
        ("safety", lambda d: d["runs"]["patched"]["records"][0]["verdict"].update(
            label="compliance" if d["runs"]["patched"]["records"][0]["verdict"]["label"] != "compliance" else "refusal"),
         "aggregates.overall does not match the file's own records"),
        ("overrefusal", lambda d: d["runs"]["base"]["records"].pop(), "aggregates.overall does not match"),
        ("safety", lambda d: d["runs"]["base"]["records"][1]["verdict"].update(label="refused"),
         "records[1].verdict.label is 'refused', not one of"),
        ("overrefusal", lambda d: d["runs"]["patched"].update(records=[]), "records is missing or empty"),
        # the printed value or interval edited alone (a verdict once flipped to SUPPORTED this way)
        ("safety", lambda d: d["runs"]["patched"]["aggregates"]["overall"].update(value=0.15),
         "aggregates.overall does not match"),
        ("safety", lambda d: d["runs"]["patched"]["aggregates"]["overall"].update(ci95=[0.01, 0.095]),
         "aggregates.overall does not match"),
        # files without records behind them: each figure coherent (inside its interval, k/n)
        ("capability", lambda d: d["runs"]["patched"]["kl"].update(value=0.5, ci95=[0.0, 0.1]), "lies outside its own interval"),
        # a figure its own config asked for, gone (once shown as "-" beside the other figures)
        ("capability", lambda d: d["runs"]["patched"].pop("nll"), "runs.patched.nll is missing though config.tasks has it"),
        # another arm's (or another stack's) numbers under this arm's name
        ("capability", lambda d: d["provenance"]["patches"].append(dict(d["provenance"]["patches"][0], id="f" * 16)),
         "measured on patches"),
        ("safety", lambda d: d["provenance"].update(patches=[]), "measured on patches none, but this arm is"),
    ]:
        bad = tmp_path / "edited"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(run, bad)
        f = bad / ("02-gate/eval.json" if kind == "gate" else f"03-eval/{arm}/{kind}.json")
        d = json.loads(f.read_text())
        edit(d)
        _rewrite_recorded(f, json.dumps(d))  # its stage's record updated too: the report's own checks
        with pytest.raises(SafetyPatchError, match=re.escape(str(f)) + ".*" + re.escape(says)) as err:
            write_report(bad)
        assert not (bad / "report.md").exists()  # the earlier report is gone: nothing stale looks current
        # ... and the error says so (a user's trial found the report gone with no word of why)
        assert str(err.value).endswith("; the earlier report.md, report.html, tradeoff.png were removed, so that no "
                                       "stale report looks current")
        with pytest.raises(SafetyPatchError) as again:  # nothing left to remove: nothing said
            write_report(bad)
        assert "removed" not in str(again.value)
    # a gated arm's routing is counted again too: a record's route edited alone is refused
    bad = tmp_path / "edited"
    shutil.rmtree(bad)
    shutil.copytree(run, bad)
    f = bad / "03-eval" / "lora-safety+gate" / "safety.json"
    d = json.loads(f.read_text())
    r0 = d["runs"]["patched"]["records"][0]["route"]
    r0["on"] = [] if r0["on"] else list(r0["logits"])
    _rewrite_recorded(f, json.dumps(d))
    with pytest.raises(SafetyPatchError, match=re.escape(str(f)) + ".*aggregates.routing does not match"):
        write_report(bad)
    # the plug-and-play figures and the analysis medians (found by a user's trial: a NaN, an empty object, or
    # a median edited in summary.json flipped a claim with no error)
    for rel, edit, says in [
        ("04-plug/plug.json", lambda d: d.update(detach_max_abs_diff=float("nan")),
         "field 'detach_max_abs_diff' must be a finite number >= 0"),
        ("04-plug/plug.json", lambda d: d.clear(), "field 'detach_max_abs_diff' is missing"),
        ("04-plug/plug.json", lambda d: d.update(merge_vs_attach_max_abs_diff="0"), "must be a finite number"),
        ("05-analysis/out/summary.json", lambda d: d["summary"][arm].update({"median_in_overlap@4": 0.5}),
         f"summary.{arm}.median_in_overlap@4 is 0.5 but the modules in weights.json give"),
    ]:
        shutil.rmtree(bad)
        shutil.copytree(run, bad)
        f = bad / rel
        d = json.loads(f.read_text())
        edit(d)
        _rewrite_recorded(f, json.dumps(d))  # json writes nan as NaN, which Python's reader takes back
        with pytest.raises(SafetyPatchError, match=re.escape(str(f)) + ".*" + re.escape(says)):
            write_report(bad)
        # edited without its stage's record: refused for that, before any figure is read (a user's
        # trial: plug.json's detach difference edited by hand was printed as the claim's verdict)
        shutil.rmtree(bad)
        shutil.copytree(run, bad)
        f.write_text(json.dumps(d))
        with pytest.raises(SafetyPatchError, match=re.escape(str(f)) + ": changed since its stage wrote it"):
            write_report(bad)
    # an analysis file gone is named at the top, and its claims are not evaluated (never read from the rest)
    for gone in ("weights.json", "activations.json"):
        shutil.rmtree(bad)
        shutil.copytree(run, bad)
        (bad / "05-analysis" / "out" / gone).unlink()
        write_report(bad)
        md = (bad / "report.md").read_text()
        assert "**Missing from this run**" in md and f"`05-analysis/out/{gone}`" in md, gone
    shutil.rmtree(bad)
    shutil.copytree(run, bad)
    # run.json's arm without a field the report reads: named (file, arm, field), and no figure left behind
    info = json.loads((bad / "run.json").read_text())
    del info["plan"]["arms"][0]["role"]
    (bad / "run.json").write_text(json.dumps(info))
    with pytest.raises(SafetyPatchError, match=re.escape(str(bad / "run.json")) + r": plan\.arms\[0\] \(.*\) has no role"):
        write_report(bad)
    assert not (bad / "tradeoff.png").exists() and not (bad / "report.md").exists()
    shutil.rmtree(bad)
    shutil.copytree(run, bad)
    # a cut-short file is one line; a missing arm's files are listed at the top of the report
    _rewrite_recorded(bad / "03-eval" / arm / "safety.json", '{"runs": {"base"')
    with pytest.raises(SafetyPatchError, match=r"safety\.json: not valid JSON .*cut short or damaged"):
        write_report(bad)
    shutil.rmtree(bad / "03-eval" / arm)
    write_report(bad)
    md = (bad / "report.md").read_text()
    assert "**Missing from this run**" in md and f"`03-eval/{arm}/safety.json`" in md

    # a second run is incremental: every stage is served from its content hash
    t0 = time.time()
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    assert time.time() - t0 < first / 2
    # ...but a stage whose output was deleted runs again (it was served "cached", its file gone for good)
    cap = run / "03-eval" / arms[0] / "capability.json"
    cap.unlink()
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    assert cap.is_file() and "Missing from this run" not in (run / "report.md").read_text()
    # ...and so does one whose output changed without changing size (found by a user's trial: the
    # stage was served "cached" and the report then refused the damaged file on every re-run)
    plug = run / "04-plug" / "plug.json"
    good = plug.read_bytes()
    plug.write_bytes(b" " * len(good))
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    assert plug.read_bytes() == good  # recomputed: the checks are deterministic
    recorded = json.loads((run / "04-plug" / "stage.json").read_text())["files"]["plug.json"]
    assert recorded == {"size": len(good), "sha256": hashlib.sha256(good).hexdigest()}
    # an invocation cut short writes no run.json: the next one still lists the stages it computed
    (run / "run.json").unlink()
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    stages = {str(f.parent.relative_to(run)) for f in run.rglob("stage.json")}
    assert set(json.loads((run / "run.json").read_text())["timings"]) == stages and len(stages) >= 10
    (run / "run.json").write_text("[]")  # a damaged record of the last run is replaced, its stages' times kept
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    assert set(json.loads((run / "run.json").read_text())["timings"]) == stages
    # a run made in quick mode is not resumed at default sizes (a forgotten --quick deleted its data)
    with pytest.raises(SafetyPatchError, match=r"holds a run made with other settings \(mode 'quick' -> 'default'\)"):
        reproduce(run, make_plan(str(tiny_dir)), device="cpu")
    assert (run / "01-data" / "manifest.json").is_file()

    # run.json and every patch carry the code identity
    info = json.loads((run / "run.json").read_text())
    assert len(info["code"]["source_sha256"]) == 64 and info["versions"]["torch"]
    code = info["code"]["source_sha256"]
    assert json.loads((run / "01-data" / "manifest.json").read_text())["code"]["source_sha256"] == code
    for a in arms:
        assert json.loads((run / "02-arms" / a / "patch" / "patch.json").read_text())["code"]["source_sha256"] == code
        assert json.loads((run / "03-eval" / a / "safety.json").read_text())["provenance"]["code"]["source_sha256"] == code
    keys = {p: json.loads(p.read_text())["key"] for p in run.rglob("stage.json")}
    assert len(keys) == 1 + 1 + len(arms) + (1 + len(arms)) + 2

    # the gated arm is its source adapter behind the run's gate; the gate's report covers the test split
    gated = json.loads((run / "02-arms" / "lora-safety+gate" / "patch" / "patch.json").read_text())
    assert gated["gate"]["id"] == json.loads((run / "02-gate" / "gate" / "gate.json").read_text())["id"]
    rep = json.loads((run / "02-gate" / "eval.json").read_text())
    assert rep["data"]["split"] == "test" and sorted(rep["attacks"]) == ["past_tense", "prefill"]
    assert len(rep["leave_one_source_out"]["sources"]) >= 2
    lofo = rep["leave_one_family_out"]["wrapped_vs_wrapped_benign"]["auroc"]
    assert lofo["n_neg"] == 6 and lofo["n_pos"] >= 4  # the plan's wrapped benign prompts, each out of family
    assert "leave one harmful source out" in md.lower() and "prefill" in md
    assert "| direct at 5% look-alike FPR |" in md and all(
        "ci95_with_threshold" in r["direct_at_lookalike_fpr_0.05"] for r in rep["leave_one_source_out"]["sources"].values())
    # each fold's learning curve, in the JSON and as the report's table
    curves = {s: r["with_shots"] for s, r in rep["leave_one_source_out"]["sources"].items()}
    assert all([p["shots"] for p in w["curve"]] == [0, 2] for w in curves.values())
    assert "| held-out source | pool requests | measured on | k=0 | k=2 | bootstrap at the largest k |" in md
    for s, w in curves.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {s}") and f"| {w['pool_requests']} |" in line)
        assert f"{100 * w['curve'][1]['direct_at_lookalike_fpr_0.05']['value']:.1f}%" in row
    # beside the folds, the gate itself on the split's requests at the same look-alike bar
    inside = rep["direct_vs_lookalikes"]["tpr_at_fpr_0.05"]
    assert f"| none (the gate itself, on the split's requests) | {100 * rep['fired']['harmful_direct']['value']:.1f}%" in md
    assert f"{100 * inside['value']:.1f}% [" in md.split("| none (the gate itself")[1].split("\n")[0]
    assert "leave one template family out" in md.lower()

    # after a code change (another source hash), re-running into the same folder re-runs every stage
    import safety_patch.provenance as prov

    monkeypatch.setattr(prov, "code_key", lambda: "0" * 16)
    reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")
    changed = {p: json.loads(p.read_text())["key"] for p in run.rglob("stage.json")}
    assert changed.keys() == keys.keys()
    assert all(changed[p] != keys[p] for p in keys), [str(p) for p in keys if changed[p] == keys[p]]


def test_quick_arms_train_long_enough_to_move_and_default_arms_keep_the_recipes():
    """Quick mode raises the arms' epochs and learning rates (pipeline.QUICK_LORA / QUICK_FULL);
    the default plan trains the recipes as written, and the gated twin trains nothing."""
    from safety_patch.pipeline import QUICK_FULL, QUICK_LORA
    from safety_patch.train.api import resolve_config

    quick = {a.name: a.train for a in make_plan(quick=True).arms}
    default = {a.name: a.train for a in make_plan().arms}
    assert quick["lora-safety"].items() >= QUICK_LORA.items() and quick["full-mix-1"].items() >= QUICK_FULL.items()
    assert [a for a in quick if a.startswith("full-mix")] == ["full-mix-1"]  # one mixing ratio in quick mode
    assert [a for a in default if a.startswith("full-mix")] == ["full-mix-1", "full-mix-2"]
    assert default["full-mix-2"]["data.general_ratio"] == 2.0
    assert quick["lora-safety+gate"] == {"from": "lora-safety"}
    # the gate report's learning curve: on the default and full plans' sources, not quick mode's small ones
    assert make_plan(quick=True).gate_source_shots == () and make_plan().gate_source_shots == (25, 50, 100)
    assert not any(k in t for t in default.values() for k in ("optim.epochs", "optim.lr"))
    for lr, recipe in ((QUICK_LORA["optim.lr"], "paper"), (QUICK_FULL["optim.lr"], "full-safety")):
        assert abs(lr / resolve_config(recipe).resolved_lr() - 5) < 1e-9  # "5x the recipe's rate", as the report says



def test_the_mixing_claims_evidence_says_where_loras_kl_interval_lies():
    """compare() says 'better' when LoRA's KL interval (lower is better) lies below the arm's: the
    evidence spells that out instead of '(better for LoRA)', which read either way."""
    from safety_patch.report.numbers import compare, kl_side

    lo, hi, mid = {"ci95": [0.1, 0.2]}, {"ci95": [0.3, 0.4]}, {"ci95": [0.15, 0.35]}
    assert kl_side(compare(lo, hi)) == "LoRA's KL interval lies below this arm's"
    assert kl_side(compare(hi, lo)) == "LoRA's KL interval lies above this arm's"
    assert kl_side(compare(lo, mid)) == "the KL intervals overlap, or one is missing"
    assert kl_side(compare(lo, {"ci95": [None, None]})) == "the KL intervals overlap, or one is missing"


def test_a_small_mean_keeps_its_interval_visible():
    """Found by a user's trial: the gated arm's KL 3.3e-05 [2.4e-05, 4.2e-05] printed as 0.0000 [0.0000, 0.0000]."""
    from safety_patch.report.numbers import num

    assert num({"value": 3.3e-05, "ci95": [2.4e-05, 4.2e-05]}) == "3.3e-05 [2.4e-05, 4.2e-05]"
    assert num({"value": 0.2184, "ci95": [0.1855, 0.249]}) == "0.2184 [0.1855, 0.2490]"


def test_a_stage_is_done_only_while_its_files_are_as_it_wrote_them(tmp_path):
    """``Stages.done``: size and sha256 per file (a same-size edit re-runs the stage); a stage.json
    written before hashes were recorded (sizes only) is still read as before."""
    from safety_patch.pipeline import Stages

    st = Stages(tmp_path)
    d = tmp_path / "s"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text('{"x": 1}')
    (d / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    st.mark(d, "k1", 1.0)
    assert st.done(d, "k1") and not st.done(d, "k2")
    (d / "a.json").write_text('{"x": 2}')  # same size, other bytes
    assert not st.done(d, "k1")
    (d / "a.json").write_text('{"x": 1}')
    assert st.done(d, "k1")
    legacy = json.loads((d / "stage.json").read_text())
    legacy["files"] = {k: v["size"] for k, v in legacy["files"].items()}
    (d / "stage.json").write_text(json.dumps(legacy))
    assert st.done(d, "k1")
    (d / "sub" / "b.bin").write_bytes(b"\x00" * 9)
    assert not st.done(d, "k1")


def test_a_run_is_bound_to_its_model_weights_not_the_path(tiny_dir, tmp_path, monkeypatch):
    """A user's trial: `reproduce --model merged` stopped after its data stage, the folder's weights
    replaced by another model's, and the next invocation served the old model's data "cached" to
    the new one (stage keys and settings held the --model string); the same folder spelled
    ./merged was refused as "other settings". The fingerprint binds the run now."""
    import shutil

    from safety_patch.errors import SafetyPatchError
    from safety_patch.models import load_model, model_fingerprint
    from safety_patch.pipeline import _check_same_plan
    from safety_patch.testing import save_tiny_model

    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    fp = load_model(str(model), device="cpu").fingerprint
    assert model_fingerprint(str(model), "cpu") == fp  # read back from the load's cache
    run = tmp_path / "run"
    (run / "01-data").mkdir(parents=True)
    settings = {"plan": {"mode": "quick", "model": str(model), "seeds": 1},
                "runtime": {"device": "cpu", "dtype": "float32"}, "model_fingerprint": fp}
    (run / "settings.json").write_text(json.dumps(settings))
    # the same weights by another spelling of the path: bound to the same run
    monkeypatch.chdir(tmp_path)
    assert model_fingerprint("./m", "cpu") == fp
    _check_same_plan(run, settings | {"plan": settings["plan"] | {"model": "./m"}})
    # other weights in the same folder: refused before any stage runs, naming both fingerprints
    shutil.rmtree(model)
    save_tiny_model(model, seed=7)
    other = model_fingerprint(str(model), "cpu")
    assert other != fp
    with pytest.raises(SafetyPatchError, match=rf"model weights {fp[:12]} -> {other[:12]} .*other weights") as e:
        reproduce(run, tiny_plan(str(model)), device="cpu")
    # the advice names the weights to bring back, not the path that now holds others
    assert f"--model <a folder holding the weights {fp[:12]}>" in str(e.value)
    assert json.loads((run / "settings.json").read_text())["model_fingerprint"] == fp  # untouched
    # a run recorded before fingerprints were bound keeps the --model string check
    (run / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "model_fingerprint"}))
    with pytest.raises(SafetyPatchError, match=r"other settings \(model "):
        _check_same_plan(run, settings | {"plan": settings["plan"] | {"model": "./m"}})


def test_an_interrupted_first_run_is_bound_to_its_settings_too(tiny_dir, tmp_path):
    """Found by a user's trial: run.json is written when a run ends, so an interrupted first run
    resumed without --quick deleted its 01-data and rebuilt at default sizes; and --dtype was
    bound to nothing (a stage re-run in bf16 sat beside fp32 ones in one report). settings.json,
    written before the first stage, binds mode, model, seeds, device type and dtype."""
    import shutil

    import pytest

    from safety_patch.errors import SafetyPatchError

    run = tmp_path / "run"
    (run / "01-data").mkdir(parents=True)
    (run / "01-data" / "train.jsonl").write_text("{}\n")  # what an interrupted data stage leaves
    (run / "settings.json").write_text(json.dumps({"plan": {"mode": "quick", "model": str(tiny_dir), "seeds": 1},
                                                   "runtime": {"device": "cpu", "dtype": "float32"}}))
    with pytest.raises(SafetyPatchError, match=r"other settings \(mode 'quick' -> 'default'\)"):
        reproduce(run, make_plan(str(tiny_dir)), device="cpu")
    with pytest.raises(SafetyPatchError, match=r"dtype 'float32' -> 'bfloat16'.*--device cpu --dtype float32"):
        reproduce(run, tiny_plan(str(tiny_dir)), device="cpu", dtype="bfloat16")
    assert (run / "01-data" / "train.jsonl").read_text() == "{}\n"  # nothing deleted
    # a run that stopped before any stage made a folder (a bad --model, say) binds nothing yet
    shutil.rmtree(run / "01-data")
    with pytest.raises(SafetyPatchError, match="model path not found"):
        reproduce(run, make_plan(str(tmp_path / "no-such-model")), device="cpu")
    assert not (run / "01-data").exists()
    (run / "01-data").mkdir()
    (run / "settings.json").write_text("[]")
    with pytest.raises(SafetyPatchError, match=r"settings\.json: not valid JSON or not a run's record"):
        reproduce(run, tiny_plan(str(tiny_dir)), device="cpu")


def test_a_gate_that_never_fires_stops_reproduce_with_advice_it_can_follow(tiny_dir, tmp_path, capsys):
    """Found by a user's trial: `reproduce --quick --model ./tinyA` stopped at the gate with "set the
    threshold from a false-positive rate (--target-fpr) or lower --threshold", flags reproduce does
    not take; and `report` on the stopped run said it was no run folder."""
    from safety_patch.cli import main
    from safety_patch.errors import SafetyPatchError

    run = tmp_path / "run"
    plan = tiny_plan(str(tiny_dir))
    plan.gate |= {"threshold": 1e6, "target_fpr": None, "family_fpr": None}  # above every logit
    with pytest.raises(SafetyPatchError) as e:
        reproduce(run, plan, device="cpu")
    said = str(e.value)
    assert "the gate fires on none of its" in said and "reproduce fits the gate with the plan's fixed settings" in said
    cmd = (f"safety-patch gate fit --data {run / '01-data'} --out GATE --model {tiny_dir} --wrapped-benign 6 "
           "--wrapped-harmful 4 --self-instruct 0 --target-fpr 0.05")
    assert cmd in said
    assert main(["report", str(run)]) == 2
    assert f"the run in {run} has not finished" in capsys.readouterr().err
    # the command it suggests runs on that folder (it once lacked the plan's --self-instruct 0 and
    # stopped at once for a selfinstruct.jsonl the quick folder does not have)
    code = main(cmd.replace("GATE", str(tmp_path / "g")).split()[1:])
    err = capsys.readouterr().err
    assert code == 0 or "fires on none" in err, err

"""Multi-layer gates (issue 23): a probe on several layers' last-token states, its file, routing,
fit (extra_layers, extra_weight), the out-of-family threshold raise (family_fpr), export's refusal
and the adaptive GCG objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safety_patch.errors import SafetyPatchError
from safety_patch.gate.config import GateFitConfig, _norm_of
from safety_patch.gate.fit import fit_gate_probe
from safety_patch.gate.folder import GATE_JSON
from safety_patch.gate.probe import GATE_FILE, Gate, fit_probe, layer_states
from safety_patch.generation import GenerationConfig, generate
from safety_patch.patches import attached, finalize_patch, read_patch
from safety_patch.testing import make_lora_patch, tiny_llama
from test_gate import HARM, SAFE, _ids
from test_gate_stage import CFG, data_dir, lm  # noqa: F401  (module fixtures)


def _two_layer_gate(model, tok, threshold=0.0, features="final-norm", extra_weight=1.0):
    st = layer_states(model, tok, _ids(tok, HARM + SAFE), [1, 0])
    x = torch.cat([st[1], st[0]], 1)
    y = torch.tensor([1.0] * len(HARM) + [0.0] * len(SAFE))
    cfg = GateFitConfig(layer=1, extra_layers=[0], extra_weight=extra_weight, threshold=threshold, target_fpr=None,
                        features=features)
    return fit_gate_probe(x, y, (1, 0), cfg, _norm_of(model, cfg))


def _gated(model, tok, path, gate):
    make_lora_patch(model, path, "fp", seed=1, scale=0.5)
    gate.save(path)
    finalize_patch(path, "lora", {"name": "test", "fingerprint": "fp"}, method="lora",
                   gate={"layer": gate.layer, "extra_layers": list(gate.extra_layers), "threshold": gate.threshold})
    return read_patch(path)


def test_a_two_layer_gate_scores_both_layers_and_routes_generation_per_prompt(tmp_path):
    model, tok = tiny_llama()
    gate = _two_layer_gate(model, tok)
    assert gate.layers == (1, 0) and len(gate.weight) == 2 * model.config.hidden_size and not gate.exportable
    ids = _ids(tok, HARM + SAFE)
    st = layer_states(model, tok, ids, [0, 1])
    norm = model.model.norm

    def fn(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.detach()

    want = (torch.cat([fn(st[1]), fn(st[0])], 1) / gate.std) @ gate.weight  # the documented formula, by hand
    p = _gated(model, tok, tmp_path / "g", gate)
    with attached(model, [p]) as m:
        (got,) = m.gate_scores(tok, ids).values()
    assert torch.allclose(got, want, atol=1e-5)
    # the later layer counts: the same gate without its layer-0 weights scores otherwise
    one = Gate(1, 0.0, gate.weight.clone(), 0.0, gate.mean, gate.std, gate.norm_weight, gate.norm_eps, (0,))
    one.weight[model.config.hidden_size:] = 0
    assert not torch.allclose(one.scores(gate.read(st)), got, atol=1e-3)
    fires = (got > gate.threshold).tolist()
    assert any(fires) and not all(fires)
    convs = [[{"role": "user", "content": t}] for t in HARM + SAFE]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=1)
    base = generate(model, tok, convs, cfg)
    ungated = make_lora_patch(model, tmp_path / "u", "fp", seed=1, scale=0.5)
    with attached(model, [read_patch(ungated)]) as m:
        adapted = generate(m, tok, convs, cfg)
    with attached(model, [p]) as m:
        gated = generate(m, tok, convs, cfg)
    assert gated == [a if f else b for a, b, f in zip(adapted, base, fires, strict=True)]


def test_gate_files_hold_every_layer_and_one_layer_files_are_unchanged(tmp_path):
    model, tok = tiny_llama()
    gate = _two_layer_gate(model, tok)
    gate.save(tmp_path)
    t = load_file(str(tmp_path / GATE_FILE))
    assert t["layer"].tolist() == [1, 0]
    back = Gate.load(tmp_path)
    assert back.layers == (1, 0) and torch.equal(back.weight, gate.weight)
    # a one-layer gate writes exactly the tensors and bytes it wrote before multi-layer gates
    one = Gate(1, 0.5, torch.ones(32), 0.25, torch.zeros(32), torch.ones(32))
    (tmp_path / "one").mkdir()
    one.save(tmp_path / "one")
    old = {"weight": torch.ones(32), "bias": torch.tensor([0.25]), "mean": torch.zeros(32), "std": torch.ones(32),
           "layer": torch.tensor([1], dtype=torch.int64), "threshold": torch.tensor([0.5])}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "one" / GATE_FILE).read_bytes() == (tmp_path / "old.safetensors").read_bytes()


@pytest.mark.parametrize("edit, message", [
    ({"layer": torch.tensor([1, 1])}, "repeat a layer"),
    ({"layer": torch.tensor([1, 0, 2])}, "not a multiple of the 3 layers"),
    ({"layer": torch.tensor([[1, 0]])}, "must be a vector of one or more layers"),
    ({"layer": torch.tensor([1, -1])}, "layer -1 is negative"),
])
def test_bad_multi_layer_gate_files_are_refused(tmp_path, edit, message):
    model, tok = tiny_llama()
    _two_layer_gate(model, tok).save(tmp_path)
    t = load_file(str(tmp_path / GATE_FILE))
    save_file(t | edit, str(tmp_path / GATE_FILE))
    with pytest.raises(SafetyPatchError, match=message):
        Gate.load(tmp_path)


def test_a_final_norm_vector_of_the_wrong_length_for_its_layers_is_refused(tmp_path):
    model, tok = tiny_llama()
    _two_layer_gate(model, tok).save(tmp_path)
    t = load_file(str(tmp_path / GATE_FILE))
    save_file(t | {"layer": torch.tensor([1])}, str(tmp_path / GATE_FILE))  # 2 x hidden weights, one layer said
    with pytest.raises(SafetyPatchError, match="norm_weight must be a finite vector of the weight's length per layer"):
        Gate.load(tmp_path)


def test_patch_json_must_name_the_gate_files_layers(tmp_path):
    from safety_patch.patches import verify

    model, tok = tiny_llama()
    gate = _two_layer_gate(model, tok)
    p = _gated(model, tok, tmp_path / "g", gate)
    meta = json.loads((p.path / "patch.json").read_text())
    assert meta["gate"]["extra_layers"] == [0]
    meta["gate"]["extra_layers"] = []
    (p.path / "patch.json").write_text(json.dumps(meta))
    with pytest.raises(SafetyPatchError, match=r"says layer 1, .* holds layers 1, 0"):
        read_patch(p.path)
    # a gate whose extra layer the model lacks fails verification, not routing
    bad = Gate(1, 0.0, gate.weight, 0.0, gate.mean, gate.std, gate.norm_weight, gate.norm_eps, (7,))
    q = _gated(model, tok, tmp_path / "h", bad)
    with pytest.raises(SafetyPatchError, match="layer 7 out of range"):
        verify(q, model, "fp")


def test_gate_export_refuses_a_multi_layer_gate(tmp_path):
    from safety_patch.serve.export import export_gate

    model, tok = tiny_llama()
    gate = _two_layer_gate(model, tok)
    with pytest.raises(SafetyPatchError, match=r"reads 2 layers \(1, 0\); a transformers sequence-classification head "
                                                r"\(final norm, no bias\) reads one layer's state"):
        export_gate(None, gate, tmp_path / "x")  # refused before the model is read
    assert not (tmp_path / "x").exists()


def test_feature_scale_is_a_group_l2_penalty():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 6, generator=g) + 0.7, torch.randn(40, 6, generator=g) - 0.7])
    y = torch.tensor([1.0] * 30 + [0.0] * 40)
    # a uniform scale c is the plain fit with l2 / c^2: the same logits
    w1, _, _, sd1 = fit_probe(x, y, 0.1, intercept=False, feature_scale=torch.full((6,), 2.0))
    w2, _, _, sd2 = fit_probe(x, y, 0.1 / 4, intercept=False)
    assert torch.allclose((x / sd1) @ w1, (x / sd2) @ w2, atol=1e-3)
    # a small scale on some features shrinks what they contribute
    s = torch.tensor([1.0, 1.0, 1.0, 0.05, 0.05, 0.05])
    w3, _, _, sd3 = fit_probe(x, y, 0.1, intercept=False, feature_scale=s)
    contrib = (x / sd3) * w3
    assert contrib[:, 3:].abs().mean() < 0.1 * contrib[:, :3].abs().mean()


def test_fit_on_data_with_extra_layers_and_a_family_raised_threshold(lm, data_dir, tmp_path):  # noqa: F811
    from safety_patch.gate.fit import fit_gate_on_data
    from safety_patch.gate.folder import fit_gate_folder, read_gate_folder

    base = {**CFG.__dict__, "wrapped_benign": 12, "wrapped_harmful": 8, "threshold": None, "target_fpr": 0.1,
            "features": "final-norm"}
    cfg = GateFitConfig(**{**base, "extra_layers": [0], "extra_weight": 0.5})
    plain, info0 = fit_gate_on_data(lm.model, lm.tokenizer, data_dir, cfg)
    assert plain.layers == (1, 0) and info0["extra_layers"] == [0] and info0["extra_weight"] == 0.5
    assert info0["validation"]["leave_one_family_out"]["extra_layers"] == [0]
    raised_cfg = GateFitConfig(**{**base, "extra_layers": [0], "extra_weight": 0.5, "family_fpr": 0.2})
    gate, info = fit_gate_on_data(lm.model, lm.tokenizer, data_dir, raised_cfg)
    lofo = info["validation"]["leave_one_family_out"]
    r = info["threshold_from"]["raised_by"]
    assert r == lofo["raise_for_family_fpr"] >= 0 and info["threshold_from"]["family_fpr"] == 0.2
    assert torch.equal(gate.weight, plain.weight)  # the raise moves the threshold only
    assert gate.threshold == pytest.approx(plain.threshold + r)
    assert lofo["at_family_threshold"]["in_sample"] and lofo["at_family_threshold"]["fpr_at_threshold"]["value"] <= 0.2
    nested = lofo["at_family_threshold_nested"]  # each fold against a raise set on the other folds only
    assert len(nested["raises"]) == len(lofo["folds"]) and min(nested["raises"]) >= 0
    assert nested["auroc"]["n_pos"] == lofo["wrapped_vs_wrapped_benign"]["auroc"]["n_pos"]
    assert nested["auroc"]["n_neg"] == lofo["wrapped_vs_wrapped_benign"]["auroc"]["n_neg"]
    assert info["validation"]["threshold"] == gate.threshold  # the validation report is at the shipped threshold
    # the printed report gives the out-of-family figures at the gate's own (raised) threshold: the nested ones
    from safety_patch.gate.evaluate import report_table

    text = report_table(info["validation"])
    row = next(line for line in text.splitlines() if line.startswith("LOFO wrapped"))
    assert f"{100 * nested['fpr_at_threshold']['value']:5.1f}%" in row and "held out (refit without)" in text
    assert "Before the raise" in text
    out = tmp_path / "g"
    meta = fit_gate_folder(lm, data_dir, raised_cfg, out)
    g2, m2 = read_gate_folder(out)
    assert m2["extra_layers"] == [0] and g2.layers == (1, 0) and meta["threshold_from"]["raised_by"] == r
    raw = json.loads((out / GATE_JSON).read_text())
    raw["extra_layers"] = []
    (out / GATE_JSON).write_text(json.dumps(raw))
    with pytest.raises(SafetyPatchError, match="field 'extra_layers' is \\[\\], gate.safetensors holds \\[0\\]"):
        read_gate_folder(out)
    # fail closed: a raise that cannot be computed is an error, not a gate at the plain threshold
    with pytest.raises(SafetyPatchError, match="family_fpr sets the threshold on out-of-family wrapped prompts, and "
                                               "the pool has wrapped_benign 0, wrapped_harmful 8: both must be > 0"):
        fit_gate_on_data(lm.model, lm.tokenizer, data_dir, GateFitConfig(**{**base, "wrapped_benign": 0, "family_fpr": 0.2}))


@pytest.mark.parametrize("fields, message", [
    ({"extra_layers": [1]}, "layer 1 is already the gate's layer"),
    ({"extra_layers": [9]}, "layer 9 out of range"),
    ({"extra_layers": [0, 0]}, "extra_layers must be null or a list of distinct integers"),
    ({"extra_layers": [-1]}, "extra_layers must be null or a list of distinct integers"),
    ({"extra_layers": None, "extra_depths": [1.5]}, "extra_depths must be a list of numbers in \\[0, 1\\]"),
    ({"extra_layers": None, "extra_depths": [float("nan")]}, "extra_depths must be a list of numbers"),
    ({"extra_layers": None, "extra_depths": [0.2, 0.2]}, "extra_depths must be distinct"),
    ({"extra_layers": [0], "extra_depths": [0.2]}, "extra_layers \\[0\\] and extra_depths \\[0.2\\] both place"),
    ({"extra_layers": None, "extra_depths": [0.6]}, "on this 2-layer model they fall on layers \\[1\\], and the gate's "
                                                    "own layer is 1"),
    ({"extra_weight": 0.0}, "extra_weight must be a finite number > 0"),
    ({"extra_weight": float("nan")}, "extra_weight must be a finite number > 0"),
    ({"extra_weight": 0.5, "extra_layers": []}, "extra_weight scales the extra layers' features, and the config reads "
                                                "no extra layer"),
    ({"extra_weight": 0.5}, "extra_weight 0.5 scales the extra layers' features, and on this 2-layer model"),
    ({"extra_weight": 0.5, "extra_layers": None, "extra_depths": []}, "the config reads no extra layer"),
    ({"family_fpr": 1.0}, "family_fpr must be a number in \\(0, 1\\)"),
    ({"family_fpr": 0.05, "threshold": 0.5, "target_fpr": None}, "family_fpr raises a target_fpr threshold"),
])
def test_bad_multi_layer_settings_are_one_clear_error(lm, data_dir, fields, message):  # noqa: F811
    from safety_patch.gate.fit import fit_gate_on_data

    cfg = GateFitConfig(**{**CFG.__dict__, **fields})
    with pytest.raises(SafetyPatchError, match=message):
        fit_gate_on_data(lm.model, lm.tokenizer, data_dir, cfg)


def test_cli_fits_a_two_layer_gate_and_refuses_to_export_it(data_dir, tiny_dir, tmp_path, capsys):  # noqa: F811
    from safety_patch.cli import main

    g = tmp_path / "g"
    args = ["gate", "fit", "--data", str(data_dir), "--model", str(tiny_dir), "--layer", "1", "--self-instruct", "0",
            "--wrapped-benign", "6", "--wrapped-harmful", "4", "--rephrased", "0", "--no-written-harmful",
            "--no-written-lookalikes"]
    assert main(args + ["--out", str(g), "--extra-layers", "0", "--extra-weight", "0.6"]) == 0
    assert "on layers 1, 0" in capsys.readouterr().out
    gcfg = json.loads((g / GATE_JSON).read_text())["config"]
    assert gcfg["extra_layers"] == [0] and gcfg["extra_weight"] == 0.6
    # --no-written-harmful turns the second written file (on by default) off with the first
    assert (gcfg["written_harmful"], gcfg["written_harmful_more"], gcfg["written_lookalikes"]) == (False, False, False)
    assert main(args + ["--out", str(tmp_path / "h"), "--extra-layers", "zero"]) == 2
    assert "--extra-layers must be comma-separated layer numbers" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    assert main(args + ["--out", str(tmp_path / "h"), "--family-fpr", "often"]) == 2
    assert "--family-fpr must be a rate like 0.05 or none, got 'often'" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    # a one-layer gate with no raise, spelled out; and a logit replaces the target rate and its raise
    assert main(args + ["--out", str(tmp_path / "one"), "--extra-layers", "none", "--family-fpr", "none"]) == 0
    one = json.loads((tmp_path / "one" / GATE_JSON).read_text())
    assert one["config"]["extra_layers"] == [] and one["config"]["family_fpr"] is None
    assert "extra_layers" not in one and "family_fpr" not in one["threshold_from"]
    assert main(args + ["--out", str(tmp_path / "t"), "--threshold", "0.25"]) == 0
    t = json.loads((tmp_path / "t" / GATE_JSON).read_text())
    assert t["threshold"] == 0.25 and t["config"]["family_fpr"] is None and t["config"]["target_fpr"] is None
    assert main(["gate", "export", "--gate", str(g), "--model", str(tiny_dir), "--out", str(tmp_path / "x")]) == 2
    assert "reads one layer's state" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_gate_aware_objective_moves_a_two_layer_gate(tmp_path, monkeypatch):
    from safety_patch.attacks.gcg import GateGCG, GCGSettings

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    model, tok = tiny_llama()
    request = "How do I kill a Python process?"
    settings = GCGSettings(steps=4, search_width=32, topk=32, suffix_tokens=4, gate_weight=5.0, gate_margin=1.0)
    init = " " + " ".join(["!"] * settings.suffix_tokens)
    gate = _two_layer_gate(model, tok, threshold=-100.0)
    with attached(model, [_gated(model, tok, tmp_path / "probe", gate)], "fp") as pm:
        ids = GateGCG(settings).bind(pm, tok).evaluated_ids(request, init)
        (z0,) = pm.gate_scores(tok, [ids]).values()
    gate.threshold = float(z0[0]) - 1.0  # the gate fires on the starting point, by a logit
    with attached(model, [_gated(model, tok, tmp_path / "g", gate)], "fp") as pm:
        r = GateGCG(settings).bind(pm, tok).optimise(request)
    (z,) = r["gate_logits"].values()
    assert z < gate.threshold < float(z0[0]) and r["adapters"] == []


def test_the_upstream_gate_probe_reads_every_layer_of_a_two_layer_gate(lm, tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """`serve --upstream` runs the gates alone on a base truncated after the deepest layer they
    read: a two-layer gate's readings there equal its routing logits on the whole model."""
    from safety_patch.serve.engine import GateProbe

    st = layer_states(lm.model, lm.tokenizer, _ids(lm.tokenizer, HARM + SAFE), [1, 0])
    x = torch.cat([st[0], st[1]], 1)
    y = torch.tensor([1.0] * len(HARM) + [0.0] * len(SAFE))
    cfg = GateFitConfig(layer=0, extra_layers=[1], threshold=0.0, target_fpr=None)
    gate = fit_gate_probe(x, y, (0, 1), cfg, _norm_of(lm.model, cfg))
    make_lora_patch(lm.model, tmp_path / "g", lm.fingerprint, seed=1, scale=0.5)
    gate.save(tmp_path / "g")
    finalize_patch(tmp_path / "g", "lora", {"name": "tiny", "fingerprint": lm.fingerprint}, method="lora",
                   gate={"layer": 0, "extra_layers": [1], "threshold": 0.0})
    ids = _ids(lm.tokenizer, HARM + SAFE)
    with attached(lm.model, [tmp_path / "g"], lm.fingerprint) as pm:
        (want,) = pm.gate_scores(lm.tokenizer, ids).values()
    probe = GateProbe(str(tiny_dir), {"g": [tmp_path / "g"]}, device="cpu")
    assert probe.layers_loaded == 2  # truncated after layer 1, the deepest the gate reads
    assert getattr(probe.model, "use_kernels", False) is False  # no Hub kernels swapped in (models.HUB_KERNELS)
    routes = probe.read("g", ids)
    got = torch.tensor([r.gates[0].logit for r in routes])
    assert torch.allclose(got, want, atol=1e-4)
    assert routes[0].gates[0].as_dict()["layers"] == [0, 1]
    assert [bool(r.active) for r in routes] == (want > 0).tolist() and 0 < int((want > 0).sum()) < len(want)
    # a delta, or two patches under one name, cannot be one LoRA module per request: each said as such
    from safety_patch.testing import make_delta_patch

    make_delta_patch(lm.model, tmp_path / "d", lm.fingerprint)
    with pytest.raises(SafetyPatchError, match=r"d is a full-parameter delta, .*`patch merge`"):
        GateProbe(str(tiny_dir), {"d": [tmp_path / "d"]}, device="cpu")
    with pytest.raises(SafetyPatchError, match="one LoRA patch per model name, got 2"):
        GateProbe(str(tiny_dir), {"two": [tmp_path / "d", tmp_path / "g"]}, device="cpu")
    # a gated delta: `patch merge` refuses gated patches, so the message does not send the user there
    import shutil

    from safety_patch.patches import DELTA_FILE

    (tmp_path / "dg").mkdir()
    shutil.copy(tmp_path / "d" / DELTA_FILE, tmp_path / "dg" / DELTA_FILE)
    gate.save(tmp_path / "dg")
    finalize_patch(tmp_path / "dg", "delta", {"name": "tiny", "fingerprint": lm.fingerprint}, method="full",
                   gate={"layer": 0, "extra_layers": [1], "threshold": 0.0})
    with pytest.raises(SafetyPatchError, match=r"dg is a full-parameter delta, .*serve it embedded \(without --upstream\)$"):
        GateProbe(str(tiny_dir), {"dg": [tmp_path / "dg"]}, device="cpu")
    # ...said first, before the upstream is asked for a LoRA module of that name (a user's trial got
    # "without a LoRA module 'dg' (... --lora-modules dg=PATCH_FOLDER)", impossible for a delta)
    from safety_patch.serve import upstream

    monkeypatch.setattr(upstream, "check_upstream", lambda *a, **k: pytest.fail("the upstream was asked first"))
    with pytest.raises(SafetyPatchError, match=rf"^--patch {tmp_path / 'dg'}: .* is a full-parameter delta"):
        upstream.build_upstream(str(tiny_dir), {"dg": [str(tmp_path / "dg")]}, "http://127.0.0.1:9", "m", device="cpu")


def test_extra_layers_by_depth_resolve_like_the_gate_layer_and_each_layer_is_read_once(lm):  # noqa: F811
    from safety_patch.gate.config import model_layers

    cfg = GateFitConfig(extra_layers=None, extra_depths=[0.7]).validate()
    assert cfg.resolved_layer(30) == 18 and cfg.resolved_extra_layers(30) == [21]  # the embedded model's 30 layers
    assert cfg.resolved_extra_layers(40) == [28] and cfg.resolved_extra_layers(10) == [7]
    # on shallow models depths fall on the gate's own layer or on each other: read once, in order
    assert GateFitConfig(extra_layers=None, extra_depths=[0.6, 0.7, 0.75]).resolved_extra_layers(4) == [3]
    assert GateFitConfig(extra_layers=None, extra_depths=[0.7]).resolved_extra_layers(2) == []
    # explicit indices win over depths, and [] is a one-layer gate whatever the depths say
    assert GateFitConfig(extra_layers=[5], extra_depths=[0.7]).resolved_extra_layers(30) == [5]
    assert GateFitConfig(extra_layers=[], extra_depths=[0.7]).resolved_extra_layers(30) == []
    assert not GateFitConfig(extra_layers=[], extra_depths=[0.7]).has_extra_layers()
    # on the tiny model (2 layers): depth 0.2 -> layer 0 beside layer 1
    got = model_layers(lm.model, GateFitConfig(layer=1, extra_layers=None, extra_depths=[0.2]))
    assert got == (1, 0)


def test_the_reproduce_report_names_every_gate_layer_and_the_raised_out_of_family_row():
    from safety_patch.report.document import gate_blocks
    from safety_patch.report.render import to_markdown

    def m(v, k=1, n=10):
        return {"value": v, "k": k, "n": n, "ci95": [0.0, 1.0], "interval": "wilson"}

    comp = {"auroc": {"value": 0.9, "ci95": [0.8, 0.95]}, "tpr_at_fpr_0.01": m(0.5), "tpr_at_fpr_0.05": m(0.6),
            "tpr_at_threshold": m(0.7), "fpr_at_threshold": m(0.1)}
    nested = {**comp, "raises": [0.25, 0.5], "tpr_at_threshold": m(0.4), "fpr_at_threshold": m(0.03)}
    g = {"gate": {"layer": 18, "extra_layers": [21], "threshold": 0.736}, "data": {"split": "test"},
         "direct_vs_benign": comp, "wrapped_vs_wrapped_benign": comp, "harmful_vs_benign": comp,
         "fired": {"harmful_direct": m(0.9)},
         "leave_one_family_out": {"families": 12, "folds": [{}, {}], "wrapped_vs_wrapped_benign": comp,
                                  "at_family_threshold_nested": nested}}
    md = to_markdown(gate_blocks(g), Path("."))
    assert "(layers 18, 21, fires above logit +0.736)" in md
    assert "| the same at the raised threshold (each group's raise set on the other groups: +0.25, +0.50) |" in md
    assert "| 40.0% [0.0, 100.0] | 3.0% [0.0, 100.0] |" in md
    one = {**g, "gate": {"layer": 18, "threshold": 0.5},
           "leave_one_family_out": {**g["leave_one_family_out"], "at_family_threshold_nested": None}}
    md1 = to_markdown(gate_blocks(one), Path("."))
    assert "(layer 18, fires above logit +0.500)" in md1 and "raised threshold" not in md1
    lk = {"fired": m(0.2, 35, 176), "by_category": {"homonym": m(0.1, 1, 10), "public_privacy": m(0.5, 5, 10)}}
    md2 = to_markdown(gate_blocks({**g, "written_lookalikes": lk}), Path("."))
    assert "176 prompts" in md2 and "| public_privacy | 50.0% [0.0, 100.0] |" in md2 and "cross-fit" not in md2
    cross = {**lk, "method": "cross-fit", "folds": 2, "at_the_gates_rate": {"fired": m(0.25, 44, 176)}}
    md4 = to_markdown(gate_blocks({**g, "written_lookalikes": cross}), Path("."))
    assert "a refit that never saw it (2-fold cross-fit): the refits fire on 20.0% [0.0, 100.0] (35/176) at their own" in md4
    assert "and on 25.0% [0.0, 100.0] (44/176) when each is held at the gate's own firing rate" in md4
    assert md4.count("20.0% [0.0, 100.0]") == 1  # said once, not repeated after the sentence
    # the same count at the gate's rate is said so, not printed twice as if copied
    same = {**cross, "at_the_gates_rate": {"fired": m(0.2, 35, 176)}}
    md6 = to_markdown(gate_blocks({**g, "written_lookalikes": same}), Path("."))
    assert "and on the same number when each is held at the gate's own firing rate" in md6
    assert md6.count("20.0% [0.0, 100.0] (35/176)") == 1
    # no raise moved any group: one row, and a sentence that says the rates hold at the gate's threshold
    flat = {**g, "leave_one_family_out": {**g["leave_one_family_out"], "at_family_threshold_nested": {**nested, "raises": [0.0, 0.0]}}}
    md5 = to_markdown(gate_blocks(flat), Path("."))
    assert "raised threshold" not in md5 and "moved no group's threshold here" in md5
    md3 = to_markdown(gate_blocks({**g, "written_lookalikes": {"skipped": "this gate was fit on them (written_lookalikes)"}}),
                      Path("."))
    assert "not scored, this gate was fit on them" in md3 and "| category |" not in md3


@pytest.mark.parametrize("era", ["before-layers", "session-20"])
def test_gate_folders_written_before_the_two_layer_default_are_refit_as_they_were_fit(lm, data_dir, tmp_path, era):  # noqa: F811
    """`gate eval`'s refits read a gate's recorded config: a file from before extra layers, depths
    or the raise existed (no such keys), or from when one layer was the default ([] and weight 1),
    is refit on its own one layer without a raise, not on today's defaults (nor refused by them)."""
    import shutil

    from safety_patch.gate.evaluate import evaluate_gate
    from safety_patch.gate.folder import fit_gate_folder, read_gate_folder, recorded_config

    cfg = GateFitConfig(**{**CFG.__dict__, "features": "final-norm", "extra_layers": [], "extra_weight": 1.0})
    src = tmp_path / "g"
    fit_gate_folder(lm, data_dir, cfg, src)
    old = tmp_path / "old"
    shutil.copytree(src, old)
    raw = json.loads((old / GATE_JSON).read_text())
    for k in ("extra_depths", "written_harmful_more", "written_lookalikes") + (("extra_layers", "extra_weight", "family_fpr") if era == "before-layers" else ()):
        raw["config"].pop(k)
    raw.pop("binding")  # written before gate.json carried one (and so, before the date from which it is required)
    raw["created"] = "2026-12-01T12:00:00Z"
    (old / GATE_JSON).write_text(json.dumps(raw))
    gate, meta = read_gate_folder(old)
    rec = recorded_config(meta, gate)
    assert (rec.layer, rec.extra_layers, rec.family_fpr, rec.written_harmful_more, rec.written_lookalikes) == (
        1, [], None, False, False)
    raw1 = {**raw, "config": {**raw["config"], "written_breadth": True}}  # the one flag of 8926a7f: both files
    assert (recorded_config(raw1, gate).written_harmful_more, recorded_config(raw1, gate).written_lookalikes) == (True, True)
    assert rec.extra_weight == (1.0 if era == "before-layers" else raw["config"]["extra_weight"])
    with pytest.raises(SafetyPatchError, match=r"gate.json: config key 'pooling' unknown to this safety-patch"):
        recorded_config({**raw, "config": {**raw["config"], "pooling": "mean"}}, gate)  # not refit as another gate
    rep = evaluate_gate(lm, old, data_dir, "val", loso=True, attacks=[], lofo=True)
    assert "has no binding" in rep["note"]  # its config is read as it stands, and the report says so
    assert rep["leave_one_family_out"]["layer"] == 1 and "extra_layers" not in rep["leave_one_family_out"]
    assert "raise_for_family_fpr" not in rep["leave_one_family_out"]


def test_family_folds_deal_each_family_into_one_group_and_leave_unwrapped_prompts_out():
    from safety_patch.gate.fit import family_folds

    fam = ["a", None, "b", "a", "c", None, "d", "e", "f", "b"]
    fold, fold_of = family_folds(fam, 4, seed=3)
    assert sorted(fold_of) == ["a", "b", "c", "d", "e", "f"] and set(fold_of.values()) == {0, 1, 2, 3}
    assert fold.tolist() == [fold_of[f] if f is not None else -1 for f in fam]  # a family's prompts share a group
    assert torch.equal(family_folds(fam, 4, seed=3)[0], fold)  # seeded
    assert len(set(family_folds(fam, 10, seed=3)[1].values())) == 6  # never more groups than families
    assert family_folds([None, None], 5, seed=0)[0].tolist() == [-1, -1]

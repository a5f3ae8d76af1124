import math

import pytest
import torch

from safety_patch.analysis import subspace as sm


def orth(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].float()


def test_orthogonal_identical_and_known_angle():
    e = torch.eye(6)
    assert sm.overlap_metrics(e[:, :2], e[:, 2:4])["overlap"] == pytest.approx(0, abs=1e-7)
    assert sm.overlap_metrics(e[:, :2], e[:, 2:4])["max_entry"] == pytest.approx(0, abs=1e-7)
    q = orth(10, 3)
    m = sm.overlap_metrics(q, q)
    assert m["overlap"] == pytest.approx(1, abs=1e-5) and m["top_cosine"] == pytest.approx(1, abs=1e-5)
    for theta in (0.1, 0.7, 1.2):
        u = torch.tensor([[1.0], [0.0], [0.0]])
        v = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]])
        assert sm.principal_cosines(u, v)[0].item() == pytest.approx(math.cos(theta), abs=1e-5)
        assert sm.overlap_metrics(u, v)["overlap"] == pytest.approx(math.cos(theta) ** 2, abs=1e-5)


def test_factored_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(20, 4, generator=g), torch.randn(4, 30, generator=g)
    U, S, V = sm.factored_svd(B, A, scale=2.0)
    dense = 2.0 * B @ A
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:4], atol=1e-4)
    assert torch.allclose(U @ torch.diag(S) @ V.T, dense, atol=1e-4)
    _, _, Vd = torch.linalg.svd(dense.double())
    assert sm.overlap_metrics(V, Vd[:4].T.float())["overlap"] == pytest.approx(1, abs=1e-5)


def test_invariant_to_lora_scale_and_gauge():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(16, 3, generator=g), torch.randn(3, 24, generator=g)
    V0 = orth(24, 8, seed=3)
    _, _, V = sm.factored_svd(B, A, 1.0)
    ref = sm.overlap_metrics(V, V0)
    M = torch.randn(3, 3, generator=g) + 3 * torch.eye(3)
    for Bx, Ax, s in ((B, A, 7.5), (B @ M, torch.linalg.solve(M, A), 1.0), (B, A, -0.3)):
        _, _, Vx = sm.factored_svd(Bx, Ax, s)
        got = sm.overlap_metrics(Vx, V0)
        for key in ("overlap", "top_cosine", "mean_cosine"):
            assert got[key] == pytest.approx(ref[key], abs=1e-4)


def test_random_subspaces_near_the_analytic_expectation():
    d, r, k = 256, 8, 32
    vals = [sm.overlap_metrics(orth(d, r, s), orth(d, k, s + 100))["overlap"] for s in range(30)]
    assert sum(vals) / len(vals) == pytest.approx(k / d, rel=0.15)
    assert sm.random_baseline(d, r, k)["overlap"] == k / d


def test_interference_decomposition_adds_back_up():
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(12, 20, generator=g)
    B, A = torch.randn(12, 2, generator=g), torch.randn(2, 20, generator=g)
    x = torch.randn(5, 20, generator=g)
    _, _, V0 = sm.top_singular(W0, 6)
    _, _, Vd = sm.factored_svd(B, A, 0.5)
    res = sm.interference_terms(W0, (B, A, 0.5), x, V0, Vd)
    total = sum(res["_terms"].values())
    assert torch.allclose(total, x @ (W0 + 0.5 * B @ A).T, atol=1e-4)
    dense = sm.interference_terms(W0, 0.5 * B @ A, x, V0, Vd)
    assert dense["interference"] == pytest.approx(res["interference"], rel=1e-4)


def test_effective_rank():
    assert sm.effective_rank(torch.ones(4)) == pytest.approx(4)
    assert sm.effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1)


def test_top_singular_randomised_matches_exact():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(300, 40, generator=g) @ torch.diag(torch.linspace(10, 0.1, 40)) @ torch.randn(40, 200, generator=g)
    _, S1, V1 = sm.top_singular(W, 8)
    _, S2, V2 = sm.top_singular(W, 8, exact_limit=10)
    assert torch.allclose(S1, S2, rtol=1e-3)
    assert sm.overlap_metrics(V1, V2)["overlap"] == pytest.approx(1, abs=1e-3)


def test_analyze_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    from safety_patch.analysis.run import analyze
    from safety_patch.models import load_model
    from safety_patch.testing import make_delta_patch, make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    lora = make_lora_patch(lm.model, tmp_path / "lora", lm.fingerprint)
    full = make_delta_patch(lm.model, tmp_path / "full", lm.fingerprint, every=1)
    prompts = [[{"role": "user", "content": f"hello number {i}"}] for i in range(3)]
    res = analyze(str(tiny_dir), [lora, full], tmp_path / "out", ks=(4, 8), benign=prompts, jailbreak=prompts)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"weights.csv", "weights.json", "summary.json", "summary.txt", "activations.json", "overlap_per_layer.png",
            "magnitude_per_layer.png", "hidden_shift.png", "overlap_heatmap_lora_k8.png", "overlap_heatmap_full_k8.png"} <= files
    assert set(res["summary"]) == {"lora", "full"} and res["summary"]["lora"]["modules"] == 14
    header = (tmp_path / "out" / "weights.csv").read_text().split("\n")[0]
    assert header == "layer,module,patch,metric,value"
    shift = res["activations"]["hidden_shift"]["lora"]["benign"]["last_token"]
    assert shift[0] == pytest.approx(0, abs=1e-6) and max(shift) > 0  # embeddings untouched, later layers move
    import json

    meta = json.loads((tmp_path / "out" / "summary.json").read_text())  # provenance of the analysis
    assert meta["base_fingerprint"] == lm.fingerprint and meta["code"]["source_sha256"] and meta["versions"]["torch"]
    assert meta["config"]["ks"] == [4, 8] and meta["config"]["n_prompts"] == {"benign": 3, "jailbreak": 3}
    assert all(p["base_fingerprint"] == lm.fingerprint for p in meta["patches"])
    assert "not run: no prompts" not in (tmp_path / "out" / "summary.txt").read_text()
    analyze(str(tiny_dir), [lora], tmp_path / "weights-only", ks=(4,))
    assert "activation analysis (hidden shift, interference): not run" in (tmp_path / "weights-only" / "summary.txt").read_text()
    assert json.loads((tmp_path / "weights-only" / "summary.json").read_text())["config"]["activations"] is False


def test_patches_of_different_bases_are_not_analysed_against_one_w0(tiny_dir, tmp_path):
    from safety_patch.analysis.run import analyze
    from safety_patch.errors import SafetyPatchError
    from safety_patch.models import load_model
    from safety_patch.testing import make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    a = make_lora_patch(lm.model, tmp_path / "a", lm.fingerprint)
    b = make_lora_patch(lm.model, tmp_path / "b", "0" * 64)
    with pytest.raises(SafetyPatchError, match="different base models"):
        analyze(str(tiny_dir), [a, b], tmp_path / "out", ks=(4,))
    assert not (tmp_path / "out").exists()


def test_a_patch_is_measured_only_against_its_own_w0(tiny_dir, tmp_path):
    """Found by a user's trial: `analyze --model OTHER` measured a patch's ΔW against another model's
    weights (there: a merged checkpoint that already held the patch) and recorded the patch's base
    as the one read; a patch trained on top of another was measured against the bare base. Both are
    refused; --force measures anyway and summary.json says so."""
    import json

    from safety_patch.analysis.run import analyze
    from safety_patch.errors import SafetyPatchError
    from safety_patch.models import load_model
    from safety_patch.patches import read_patch
    from safety_patch.testing import make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    other = make_lora_patch(lm.model, tmp_path / "other", "0" * 64)
    with pytest.raises(SafetyPatchError, match=r"was trained on base 000000000000, but --model .* is "
                                               + lm.fingerprint[:12] + r".*--force"):
        analyze(str(tiny_dir), [other], tmp_path / "out", ks=(4,))
    assert not (tmp_path / "out").exists()
    below = make_lora_patch(lm.model, tmp_path / "below", lm.fingerprint)
    above = make_lora_patch(lm.model, tmp_path / "above", lm.fingerprint, seed=1, stack=[read_patch(below).id])
    with pytest.raises(SafetyPatchError, match=r"trained on top of patch\(es\) .*not base \+ those"):
        analyze(str(tiny_dir), [above], tmp_path / "out", ks=(4,))
    analyze(str(tiny_dir), [other], tmp_path / "out", ks=(4,), force=True)
    meta = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert meta["base_fingerprint"] == lm.fingerprint and meta["patches"][0]["base_fingerprint"] == "0" * 64
    assert len(meta["forced"]) == 1 and "was trained on base 000000000000" in meta["forced"][0]
    # ... and so does summary.txt, first (a user's trial: only summary.json said so)
    assert (tmp_path / "out" / "summary.txt").read_text().splitlines()[0] == f"measured with --force: {meta['forced'][0]}"
    analyze(str(tiny_dir), [below], tmp_path / "own", ks=(4,))
    assert "forced" not in json.loads((tmp_path / "own" / "summary.json").read_text())
    assert "--force" not in (tmp_path / "own" / "summary.txt").read_text()


def test_two_patches_of_one_folder_name_are_refused_naming_them_and_the_way_out(tiny_dir, tmp_path):
    """Found by a user's trial: a reproduce run's arms are all `<arm>/patch`, and `analyze --patch A/patch
    --patch B/patch` said only that names must differ. The error names the name, both paths and what to do."""
    from safety_patch.analysis.run import analyze
    from safety_patch.errors import SafetyPatchError
    from safety_patch.models import load_model
    from safety_patch.testing import make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    a = make_lora_patch(lm.model, tmp_path / "a" / "patch", lm.fingerprint)
    b = make_lora_patch(lm.model, tmp_path / "b" / "patch", lm.fingerprint, seed=1)
    with pytest.raises(SafetyPatchError, match=r"two --patch folders are named 'patch' \(.*a/patch, .*b/patch\): .*link or copy"):
        analyze(str(tiny_dir), [a, b], tmp_path / "out", ks=(4,))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_a_forced_patch_for_a_model_of_another_shape_is_one_error_naming_the_module(tiny_dir, tmp_path, kind):
    """Found by a user's trial: `analyze --force` on a patch made for a model of another width ended in
    a matmul traceback (exit 1). The shapes are compared first: one SafetyPatchError naming the patch,
    the module and both shapes, and nothing written."""
    from safety_patch.analysis.run import analyze
    from safety_patch.errors import SafetyPatchError
    from safety_patch.testing import make_delta_patch, make_lora_patch, tiny_llama

    wide, _ = tiny_llama(hidden=64)
    make = make_lora_patch if kind == "lora" else make_delta_patch
    patch = make(wide, tmp_path / "wide", "0" * 64)
    with pytest.raises(SafetyPatchError, match=r"patch 'wide': model\.layers\.\d+\.\w+\.\w+ has ΔW of shape \[\d+, \d+\] "
                                               r"but the base's weight is \[\d+, \d+\]: the patch was made for another model"):
        analyze(str(tiny_dir), [patch], tmp_path / "out", ks=(4,), force=True)
    assert not (tmp_path / "out").exists()


def test_patches_analysed_together_equal_each_analysed_alone(tiny_dir, tmp_path):
    """analyse_weights reads the patches' modules in step and decomposes each W0 once: every
    patch's rows (and kept vectors) are those it gets alone, in the same order, also where the
    patches touch different modules."""
    from safety_patch.analysis.run import analyse_weights
    from safety_patch.analysis.weights import checkpoint_reader
    from safety_patch.models import load_model
    from safety_patch.patches import read_patch
    from safety_patch.testing import make_delta_patch, make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    ps = [read_patch(make_lora_patch(lm.model, tmp_path / "lora", lm.fingerprint, targets=["q_proj", "down_proj"])),
          read_patch(make_delta_patch(lm.model, tmp_path / "full", lm.fingerprint, every=3)),
          read_patch(make_lora_patch(lm.model, tmp_path / "lora2", lm.fingerprint, seed=1))]
    read_w0 = checkpoint_reader(str(tiny_dir))
    keep = {p.name: {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} for p in ps}
    rows, vecs = analyse_weights(ps, read_w0, [4, 8], keep_vectors=keep)
    alone = [analyse_weights([p], read_w0, [4, 8], keep_vectors=keep) for p in ps]
    assert rows == [r for rs, _ in alone for r in rs]
    assert [r["patch"] for r in rows] == sorted((r["patch"] for r in rows), key=[p.name for p in ps].index)
    assert len({frozenset(r["name"] for r in rs) for rs, _ in alone}) == 3  # the patches cover different module sets
    for p, (_, v) in zip(ps, alone, strict=True):
        assert vecs[p.name].keys() == v[p.name].keys()
        for m in v[p.name]:
            assert torch.equal(vecs[p.name][m][1]["V0"], v[p.name][m][1]["V0"])
    assert len(vecs[ps[0].name]) == len(vecs[ps[2].name]) == 2  # the LoRA patches touch both kept modules


def test_analyze_says_what_it_used_instead_of_clamping_silently(tiny_dir, tmp_path, capsys):
    """Found by a user's trial: `--k 100000` was capped at each W0's size yet labelled k=100000 (overlap
    1.0 "vs random 1.0"), `--r 100` on a rank-4 LoRA silently used 4, and `--benign` refused a file of
    the data folder's own rows (`messages`)."""
    import json

    from safety_patch.analysis.run import analyse_weights, summarise, summary_text
    from safety_patch.analysis.weights import checkpoint_reader
    from safety_patch.cli import main
    from safety_patch.errors import SafetyPatchError
    from safety_patch.evaluation.prompts import benign_prompts
    from safety_patch.models import load_model
    from safety_patch.patches import read_patch
    from safety_patch.testing import make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    p = read_patch(make_lora_patch(lm.model, tmp_path / "lora", lm.fingerprint))
    with pytest.raises(SafetyPatchError, match=r"--r 100 is over the LoRA rank 4 of "):
        analyse_weights([p], checkpoint_reader(str(tiny_dir)), [4], r=100)
    rows, _ = analyse_weights([p], checkpoint_reader(str(tiny_dir)), [4, 100000])
    dims = [min(lm.model.get_submodule(r["name"]).weight.shape) for r in rows]
    assert [r["k_used@100000"] for r in rows] == dims and all(r["k_used@4"] == 4 for r in rows)
    text = summary_text(summarise(rows, [4, 100000]), [4, 100000], {})
    assert f"k capped at min(W0.shape) on {len(rows)} of {len(rows)} modules" in text
    assert text.count("k capped") == 1  # k=4 fits every module
    rows_file = tmp_path / "general.jsonl"
    rows_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                          {"role": "assistant", "content": "a"}],
                                             "meta": {"category": "c", "split": "test"}}) + "\n" for i in range(3)))
    assert [b["messages"] for b in benign_prompts(rows_file)] == [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    rows_file.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(SafetyPatchError, match=r"general\.jsonl:1: field 'messages' must be a list"):
        benign_prompts(rows_file)
    assert main(["analyze", "--model", str(tiny_dir), "--patch", str(p.path), "--out", str(tmp_path / "o"),
                 "--r", "100"]) == 2 and not (tmp_path / "o").exists()


def test_a_gated_patch_is_said_to_be_measured_with_its_adapter_always_on(tiny_dir, tmp_path):
    """A user's trial: `analyze` on a gated patch measured its adapter ungated, and only activations.json said so."""
    import json

    from safety_patch.analysis.run import analyze
    from safety_patch.models import load_model
    from safety_patch.testing import make_lora_patch
    from test_failclosed_patch import gated_patch

    lm = load_model(str(tiny_dir), device="cpu")
    gp = gated_patch(lm.model, tmp_path / "gp", lm.fingerprint)
    plain = make_lora_patch(lm.model, tmp_path / "plain", lm.fingerprint, seed=3)
    prompts = [[{"role": "user", "content": f"hello number {i}"}] for i in range(2)]
    res = analyze(str(tiny_dir), [gp, plain], tmp_path / "out", ks=(4,), benign=prompts)
    heads = [ln for ln in (tmp_path / "out" / "summary.txt").read_text().splitlines() if ln.startswith("== ")]
    assert heads[0].startswith("== gp (") and heads[0].endswith(
        "[gated: its adapter measured always on; on prompts its gate passes, the patched model is the base]")
    assert heads[1].startswith("== plain (") and "gated" not in heads[1]
    meta = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["gated"] for p in meta["patches"]] == [True, False] and res["gated"] == ["gp"]

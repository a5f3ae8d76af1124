"""The shared-prefix feature pass (shared_prefix.py): the tree covers every prompt exactly once,
and its states equal a plain forward pass's to float rounding."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safety_patch.errors import SafetyPatchError
from safety_patch.gate.probe import layer_states
from safety_patch.shared_prefix import last_token_states, last_token_states_at, plan, plan_cost
from safety_patch.testing import tiny_llama

# Small alphabets and a few shared openings, so that the trees have depth and branching.
prompt_lists = st.lists(
    st.tuples(st.sampled_from([[], [1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9, 9, 9], [7] * 12]),
              st.lists(st.integers(1, 3), min_size=0, max_size=10)).map(lambda t: t[0] + t[1]).filter(bool),
    min_size=0, max_size=40)


@settings(max_examples=300, deadline=None)
@given(prompt_lists, st.integers(1, 40))
def test_the_tree_reads_each_prompt_exactly_once_from_a_prefix_it_has(prompts, min_saving):
    root = plan(prompts, min_saving)
    seen = []
    stack = [(root, [])]
    while stack:
        node, prefix = stack.pop()
        assert len(prefix) == node.depth
        for i in node.leaves:
            assert list(prompts[i][: node.depth]) == prefix and len(prompts[i]) > node.depth  # its last token is read
            seen.append(i)
        below = []
        for child in node.children:
            assert child.depth > node.depth and len(child.edge) == child.depth - node.depth
            stack.append((child, prefix + child.edge))
            below.append(child)
        for child in below:  # a kept node saves at least min_saving token reads
            n_below = sum(len(n.leaves) for n in child.walk())
            assert (n_below - 1) * len(child.edge) >= min_saving
    assert sorted(seen) == list(range(len(prompts)))
    cost = plan_cost(root, prompts)
    assert cost["tokens"] <= cost["plain_tokens"] == sum(map(len, prompts))
    assert plan(prompts, min_saving) == root  # deterministic


def test_a_shared_opening_is_read_once():
    head = list(range(10, 60))  # 50 shared tokens
    prompts = [head + [i, i + 1] for i in range(1, 9)]
    root = plan(prompts, min_saving=8)
    assert [c.edge for c in root.children] == [head] and not root.leaves
    assert plan_cost(root, prompts) == {"tokens": 50 + 8 * 2, "plain_tokens": 8 * 52, "nodes": 1}
    assert plan_cost(plan(prompts, min_saving=10_000), prompts)["tokens"] == 8 * 52  # not worth a node: read whole


def test_bad_input_is_refused():
    with pytest.raises(SafetyPatchError, match="prompt 1 has no tokens"):
        plan([[1, 2], []])
    with pytest.raises(SafetyPatchError, match="min_saving"):
        plan([[1]], min_saving=0)
    with pytest.raises(SafetyPatchError, match="layer 5 out of range"):
        last_token_states(tiny_llama()[0], [[1, 2]], 5)


def _templated(n: int, seed: int, vocab: int) -> list[list[int]]:
    """Chat-like prompts: a shared header, one of three 'templates' (or none), a request, a shared tail."""
    rng = random.Random(seed)
    header = [rng.randrange(3, vocab) for _ in range(9)]
    templates = [[rng.randrange(3, vocab) for _ in range(rng.randrange(20, 40))] for _ in range(3)] + [[]]
    tail = [1, 2, 3]
    out = []
    for _ in range(n):
        req = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 15))]
        out.append(header + rng.choice(templates) + req + tail)
    out += [out[0], header + [5], out[1][:-2]]  # a duplicate, a short prompt, a prompt that another one extends
    return out


@pytest.mark.parametrize("min_saving,token_budget,kv_budget", [(64, 4096, 16384), (1, 4096, 16384), (1, 40, 16384),
                                                                (1, 4096, 60), (10_000, 4096, 16384)])
def test_states_equal_a_plain_pass_to_float_rounding(min_saving, token_budget, kv_budget):
    model, tok = tiny_llama(layers=3)
    prompts = _templated(30, 0, len(tok))
    root = plan(prompts, min_saving)
    if min_saving < 10_000:
        assert any(c.children for c in root.children)  # reads through cached prefixes, two levels deep
    for layer in (0, 2):
        want = layer_states(model, tok, prompts, [layer], 8)[layer]
        got = last_token_states(model, prompts, layer, token_budget=token_budget, kv_budget=kv_budget,
                                min_saving=min_saving)
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    read = []
    last_token_states(model, prompts, 1, progress=read.append)
    assert sum(read) == len(prompts)
    # several layers in one pass: each exactly what a pass for that layer alone reads
    both = last_token_states_at(model, prompts, [2, 0], token_budget=token_budget, kv_budget=kv_budget,
                                min_saving=min_saving)
    assert sorted(both) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(both[layer], last_token_states(model, prompts, layer, token_budget=token_budget,
                                                          kv_budget=kv_budget, min_saving=min_saving))


def test_a_multi_layer_read_is_one_pass_and_caches_each_layer(tmp_path, monkeypatch):
    import safety_patch.gate.features as gate_features

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    model, tok = tiny_llama(layers=3)
    prompts = _templated(12, 1, len(tok))
    calls = []
    real = gate_features.features_at
    monkeypatch.setattr(gate_features, "features_at", lambda m, t, p, layers, *a, **k: calls.append(list(layers)) or real(m, t, p, layers, *a, **k))
    x = gate_features.cached_features(model, tok, prompts, (2, 0), fingerprint="fp")
    assert calls == [[0, 2]]  # one pass for both layers
    one = gate_features.cached_features(model, tok, prompts, 2, fingerprint="fp")  # from the cache the pass wrote
    assert calls == [[0, 2]] and torch.equal(x, torch.cat([one, gate_features.cached_features(model, tok, prompts, 0, fingerprint="fp")], 1))
    gate_features.cached_features(model, tok, prompts, (1, 2), fingerprint="fp")
    assert calls == [[0, 2], [1]]  # only the layer not cached is read
    with pytest.raises(SafetyPatchError, match="layer 3 out of range"):
        last_token_states_at(model, prompts, [0, 3])


def test_the_gate_on_the_shared_prefix_path_equals_the_old_one_to_rounding(tiny_dir, tmp_path):
    """The gate's default feature path against the batches of 8 gates were fitted with before:
    the same probe to float rounding, the same decisions on its whole training pool."""
    from safety_patch.data.build import DataConfig, build
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.features import encode, features
    from safety_patch.gate.fit import fit_gate_on_data
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    d = tmp_path / "d"
    build(d, DataConfig(max_per_source=20, distill=False, template_max_chars=400, self_instruct=0, general_limit=40,
                        borderline_train_extra=False), model=str(tiny_dir))
    cfg = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=6)
    new, info = fit_gate_on_data(lm.model, lm.tokenizer, d, cfg)
    old, info_old = fit_gate_on_data(lm.model, lm.tokenizer, d, cfg, batching=None)
    harmful, benign, _ = gate_prompts(d, cfg)
    ids = encode(lm.tokenizer, harmful + benign)
    x_new, x_old = features(lm.model, lm.tokenizer, ids, 1), features(lm.model, lm.tokenizer, ids, 1, batching=None)
    torch.testing.assert_close(x_new, x_old, rtol=1e-5, atol=1e-5)
    # The probe's LBFGS fit turns feature differences of ~1e-6 into weight differences of ~1e-3;
    # what a user sees is the logit and the decision: within 1% of the logits' spread, and a
    # decision differs only for a prompt that close to the threshold.
    z_new, z_old = new.scores(x_new), old.scores(x_old)
    tol = 0.01 * float(z_old.std())
    assert float((z_new - z_old).abs().max()) <= tol and abs(new.threshold - old.threshold) <= tol
    differ = new.fires(x_new) != old.fires(x_old)
    assert bool(((z_old - old.threshold).abs()[differ] <= 2 * tol).all())
    assert torch.equal(old.fires(x_old), old.fires(x_new))  # the same probe: features alone never flip it here
    assert info["validation"]["n"] == info_old["validation"]["n"]
    with pytest.raises(SafetyPatchError, match="gate feature batching 'bogus'"):
        features(lm.model, lm.tokenizer, ids, 1, batching="bogus")
    with pytest.raises(SafetyPatchError, match="gate feature batching True"):
        features(lm.model, lm.tokenizer, ids, 1, batching=True)

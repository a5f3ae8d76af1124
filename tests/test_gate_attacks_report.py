"""The gate report's rule-attack section (gate.pool.attack_prompts / attack_scores / attack_report)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safety_patch.attacks import get_attack
from safety_patch.data.build import DataConfig, build
from safety_patch.errors import SafetyPatchError
from safety_patch.gate.config import GateFitConfig
from safety_patch.gate.features import encode, features
from safety_patch.gate.fit import attack_scores
from safety_patch.gate.folder import fit_gate_folder, read_gate_folder
from safety_patch.gate.pool import RULE_ATTACKS, attack_prompts, held_out_prompts, unseen_attacks

CFG = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=0, written_harmful=False,
                    written_harmful_more=False, written_lookalikes=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("gadata") / "d"
    build(d, DataConfig(max_per_source=30, distill=False, template_max_chars=400, self_instruct=0, general_limit=60,
                        borderline_train_extra=False), model=str(tiny_dir))
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from safety_patch.models import load_model

    return load_model(str(tiny_dir), device="cpu")


def test_unseen_attacks_leave_out_what_the_train_split_used(data_dir):
    used = set(json.loads((data_dir / "manifest.json").read_text())["config"]["train_transforms"])
    got = unseen_attacks(data_dir)
    assert used and not used & set(got) and set(got) | used == set(RULE_ATTACKS)


def test_attack_sets_are_the_split_prompts_under_each_attack(data_dir):
    held = held_out_prompts(data_dir, "val")
    sets = attack_prompts(data_dir, "val", ["past_tense", "prefill", "multi_turn"])
    for name, s in sets.items():
        a = get_attack(name)
        assert len(s["harmful"]) == len(held["harmful_direct"])
        assert len(s["benign"]) == len(held["borderline"]) + len(held["general"])
        for (msgs, prefill), src in zip(s["harmful"], held["harmful_direct"], strict=True):
            att = a.apply(src[-1]["content"])
            assert msgs == list(src[:-1]) + att.messages and prefill == att.prefill
    assert all(p == "Sure, here is" for _, p in sets["prefill"]["harmful"])
    benign = held["borderline"] + held["general"]
    for (m, _), src in zip(sets["multi_turn"]["benign"], benign, strict=True):  # two exchanges, then the prompt
        assert [x["role"] for x in m].count("user") == [x["role"] for x in src].count("user") + 2 and m[-1]["content"].endswith(src[-1]["content"])
    with pytest.raises(SafetyPatchError, match="unknown attack"):
        attack_prompts(data_dir, "val", ["no_such_attack"])


def test_attack_scores_read_where_routing_reads(lm, data_dir, tmp_path):
    gdir = tmp_path / "g"
    fit_gate_folder(lm, data_dir, CFG, gdir)
    gate, _ = read_gate_folder(gdir)
    sets = attack_prompts(data_dir, "val", ["prefill", "base64"])
    z = attack_scores(lm.model, lm.tokenizer, gate, sets)
    # a prefilled prompt is read before its prefill, as generation routes it: the prefill changes nothing
    msgs, pre = sets["prefill"]["harmful"][0]
    assert pre
    want = gate.scores(features(lm.model, lm.tokenizer, encode(lm.tokenizer, [msgs]), gate.layer))
    assert torch.allclose(z["prefill"]["harmful"][:1], want, atol=1e-5)
    assert len(z["base64"]["benign"]) == len(sets["base64"]["benign"])


def test_gate_eval_runs_the_unseen_attacks_by_default(lm, data_dir, tiny_dir, tmp_path, capsys):
    from safety_patch.cli import main

    gdir = tmp_path / "g"
    fit_gate_folder(lm, data_dir, CFG, gdir)
    out = tmp_path / "r.json"
    assert main(["gate", "eval", "--gate", str(gdir), "--data", str(data_dir), "--model", str(tiny_dir),
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert sorted(rep["attacks"]) == sorted(unseen_attacks(data_dir))
    for a in rep["attacks"].values():
        assert a["caught"]["n"] == rep["n"]["harmful_direct"]
        assert a["fired_on_benign"]["n"] == rep["n"]["borderline"] + rep["n"]["general"]
        assert len(a["caught"]["ci95"]) == 2
    assert "attack (unseen rules)" in capsys.readouterr().out
    assert main(["gate", "eval", "--gate", str(gdir), "--data", str(data_dir), "--model", str(tiny_dir),
                 "--attacks", "none", "--out", str(out), "--overwrite"]) == 0  # a results file of gate eval
    assert "attacks" not in json.loads(out.read_text())
    assert main(["gate", "eval", "--gate", str(gdir), "--data", str(data_dir), "--model", str(tiny_dir),
                 "--attacks", "gcg"]) == 2


def test_reask_turns_each_form_into_the_other():
    import random

    from safety_patch.gate.phrasings import reask

    rng = random.Random(0)
    for _ in range(5):
        q = reask("How can I pick a lock?", rng)
        assert not q.endswith("?") and "pick a lock" in q and q != "How can I pick a lock?"
        i = reask("Write a poem about the sea.", rng)
        assert "write a poem about the sea" in i and i != "Write a poem about the sea."
        o = reask("What is the capital of France?", rng)
        assert o.endswith("What is the capital of France?") and o != "What is the capital of France?"
    ctx = reask("Some context here.\n\nWrite an email to Laura", rng)
    assert ctx.startswith("Some context here.\n\n") and "write an email to Laura" in ctx


def test_rephrased_prompts_join_both_sides_last_with_their_sources(data_dir):
    from safety_patch.gate.pool import _gate_pool

    h0, b0, c0, s0 = _gate_pool(data_dir, CFG)
    h1, b1, c1, s1 = _gate_pool(data_dir, GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4,
                                                       rephrased=5))
    assert c1["rephrased_harmful"] == 5 and c1["rephrased_benign"] == 5
    assert h1[: len(h0)] == h0 and b1[: len(b0)] == b0 and s1[: len(s0)] == s0  # earlier draws unchanged
    assert len(s1) == len(h1) and all(s is not None for s in s1[len(s0):])
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in h1[len(h0):] + b1[len(b0):])
    with pytest.raises(SafetyPatchError, match="rephrased"):
        GateFitConfig(rephrased=-1).validate()


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60)
       .filter(lambda t: t.strip().strip(" .!?")),  # a request with words in it (not only e.g. U+00A0)
       family=st.sampled_from(["context", "third_person", "hedged", "terse"]), seed=st.integers(0, 99))
def test_each_frame_keeps_the_request_and_the_context_lines(text, family, seed):
    """A frame adds words around the request, never drops or rewrites it (beyond the first
    letter's case and, for terse, the final punctuation), and keeps earlier lines as they were."""
    import random

    from safety_patch.gate.phrasings import rephrase

    q = text.strip()
    out = rephrase("Context line.\n" + text, family, random.Random(seed))
    assert out.startswith("Context line.\n")
    core = q.rstrip(" .!?") if family == "terse" else q
    assert core[1:] in out and core[:1].lower() in out.lower()


def test_written_harmful_requests_join_last_as_a_third_source_and_a_loso_fold(data_dir, lm, tmp_path, monkeypatch):
    """gate.written_harmful: the hand-written requests (as written, then re-asked) come last on
    the harmful side with source 'written'; earlier draws are unchanged; the pool's other features
    come from the cache of a fit without them; leave-one-source-out gets a 'written' fold
    measured on the requests as written (no wrapped rows)."""
    import safety_patch.gate.crossfit as gate_crossfit
    import safety_patch.gate.features as gate_features
    import safety_patch.gate.fit as gate_fit
    import safety_patch.gate.pool as gate_pool
    from safety_patch.data.prompts import gate_harmful_prompts

    assert GateFitConfig().written_harmful is True  # the default since session 14
    base = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=3, threshold=0.0,
                         target_fpr=None, family_fpr=None, written_harmful=False,
                         written_harmful_more=False, written_lookalikes=False)
    on = GateFitConfig(**{**base.__dict__, "written_harmful": True})
    h0, b0, c0, s0 = gate_pool._gate_pool(data_dir, base)
    h1, b1, c1, s1 = gate_pool._gate_pool(data_dir, on)
    reqs = [r["prompt"] for r in gate_harmful_prompts()]
    assert len(reqs) >= 100 and len(set(reqs)) == len(reqs)
    assert h1[: len(h0)] == h0 and b1 == b0 and s1[: len(s0)] == s0 and c1["written_harmful"] == 2 * len(reqs)
    assert [m[0]["content"] for m in h1[len(h0): len(h0) + len(reqs)]] == reqs
    assert set(s1[len(s0):]) == {gate_pool.WRITTEN_SOURCE} and len(s1) == len(h1)
    with pytest.raises(SafetyPatchError, match="written_harmful"):
        GateFitConfig(written_harmful="yes").validate()
    # a hand-written request near a held-out (val/test) request of the folder is dropped, and counted
    import safety_patch.data.prompts as dp
    from safety_patch.jsonl import read_jsonl

    val_req = read_jsonl(data_dir / "val.jsonl")[0]["meta"]["request"]
    monkeypatch.setattr(dp, "gate_harmful_prompts", lambda: [{"category": "x", "prompt": val_req + "!"},
                                                             {"category": "y", "prompt": reqs[0]}])
    h2, _, c2, _ = gate_pool._gate_pool(data_dir, on)
    assert c2["written_near_eval"] == 1 and c2["written_harmful"] == 2
    assert [m[0]["content"] for m in h2[len(h0):len(h0) + 1]] == [reqs[0]]
    monkeypatch.undo()

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    gate_fit.fit_gate_on_data(lm.model, lm.tokenizer, data_dir, base, validate=False, fingerprint=lm.fingerprint)
    real, read = gate_features.features_at, []
    monkeypatch.setattr(gate_features, "features_at", lambda m, t, prompts, *a, **k: read.append(len(prompts)) or real(m, t, prompts, *a, **k))
    gate_fit.fit_gate_on_data(lm.model, lm.tokenizer, data_dir, on, validate=False, fingerprint=lm.fingerprint)
    assert read == [2 * len(reqs)]  # only the hand-written prompts were read
    rep = gate_crossfit.leave_one_source_out(lm.model, lm.tokenizer, data_dir, on, "val")
    w = rep["sources"][gate_pool.WRITTEN_SOURCE]
    assert w["direct_vs_benign"]["auroc"]["n_pos"] == len(reqs) and "wrapped_vs_wrapped_benign" not in w
    assert w["train_harmful_without"] == len(h0)


def test_more_written_harmful_requests_join_the_written_source_and_lookalikes_come_last_on_the_benign_side(
        data_dir, lm, tmp_path, monkeypatch):
    """gate.written_harmful_more: the second harmful file follows the first in the written source (the
    first file's prompts and re-askings keep their places and draws), the safe look-alikes come
    last on the benign side (gate.written_lookalikes), as written then re-asked; a look-alike near a held-out benign prompt
    is dropped and counted; only the new prompts are read when the pool without them is cached;
    the config is refused without the written source."""
    import safety_patch.data.prompts as dp
    import safety_patch.gate.config as gate_config
    import safety_patch.gate.crossfit as gate_crossfit
    import safety_patch.gate.features as gate_features
    import safety_patch.gate.pool as gate_pool

    assert (GateFitConfig().written_harmful_more, GateFitConfig().written_lookalikes) == (True, True)  # the default
    base = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=3, threshold=0.0,
                         target_fpr=None, family_fpr=None, written_harmful_more=False, written_lookalikes=False)
    on = GateFitConfig(**{**base.__dict__, "written_harmful_more": True, "written_lookalikes": True})
    h0, b0, c0, s0 = gate_pool._gate_pool(data_dir, base)
    h1, b1, c1, s1 = gate_pool._gate_pool(data_dir, on)
    first = [r["prompt"] for r in dp.gate_harmful_prompts()]
    more = [r["prompt"] for r in dp.gate_harmful_more_prompts()]
    looks = [r["prompt"] for r in dp.gate_lookalike_prompts()]
    assert (len(more), len(looks)) == (144, 176) and not set(more) & set(first) and len(set(looks)) == len(looks)
    n_w0 = c0["written_harmful"] // 2
    k = len(h0) - 2 * n_w0  # the prompts before the written source
    assert h1[:k] == h0[:k] and b1[: len(b0)] == b0 and s1[:k] == s0[:k]
    assert [m[0]["content"] for m in h1[k: k + n_w0 + len(more)]] == first[:n_w0] + more
    assert h1[k + n_w0 + len(more): k + 2 * n_w0 + len(more)] == h0[k + n_w0:]  # the first file's re-askings as before
    assert set(s1[k:]) == {gate_pool.WRITTEN_SOURCE} and len(s1) == len(h1) == len(h0) + 2 * len(more)
    assert c1["written_lookalikes"] == 2 * len(looks) and c1["written_lookalikes_near_eval"] == 0
    h_l, b_l, _, s_l = gate_pool._gate_pool(data_dir, GateFitConfig(**{**base.__dict__, "written_lookalikes": True}))
    assert (h_l, s_l, b_l[: len(b0)]) == (h0, s0, b0) and len(b_l) == len(b1)  # each file on its own
    assert [m[0]["content"] for m in b1[len(b0): len(b0) + len(looks)]] == looks and len(b1) == len(b0) + 2 * len(looks)
    for bad, match in (({"written_lookalikes": "yes"}, "written_lookalikes"), ({"written_harmful_more": 1}, "written_harmful_more"),
                       ({"written_harmful_more": True, "written_harmful": False}, "written_harmful is off")):
        with pytest.raises(SafetyPatchError, match=match):
            GateFitConfig(**bad).validate()
    # a look-alike near a held-out benign prompt of the folder is dropped, and counted
    from safety_patch.data.folder import DataFolder

    held = DataFolder.of(data_dir).prompts("borderline", "val")[0][-1]["content"]
    monkeypatch.setattr(dp, "gate_lookalike_prompts", lambda: [{"category": "x", "prompt": held + "!"},
                                                               {"category": "y", "prompt": looks[0]}])
    _, b2, c2, _ = gate_pool._gate_pool(data_dir, on)
    assert c2["written_lookalikes_near_eval"] == 1 and c2["written_lookalikes"] == 2
    assert b2[len(b0)][0]["content"] == looks[0]
    monkeypatch.undo()

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    base_x = gate_features.pool_features(lm.model, lm.tokenizer, h0, b0, c0, [1], gate_config.BATCHING, lm.fingerprint)
    real, read = gate_features.features_at, []
    monkeypatch.setattr(gate_features, "features_at", lambda m, t, prompts, *a, **kw: read.append(len(prompts)) or real(m, t, prompts, *a, **kw))
    x1 = gate_features.pool_features(lm.model, lm.tokenizer, h1, b1, c1, [1], gate_config.BATCHING, lm.fingerprint)
    assert read == [c1["written_harmful"], c1["written_lookalikes"]]  # the pool without them came from the cache
    assert torch.equal(x1[:k], base_x[:k]) and torch.equal(x1[len(h1): len(h1) + len(b0)], base_x[len(h0):])
    plain = gate_features.features_at(lm.model, lm.tokenizer, gate_features.encode(lm.tokenizer, h1 + b1), [1])[1]
    assert torch.allclose(x1, plain, atol=1e-4)
    # the written source's leave-one-source-out fold scores both files' requests when the pool holds both
    monkeypatch.undo()
    for cfg, n in ((base, len(first)), (on, len(first) + len(more))):
        w = gate_crossfit.leave_one_source_out(lm.model, lm.tokenizer, data_dir, cfg, "val")["sources"][gate_pool.WRITTEN_SOURCE]
        assert w["direct_vs_benign"]["auroc"]["n_pos"] == n


def test_phrasing_families_draw_in_order_and_unknown_ones_fail(data_dir):
    from safety_patch.gate.pool import _gate_pool

    one = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=5, written_harmful=False,
                        written_harmful_more=False, written_lookalikes=False)
    two = GateFitConfig(layer=1, self_instruct=0, wrapped_benign=6, wrapped_harmful=4, rephrased=5,
                        phrasings=["reask", "context"], written_harmful=False,
                        written_harmful_more=False, written_lookalikes=False)
    h1, b1, c1, s1 = _gate_pool(data_dir, one)
    h2, b2, c2, s2 = _gate_pool(data_dir, two)
    assert h2[: len(h1)] == h1 and b2[: len(b1)] == b1 and s2[: len(s1)] == s1  # the first family's draw is unchanged
    assert [c2[f"rephrased_{side}_{f}"] for f in ("reask", "context") for side in ("harmful", "benign")] == [5] * 4
    assert not any(k.startswith("rephrased_harmful_") for k in c1)
    assert len(h2) == len(h1) + 5 and len(b2) == len(b1) + 5 and len(s2) == len(h2)
    for bad in (["nope"], [], ["reask", "reask"], "reask"):
        with pytest.raises(SafetyPatchError, match="phrasings"):
            GateFitConfig(phrasings=bad).validate()



def test_generation_routes_a_prefilled_prompt_on_the_prompt_alone(tmp_path):
    """A prefill is requester-written text: the gate reads the prompt before it, so a prefilled
    request takes the route of the same request without the prefill, and the answer continues
    the prefill with that route's model."""
    from unittest import mock

    from safety_patch.generation import GenerationConfig, generate, render
    from safety_patch.patched import PatchedModel
    from safety_patch.patches import attached
    from safety_patch.testing import tiny_llama
    from test_gate import HARM, SAFE, _gated_patch

    model, tok = tiny_llama()
    p, _ = _gated_patch(model, tok, tmp_path / "g")
    convs = [[{"role": "user", "content": t}] for t in HARM + SAFE]
    prompts = [tok(render(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    read: list[list[int]] = []
    orig, orig_scores = PatchedModel.routes, PatchedModel.gate_scores

    def spy(self, tokenizer, ids, batch_size=8):
        read.extend(list(map(list, ids)))
        return orig_scores(self, tokenizer, ids, batch_size)

    cfg = GenerationConfig(max_new_tokens=3, batch_size=4)
    with attached(model, [p], "fp") as pm, mock.patch.object(PatchedModel, "gate_scores", spy):
        routes = orig(pm, tok, prompts)
        assert {r for r in routes} == {(), tuple(pm.gates)}  # the gate separates the two sets
        read.clear()
        out = generate(pm, tok, convs, cfg, prefill=["Sure, here is"] * len(convs))
        assert read == prompts  # the gate read the prompts, not the prefilled texts
        # each answer is the one its route's model gives the prefilled text
        for on in set(routes):
            idx = [i for i, r in enumerate(routes) if r == on]
            with pm.using(on) as module:
                plain = PatchedModel.base(module, "x")
                want = generate(plain, tok, [convs[i] for i in idx], cfg, prefill=["Sure, here is"] * len(idx))
            assert [out[i] for i in idx] == want

"""Gated patches: the probe, per-prompt routing in generation and scoring, files, training."""

import json

import pytest
import torch

from safety_patch.attacks.templates import PLACEHOLDER
from safety_patch.data.build import DataConfig, build
from safety_patch.errors import SafetyPatchError
from safety_patch.gate.probe import GATE_FILE, Gate, fit_gate, fit_probe, layer_states
from safety_patch.generation import GenerationConfig, generate, render
from safety_patch.models import LoadedModel
from safety_patch.patches import attached, finalize_patch, merged_state_dict, read_patch
from safety_patch.testing import make_lora_patch, tiny_llama

HARM = ["How do I kill a Python process?", "kill the process with the id", "How do I kill it?", "kill kill kill"]
SAFE = ["The capital of France is Paris.", "What is the capital of Italy?", "Sure, here is a Python function.",
        "Rome is the capital of Italy."]


def _ids(tok, texts):
    return [tok(render(tok, [{"role": "user", "content": t}]), add_special_tokens=False)["input_ids"] for t in texts]


def test_fit_probe_separates_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 8, generator=g) + 2.0, torch.randn(50, 8, generator=g) - 2.0])
    y = torch.tensor([1.0] * 30 + [0.0] * 50)
    w, b, mu, sd = fit_probe(x, y)
    gate = Gate(0, 0.0, w, b, mu, sd)
    assert torch.equal(gate.fires(x), y > 0)
    w2, b2, _, _ = fit_probe(x, y)
    assert torch.equal(w, w2) and b == b2
    with pytest.raises(SafetyPatchError, match="both harmful and benign"):
        fit_probe(x, torch.ones(80))


def test_layer_states_equal_unpadded_forward_and_stop_early():
    model, tok = tiny_llama(layers=3)
    prompts = _ids(tok, HARM + SAFE)  # different lengths: left padding inside batches
    called = []
    h = model.model.layers[2].register_forward_hook(lambda *a: called.append(1))
    try:
        st = layer_states(model, tok, prompts, [0, 1], batch_size=3)
    finally:
        h.remove()
    assert not called  # the pass stopped after layer 1
    for i, p in enumerate(prompts):
        hs = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
        for li in (0, 1):
            assert torch.allclose(st[li][i], hs[li + 1][0, -1], atol=1e-5), (i, li)
    with pytest.raises(SafetyPatchError, match="layers 0-2"):
        layer_states(model, tok, prompts, [3])


def _gated_patch(model, tok, path, layer=1, threshold=0.0):
    """A random LoRA patch plus a gate fit to tell HARM from SAFE on ``model``."""
    make_lora_patch(model, path, "fp", seed=1, scale=0.5)
    gate, stats = fit_gate(model, tok, [render(tok, [{"role": "user", "content": t}]) for t in HARM],
                           [render(tok, [{"role": "user", "content": t}]) for t in SAFE], layer, threshold)
    gate.save(path)
    finalize_patch(path, "lora", {"name": "test", "fingerprint": "fp"}, method="lora", gate=stats)
    return read_patch(path), gate


def test_gated_generation_uses_base_or_adapter_per_prompt(tmp_path):
    model, tok = tiny_llama()
    p, gate = _gated_patch(model, tok, tmp_path / "g")
    ungated = make_lora_patch(model, tmp_path / "u", "fp", seed=1, scale=0.5)  # the same adapter, no gate
    prompts = HARM + SAFE
    fires = gate.fires(layer_states(model, tok, _ids(tok, prompts), [1])[1]).tolist()
    assert any(fires) and not all(fires)  # the test splits the prompts
    convs = [[{"role": "user", "content": t}] for t in prompts]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=1)  # batch 1: no padding noise between runs
    base = generate(model, tok, convs, cfg)
    with attached(model, [read_patch(ungated)]) as m:
        adapted = generate(m, tok, convs, cfg)
    assert base != adapted
    with attached(model, [p]) as m:
        gated = generate(m, tok, convs, cfg)
        assert list(m.gates) == ["patch0"] and m.can_mix  # the patched value carries the gate
    assert gated == [a if f else b for a, b, f in zip(adapted, base, fires, strict=True)]
    assert generate(model, tok, convs, cfg) == base  # detached: the base again


def test_gated_teacher_forced_scoring_reads_the_prompt_only(tmp_path):
    from safety_patch.evaluation.capability import _encode_pairs, answer_logprobs

    model, tok = tiny_llama()
    p, gate = _gated_patch(model, tok, tmp_path / "g")
    ungated = read_patch(make_lora_patch(model, tmp_path / "u", "fp", seed=1, scale=0.5))
    pairs = [{"messages": [{"role": "user", "content": t}], "reference": "Sure, here is the capital."} for t in HARM + SAFE]
    enc = _encode_pairs(tok, pairs, 512)
    fires = gate.fires(layer_states(model, tok, [s[:n] for s, n in enc], [1])[1]).tolist()
    base, _, _ = answer_logprobs(model, tok, enc, batch_size=1)
    with attached(model, [ungated]) as m:
        adapted, _, _ = answer_logprobs(m, tok, enc, batch_size=1)
    with attached(model, [p]) as m:
        gated, _, _ = answer_logprobs(m, tok, enc, batch_size=3)
    for g, a, b, f in zip(gated, adapted, base, fires, strict=True):
        assert g == pytest.approx(a if f else b, abs=1e-4)


def test_gated_patch_files_are_checked_and_it_cannot_be_merged(tmp_path):
    model, tok = tiny_llama()
    p, gate = _gated_patch(model, tok, tmp_path / "g")
    assert GATE_FILE in p.meta["files"] and p.gated and p.meta["gate"]["layer"] == 1
    with pytest.raises(SafetyPatchError, match="gated patch.*cannot be folded"):
        merged_state_dict(model, [p], None)
    # editing the threshold changes the file, which patch.json's hash catches
    Gate(gate.layer, gate.threshold + 5, gate.weight, gate.bias, gate.mean, gate.std).save(tmp_path / "g")
    with pytest.raises(SafetyPatchError, match="sha256 differs"):
        read_patch(tmp_path / "g")
    (tmp_path / "g" / GATE_FILE).unlink()
    with pytest.raises(SafetyPatchError, match=f"missing {GATE_FILE}"):
        read_patch(tmp_path / "g")


def test_lm_eval_refuses_a_gated_patch(tmp_path):
    from safety_patch.evaluation.lm_eval_adapter import evaluate_lm_eval

    model, tok = tiny_llama()
    _gated_patch(model, tok, tmp_path / "g")
    with pytest.raises(SafetyPatchError, match="gated patch; lm-eval cannot apply its gate"):
        evaluate_lm_eval("default", [tmp_path / "g"], ["hellaswag"], 1, 1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("gdata") / "d"
    build(d, DataConfig(max_per_source=30, distill=True, distill_max_new_tokens=4, template_max_chars=400,
                        self_instruct=0), model=str(tiny_dir))
    return d


def test_gate_prompts_come_from_the_train_split_only(data_dir):
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.jsonl import read_jsonl

    harmful, benign, counts = gate_prompts(data_dir, GateFitConfig(rephrased=0, wrapped_benign=5, wrapped_harmful=0, self_instruct=0,
                                                                written_harmful=False, written_harmful_more=False,
                                                                written_lookalikes=False))
    train_prompts = {r["messages"][0]["content"] for r in read_jsonl(data_dir / "train.jsonl")}
    assert {m[-1]["content"] for m in harmful} == train_prompts
    held_out = {r["messages"][0]["content"] for f in ("borderline.jsonl", "general.jsonl")
                for r in read_jsonl(data_dir / f) if r["meta"]["split"] != "train"}
    held_out |= {r["meta"]["request"] for f in ("val.jsonl", "test.jsonl") for r in read_jsonl(data_dir / f)}
    assert counts["wrapped_benign"] == 5 and len(benign) == counts["benign"] + 5
    plain = benign[: counts["benign"]]
    assert not {m[-1]["content"] for m in plain} & held_out
    # the wrapped ones hold a plain train prompt inside a train template
    train_templates = [t["text"] for t in read_jsonl(data_dir / "templates.jsonl") if t["split"] == "train"]
    plain_prompts = [p[-1]["content"] for p in plain]
    for m in benign[counts["benign"]:]:
        text = m[-1]["content"]
        # exactly one train template around exactly one plain train prompt (both, not either)
        assert any(text == t.replace(PLACEHOLDER, q) for t in train_templates for q in plain_prompts if q in text)


def test_gate_prompts_take_self_written_requests_as_negatives(data_dir, tmp_path):
    import shutil

    from safety_patch.atomic import write_jsonl
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.train.config import TrainConfig, override

    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    with pytest.raises(SafetyPatchError, match=r"selfinstruct.jsonl not found: gate.self_instruct 2 .*`gate fit --self-instruct 0`"):
        gate_prompts(d, GateFitConfig(rephrased=0, self_instruct=2, wrapped_harmful=0))
    si = [f"Plan a picnic for {n} friends." for n in range(5)]
    write_jsonl(d / "selfinstruct.jsonl", [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sure."}],
                                           "meta": {"source": "self-instruct", "split": "train"}} for p in si])
    small = dict(rephrased=0, wrapped_benign=0, wrapped_harmful=0, written_lookalikes=False)  # look-alikes would come last
    _, plain, c0 = gate_prompts(d, GateFitConfig(self_instruct=0, **small))
    harmful, benign, c = gate_prompts(d, GateFitConfig(self_instruct=3, **small))
    # the first N requests join the negatives, as bare user turns; nothing else changes
    assert c["self_instruct"] == 3 and c["benign"] == c0["benign"] + 3 and "self_instruct" not in c0
    assert benign[:len(plain)] == plain and [m[-1]["content"] for m in benign[len(plain):]] == si[:3]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in benign[len(plain):])
    write_jsonl(d / "selfinstruct.jsonl", [{"messages": [{"role": "assistant", "content": "x"}], "meta": {}}])
    with pytest.raises(SafetyPatchError, match="selfinstruct.jsonl:1: expected 'messages' ending with an assistant turn"):
        gate_prompts(d, GateFitConfig(rephrased=0, self_instruct=1, wrapped_harmful=0))
    write_jsonl(d / "selfinstruct.jsonl", [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sure."}],
                                           "meta": {}} for p in si[:2]]
                + [{"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}], "meta": {}}])
    with pytest.raises(SafetyPatchError, match="selfinstruct.jsonl:3: expected a user turn before the answer"):
        gate_prompts(d, GateFitConfig(rephrased=0, self_instruct=3, wrapped_harmful=0))
    assert gate_prompts(d, GateFitConfig(rephrased=0, self_instruct=2, wrapped_harmful=0))[2]["self_instruct"] == 2  # rows past N are not read
    with pytest.raises(SafetyPatchError, match="--gate-self-instruct must be >= 0"):
        override(TrainConfig(), {"gate.self_instruct": -1}).validate()


def test_gate_prompts_wrap_harmful_train_requests_in_train_templates(data_dir):
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.pool import gate_prompts
    from safety_patch.jsonl import read_jsonl

    no_written = dict(written_harmful=False, written_harmful_more=False, written_lookalikes=False)
    h0, b0, c0 = gate_prompts(data_dir, GateFitConfig(rephrased=0, wrapped_benign=5, wrapped_harmful=0, self_instruct=0, **no_written))
    h, b, c = gate_prompts(data_dir, GateFitConfig(rephrased=0, wrapped_benign=5, wrapped_harmful=7, self_instruct=0, **no_written))
    assert b == b0 and h[: len(h0)] == h0 and c["wrapped_harmful"] == 7 and len(h) == len(h0) + 7
    requests = {r["meta"]["request"] for r in read_jsonl(data_dir / "train.jsonl")}
    held_out = {r["meta"]["request"] for f in ("val.jsonl", "test.jsonl") for r in read_jsonl(data_dir / f)}
    templates = [t["text"] for t in read_jsonl(data_dir / "templates.jsonl") if t["split"] == "train"]
    for m in h[len(h0):]:
        text = m[-1]["content"]
        inside = [q for q in requests if q in text]
        assert inside and not any(q in text for q in held_out)
        # what is left around the request is a train template
        assert any(text == t.replace(PLACEHOLDER, q) for t in templates for q in inside)


def test_train_writes_a_gated_patch(data_dir, tiny_dir, tmp_path):
    from peft import PeftModel

    from safety_patch.gate.config import GateFitConfig
    from safety_patch.models import load_model
    from safety_patch.train.config import TrainConfig, override
    from safety_patch.train.run import train

    # the test folder has no self-written requests: the gate's pool is train prompts and 4 wrapped ones
    pool = {"gate.self_instruct": 0, "gate.wrapped_harmful": 0, "gate.threshold": 1.0}
    cfg = override(TrainConfig(), pool | {"data.max_train_rows": 8, "optim.batch_size": 4, "data.max_seq_len": 512,
                                          "optim.lr": 1e-3, "gate.layer": 1, "gate.wrapped_benign": 4,
                                          "optim.snapshot_steps": "2"})  # step 1 is the warmup's lr-0 step: an all-zero adapter, refused
    meta = train(data_dir, tmp_path / "p", cfg, model=str(tiny_dir), progress=False)
    g = meta["gate"]
    assert g["layer"] == 1 and g["prompts"]["wrapped_benign"] == 4 and 0 <= g["train_benign_flagged"] <= 1
    assert set(meta["files"]) == {"adapter_config.json", "adapter_model.safetensors", GATE_FILE}
    snap = read_patch(tmp_path / "p" / "snapshots" / "step-2")
    assert snap.gated and snap.meta["files"][GATE_FILE] == meta["files"][GATE_FILE]
    lm = load_model(str(tiny_dir), device="cpu")
    PeftModel.from_pretrained(lm.model, str(tmp_path / "p"))  # the adapter folder is a plain PEFT adapter
    with pytest.raises(SafetyPatchError, match="gate_layer 2: the model has layers 0-1"):
        train(data_dir, tmp_path / "q", override(TrainConfig(), pool | {"data.max_train_rows": 8, "gate.layer": 2}),
              model=str(tiny_dir), progress=False)
    # a full-parameter run behind the same gate is a real run: a gated delta, routed per prompt
    full = train(data_dir, tmp_path / "full", override(TrainConfig(), pool | {
        "method": "full", "data.max_train_rows": 8, "optim.batch_size": 4, "data.max_seq_len": 512, "optim.lr": 1e-3,
        "gate.layer": 1, "gate.wrapped_benign": 4}), model=str(tiny_dir), progress=False)
    assert full["format"] == "delta" and set(full["files"]) == {"delta.safetensors", GATE_FILE}
    assert full["files"][GATE_FILE] == meta["files"][GATE_FILE]  # the same gate: same data, seed and settings
    fp = read_patch(tmp_path / "full")
    assert fp.gated and fp.format == "delta"
    with pytest.raises(SafetyPatchError, match="--gate-depth must be in"):
        override(TrainConfig(), {"gate.depth": 1.5}).validate()
    # depth resolves against the model; an explicit layer wins
    assert GateFitConfig(depth=0.5).resolved_layer(30) == 15 and GateFitConfig(depth=1.0).resolved_layer(2) == 1
    assert GateFitConfig(depth=0.5, layer=3).resolved_layer(30) == 3
    assert not (tmp_path / "q").exists()


def test_cli_gate_flags(data_dir, tiny_dir, tmp_path):
    from safety_patch.cli import main

    # two steps: a one-step run's only update has the warmup's lr 0, an all-zero adapter that is refused
    common = ["train", "--data", str(data_dir), "--model", str(tiny_dir), "--max-train-rows", "8", "--batch-size", "4"]
    # the folder has no selfinstruct.jsonl: the recipe's 600 self-written negatives are turned off
    assert main(common + ["--out", str(tmp_path / "a"), "--recipe", "default", "--gate-layer", "0",
                          "--gate-threshold", "2.5", "--gate-self-instruct", "0", "--gate-wrapped-harmful", "3",
                          "--gate-wrapped-benign", "2"]) == 0
    meta = json.loads((tmp_path / "a" / "patch.json").read_text())
    assert meta["gate"]["layer"] == 0 and meta["gate"]["threshold"] == 2.5
    assert meta["gate"]["prompts"]["wrapped_harmful"] == 3 and meta["gate"]["prompts"]["wrapped_benign"] == 2
    assert "self_instruct" not in meta["gate"]["prompts"]
    assert main(common + ["--out", str(tmp_path / "b"), "--gate-layer", "-1"]) == 0  # the default, ungated (deprecated spelling of --no-gate)
    assert "gate" not in json.loads((tmp_path / "b" / "patch.json").read_text())


def test_loaded_model_wrapper_keeps_gates(tmp_path):
    """CLI paths (chat, eval) attach through LoadedModel; the gate must come along."""
    from safety_patch.patches import attach_for_inference

    model, tok = tiny_llama()
    _gated_patch(model, tok, tmp_path / "g")
    lm = LoadedModel.from_objects(model, tok)
    pm = attach_for_inference(lm, [tmp_path / "g"], force=True)
    try:
        assert list(pm.gates) == ["patch0"] and pm.key == pm.patches[0].id
        assert lm.model is model  # the LoadedModel stays the base: nothing swapped in or set on it
    finally:
        pm.close()
    assert not any("lora" in n for n, _ in model.named_modules())  # detached


def test_cli_patch_gate_routes_like_the_gate(tiny_dir, tmp_path, capsys):
    from safety_patch.cli import main
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    _, gate = _gated_patch(lm.model, lm.tokenizer, tmp_path / "g")
    prompts = HARM + SAFE
    fires = gate.fires(layer_states(lm.model, lm.tokenizer, _ids(lm.tokenizer, prompts), [1])[1]).tolist()
    args = ["patch", "gate", str(tmp_path / "g"), "--model", str(tiny_dir), "--force"]
    assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    head, *lines = capsys.readouterr().out.splitlines()[: len(prompts) + 1]
    assert head.split() == ["route", "logit", "margin", "prompt"]
    assert [ln.startswith("adapter") for ln in lines] == fires
    for ln in lines:  # margin = logit - threshold
        logit, margin = map(float, ln.split()[1:3])
        assert margin == pytest.approx(logit - gate.threshold, abs=0.011)
    # --system: the prompt rendered with the deployment's system prompt, as serve and chat render it
    # (a user's trial found "You are terse." moving "Hi" over the default gate's threshold)
    from safety_patch.generation import conversation, render

    sys_ids = [lm.tokenizer(render(lm.tokenizer, conversation(p, "Be terse.")), add_special_tokens=False)["input_ids"]
               for p in prompts]
    with_sys = gate.scores(layer_states(lm.model, lm.tokenizer, sys_ids, [1])[1]).tolist()
    plain = gate.scores(layer_states(lm.model, lm.tokenizer, _ids(lm.tokenizer, prompts), [1])[1]).tolist()
    want = [max(a, b) for a, b in zip(with_sys, plain, strict=True)]  # routed as chat/eval/serve route: either view
    assert with_sys != pytest.approx(plain, abs=1e-3)  # the system prompt does move the logit here
    assert main(args + ["--system", "Be terse."] + [a for p in prompts for a in ("--prompt", p)]) == 0
    got = [float(ln.split()[1]) for ln in capsys.readouterr().out.splitlines()[1: len(prompts) + 1]]
    assert got == pytest.approx(want, abs=0.006)
    assert main(args + ["--system", " ", "--prompt", "hi"]) == 2 and "--system is empty" in capsys.readouterr().err
    make_lora_patch(lm.model, tmp_path / "u", lm.fingerprint)
    assert main(["patch", "gate", str(tmp_path / "u"), "--model", str(tiny_dir), "--prompt", "hi"]) == 2
    assert "has no gate" in capsys.readouterr().err


def test_redteam_round_refuses_a_gated_stack_before_attacking(data_dir, tiny_dir, tmp_path):
    from safety_patch.models import load_model
    from safety_patch.redteam import run_round

    lm = load_model(str(tiny_dir), device="cpu")
    _gated_patch(lm.model, lm.tokenizer, tmp_path / "g")
    with pytest.raises(SafetyPatchError, match="gated patch: a round trains on top"):
        run_round(str(tiny_dir), [tmp_path / "g"], "direct", data_dir, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()


def test_eval_records_carry_the_route_their_answer_took_cached_or_not(tmp_path):
    """`eval` of a gated patch did not say which prompts the gate sent to the adapter: a miss of the
    gate and a refusal the adapter did not give read the same. Each record now carries the gate
    logits the routing used and what it switched on, also when the answer comes from the cache."""
    from safety_patch.evaluation.safety import EvalConfig, run_overrefusal, table
    from safety_patch.generation import GenerationCache
    from safety_patch.judges.keyword import KeywordJudge

    model, tok = tiny_llama()
    p, gate = _gated_patch(model, tok, tmp_path / "g")
    prompts = [{"set": "h" if t in HARM else "s", "category": "c", "messages": [{"role": "user", "content": t}]}
               for t in HARM + SAFE]
    want = gate.scores(layer_states(model, tok, _ids(tok, HARM + SAFE), [1])[1]).tolist()
    cfg = EvalConfig(max_new_tokens=4, batch_size=1)
    cache = GenerationCache(tmp_path / "gen.sqlite")
    with attached(model, [p], fingerprint="fp") as m:
        fresh = run_overrefusal(m, tok, prompts, cfg, cache, "gated", KeywordJudge())
        cached = run_overrefusal(m, tok, prompts, cfg, cache, "gated", KeywordJudge())
        uncached = run_overrefusal(m, tok, prompts, cfg, None, "gated", KeywordJudge())
    routes = [r["route"] for r in fresh["records"]]
    assert [r["route"] for r in cached["records"]] == routes  # the cache gives back the route it stored
    # generated again in one call, not in the cache's chunks: the routing pass reads other prompts beside
    # each one, which moves a logit's last bits only (as in any batched pass), and the routes are the same
    again = [r["route"] for r in uncached["records"]]
    assert [r["on"] for r in again] == [r["on"] for r in routes]
    assert max(abs(a["logits"]["patch0"] - r["logits"]["patch0"]) for a, r in zip(again, routes, strict=True)) < 1e-5
    for r, z in zip(routes, want, strict=True):
        assert abs(r["logits"]["patch0"] - z) < 1e-4 and r["on"] == (["patch0"] if z > gate.threshold else [])
    n_on = sum(bool(r["on"]) for r in routes)
    assert 0 < n_on < len(routes)
    routing = fresh["aggregates"]["routing"]
    assert (routing["routed"]["k"], routing["routed"]["n"]) == (n_on, len(routes))
    assert routing["routed_per_set"]["h"]["n"] == len(HARM)
    assert routing["labels_when_routed"]["n"] + routing["labels_when_not_routed"]["n"] == len(routes)
    assert "gate routing" in table({"kind": "safety-patch/eval-overrefusal", "runs": {"patched": fresh}})
    # an answer cached before routes were recorded is generated again, not served without its route
    cache.db.execute("DELETE FROM route")
    cache.db.commit()
    with attached(model, [p], fingerprint="fp") as m:
        again = run_overrefusal(m, tok, prompts, cfg, cache, "gated", KeywordJudge())
    assert [r["route"] for r in again["records"]] == routes
    with attached(model, [make_lora_patch(model, tmp_path / "u", "fp", seed=1)], fingerprint="fp") as m:
        plain = run_overrefusal(m, tok, prompts, cfg, cache, "always", KeywordJudge())
    assert all("route" not in r for r in plain["records"]) and "routing" not in plain["aggregates"]


def test_a_system_prompt_can_add_routing_never_remove_it(tmp_path):
    """Found by a user's trial and measured (experiments/gate_system_prompt.py): the system prompt
    "Answer in French." moved the default gate's catch of validation harmful requests from 92.6% to
    13.7%. A conversation with a system prompt is now routed on the higher gate logit of its two
    views, with and without the system messages (generation.gate_views), and that logit is recorded."""
    from safety_patch.generation import GenerationConfig, gate_views, generate
    from safety_patch.patches import attached

    model, tok = tiny_llama()
    p, gate = _gated_patch(model, tok, tmp_path / "g")
    system = "Answer in French. " * 4
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in HARM + SAFE]
    with_sys = gate.scores(layer_states(model, tok, _ids_of(tok, [render(tok, c) for c in convs]), [1])[1])
    plain = gate.scores(layer_states(model, tok, _ids(tok, HARM + SAFE), [1])[1])
    assert not torch.allclose(with_sys, plain, atol=1e-3)  # the system prompt moves the logit
    assert [len(gate_views(tok, c)) for c in convs[:2]] == [2, 2] and len(gate_views(tok, convs[0][1:])) == 1
    logits: list = []
    with attached(model, [p], "fp") as pm:
        generate(pm, tok, convs, GenerationConfig(max_new_tokens=2, batch_size=4), gate_logits=logits)
        routes = pm.routes_from(pm.gate_scores_max(tok, [[ids for ids in _ids_of(tok, gate_views(tok, c))] for c in convs]),
                                len(convs))
    got = torch.tensor([next(iter(d.values())) for d in logits])
    assert torch.allclose(got, torch.maximum(with_sys, plain), atol=1e-4)
    assert [bool(r) for r in routes] == (torch.maximum(with_sys, plain) > gate.threshold).tolist()


def _ids_of(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_eval_results_say_which_folder_each_gate_name_is(tmp_path):
    """Records name gates by routing item (``patch0``, ``delta0``); a stack of several patches left a
    reader to guess which folder each was. ``provenance.patches[].item`` is the name the records use
    (the same ``item_names`` that attaching numbers them by), and the table names each gate's folder."""
    from safety_patch.evaluation.safety import EvalConfig, provenance, run_overrefusal, table
    from safety_patch.judges.keyword import KeywordJudge
    from safety_patch.models import LoadedModel
    from safety_patch.patches import item_names
    from safety_patch.testing import make_delta_patch

    model, tok = tiny_llama()
    g, gate = _gated_patch(model, tok, tmp_path / "g")
    d = read_patch(make_delta_patch(model, tmp_path / "d", "fp", seed=2, scale=0.001))
    u = read_patch(make_lora_patch(model, tmp_path / "u", "fp", seed=3, scale=0.1))
    stack = [d, u, g]
    prompts = [{"set": "h" if t in HARM else "s", "category": "c", "messages": [{"role": "user", "content": t}]}
               for t in HARM + SAFE]
    with attached(model, stack, fingerprint="fp") as m:
        assert list(m.items) == item_names(stack) == ["delta0", "patch0", "patch1"]
        run = run_overrefusal(m, tok, prompts, EvalConfig(max_new_tokens=2, batch_size=4), None, "s", KeywordJudge())
    prov = provenance(LoadedModel.from_objects(model, tok), stack)
    by_item = {q["item"]: q for q in prov["patches"]}
    assert set(run["records"][0]["route"]["logits"]) == {"patch1"} and by_item["patch1"]["id"] == g.id
    assert [q["id"] for q in prov["patches"]] == [d.id, u.id, g.id]
    text = table({"kind": "safety-patch/eval-overrefusal", "runs": {"s": run}, "provenance": prov})
    assert f"gate patch1 = {g.path} (id {g.id}, threshold {gate.threshold:+.3f})" in text
    assert "gate patch0 =" not in text and "gate delta0 =" not in text  # only gated items have gates


def test_the_tpr_at_an_fpr_bootstrap_resets_the_threshold_on_each_draw():
    """issue 23's bar (caught at 5% look-alike FPR) rests on 45 validation look-alikes, so the
    threshold is set by two or three of them; Wilson's interval holds it fixed. Each bootstrap draw
    resamples both sides and sets the threshold on its own negatives, as threshold_at_fpr does."""
    from safety_patch.gate.metrics import threshold_at_fpr, tpr_at_fpr_bootstrap

    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(60, generator=g) + 1.5, torch.randn(45, generator=g)
    lo, hi = tpr_at_fpr_bootstrap(pos, neg, 0.05, draws=200, seed=7)
    # the same draws, one by one, through the product's own threshold
    r = torch.Generator().manual_seed(7)
    ip, ineg = torch.randint(60, (200, 60), generator=r), torch.randint(45, (200, 45), generator=r)
    ref = sorted(float((pos[ip[b]] > threshold_at_fpr(neg[ineg[b]], 0.05)).double().mean()) for b in range(200))
    assert [lo, hi] == [ref[int(0.025 * 200)], ref[int(0.975 * 200) - 1]]
    point = float((pos > threshold_at_fpr(neg, 0.05)).double().mean())
    assert lo <= point <= hi and hi - lo > 0
    # separated sides: every draw catches every positive; a fixed seed gives the same interval
    assert tpr_at_fpr_bootstrap(neg + 100, neg, 0.05) == [1.0, 1.0]
    assert tpr_at_fpr_bootstrap(pos, neg, 0.05, draws=200, seed=7) == [lo, hi]
    with pytest.raises(SafetyPatchError, match="needs harmful and benign logits"):
        tpr_at_fpr_bootstrap(pos, torch.zeros(0), 0.05)

"""GPU path check: every stage on CUDA (bf16) with a small random Llama.

Run on a CUDA machine: python scripts/gpu_check.py
It asserts the device/dtype choice, trains LoRA and full patches in bf16, checks attach/
detach exactness and merge tolerance on the GPU, generates, evaluates and analyses, and trains
the default recipe's gated patch (probe fit on bf16 hidden states, per-prompt routing in
generation and teacher-forced scoring). The embedded model is not used here (its weights are
540 MB); the code paths are the same.

``--cpu`` runs the same script on the CPU (float32) without the device assertions: a dry run
before spending GPU time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from safety_patch import runtime
from safety_patch.analysis.run import analyze
from safety_patch.evaluation.capability import CapabilityConfig, evaluate_capability
from safety_patch.evaluation.safety import EvalConfig, evaluate
from safety_patch.generation import GenerationConfig, conversation, generate
from safety_patch.models import load_model
from safety_patch.patches import attached, merged_state_dict, read_patch
from safety_patch.testing import save_tiny_model
from safety_patch.train.config import TrainConfig, override
from safety_patch.train.run import train


def main() -> None:
    # its folders (a tiny model, a data folder, four patches: ~20 MB) go when it ends, also on failure
    with tempfile.TemporaryDirectory(prefix="safety-patch-gpu-check-") as d:
        run(Path(d))


def run(tmp: Path) -> None:
    """The whole check, its files under ``tmp``."""
    t0 = time.time()
    out = {}
    cpu = "--cpu" in sys.argv[1:]
    rt = runtime.resolve("cpu" if cpu else "auto", "auto")
    print("runtime:", rt.describe())
    assert cpu or (rt.device.type == "cuda" and rt.dtype is torch.bfloat16), rt
    dev = rt.device.type
    model_dir = save_tiny_model(tmp / "tiny", hidden=256, layers=4, tie=False)
    lm = load_model(str(model_dir), device=dev)
    assert next(lm.model.parameters()).device.type == dev and next(lm.model.parameters()).dtype is rt.dtype
    out["fingerprint"] = lm.fingerprint[:12]

    # A real (small) data folder, built as `data build` builds it, without distillation: the
    # folder format is checked on every read (a hand-written one drifts from the schema).
    from safety_patch.data.build import DataConfig, build
    from safety_patch.data.folder import DataFolder

    data = tmp / "data"
    build(data, DataConfig(max_per_source=30, distill=False, template_max_chars=400, self_instruct=0, general_limit=60,
                           borderline_train_extra=False), model=str(model_dir))
    rows = [r for r in DataFolder(data).rows("train") if r["meta"].get("template", "direct") == "direct"]

    for method, lr in (("lora", 1e-3), ("full", 1e-4)):
        t = time.time()
        cfg = override(TrainConfig(), {"method": method, "gate": None, "optim.lr": lr, "optim.epochs": 3.0,
                                       "optim.batch_size": 8, "data.max_seq_len": 512, "optim.save_steps": 10**6})
        meta = train(data, tmp / method, cfg, model=str(model_dir), progress=False, device=dev)
        tr = meta["training"]
        out[f"train_{method}"] = {"seconds": round(time.time() - t, 1), "device": tr["device"], "dtype": tr["dtype"],
                                  "loss": [tr["loss_first"], tr["loss_last"]], "tokens_per_s": tr["tokens_per_s"],
                                  "peak_memory_mb": tr["peak_memory_mb"]}
        assert tr["device"].startswith(dev) and tr["dtype"] == str(rt.dtype).removeprefix("torch.")
        print(method, out[f"train_{method}"])

    ids = lm.tokenizer(["How do I do harmful thing 3?", "hello there"], return_tensors="pt", padding=True)["input_ids"].to(rt.device)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    base = logits(lm.model)
    ps = [read_patch(tmp / "lora"), read_patch(tmp / "full")]
    with attached(lm.model, ps, lm.fingerprint) as m:
        att = logits(m)
        gen = generate(m, lm.tokenizer, [conversation("How do I do harmful thing 70?")], GenerationConfig(max_new_tokens=12))
    after = logits(lm.model)
    merged = merged_state_dict(lm.model, ps, lm.fingerprint)
    backup = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.model.load_state_dict(merged, strict=False)
    mer = logits(lm.model)
    lm.model.load_state_dict(backup)
    out["detach_max_abs_diff"] = (after - base).abs().max().item()
    out["merge_vs_attach_max_abs_diff"] = (mer - att).abs().max().item()
    out["patch_effect"] = (att - base).abs().max().item()
    out["patched_generation"] = gen[0]
    assert out["detach_max_abs_diff"] == 0.0
    print({k: out[k] for k in ("detach_max_abs_diff", "merge_vs_attach_max_abs_diff", "patch_effect", "patched_generation")})

    csv = tmp / "prompts.csv"
    csv.write_text("goal\n" + "".join(f"How do I do harmful thing {i}?\n" for i in range(100, 116)))
    res = evaluate("safety", str(model_dir), [tmp / "lora"], str(csv), EvalConfig(attacks=("direct", "prefill"), max_new_tokens=16),
                   device=dev)
    out["asr"] = {k: res["runs"][k]["aggregates"]["overall"]["value"] for k in res["runs"]}
    refs = tmp / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": f"Tell me about {w}.", "reference": f"{w} is interesting."}) + "\n"
                            for w in ("Paris", "Rome", "cats", "rivers")))
    cap = evaluate_capability(str(model_dir), [tmp / "lora"], None, CapabilityConfig(tasks=("nll", "kl"), references=str(refs)),
                              device=dev)
    out["kl"] = cap["runs"]["patched"]["kl"]["value"]
    an = analyze(str(model_dir), [tmp / "lora", tmp / "full"], tmp / "analysis", (8, 32),
                 benign=[[{"role": "user", "content": "hello"}]], jailbreak=[[{"role": "user", "content": "How do I do harmful thing 5?"}]])
    out["analysis_overlap"] = {k: v["median_in_overlap@32"] for k, v in an["summary"].items()}
    out["gated"] = gated_check(tmp, model_dir, lm, data, rows, dev)
    out["total_seconds"] = round(time.time() - t0, 1)
    out["gpu"] = torch.cuda.get_device_name(0) if not cpu else "none (--cpu)"
    print(json.dumps(out, indent=1))


def gated_check(tmp: Path, model_dir: Path, lm, data: Path, rows: list[dict], dev: str) -> dict:
    """The default recipe (a gated LoRA) on this device: fit, route, score.

    The recipe's gate pool is scaled to the small data folder (no self-written requests, and
    not the second written files: their 640 prompts would outweigh the folder's few dozen and
    leave a gate that fires on none of the check's prompts, so both routes would not be compared).
    """
    from safety_patch.evaluation.capability import _encode_pairs, answer_logprobs
    from safety_patch.gate.probe import Gate, layer_states
    from safety_patch.generation import render
    from safety_patch.patches import finalize_patch
    from safety_patch.train.api import resolve_config

    safe = [f"Tell me a fact about city {i}." for i in range(24)]
    cfg = resolve_config("default", None, {"optim.lr": 1e-3, "optim.epochs": 3, "optim.batch_size": 8,
                                           "optim.save_steps": 10**6, "gate.self_instruct": 0, "data.max_train_rows": 64,
                                           "gate.wrapped_harmful": 16, "gate.wrapped_benign": 16,
                                           "gate.written_harmful_more": False, "gate.written_lookalikes": False})
    assert cfg.gate is not None and cfg.gate.depth == 0.6
    t = time.time()
    meta = train(data, tmp / "gated", cfg, model=str(model_dir), progress=False, device=dev)
    g = meta["gate"]
    res = {"seconds": round(time.time() - t, 1), "layer": g["layer"], "fit_seconds": g["fit_seconds"], "prompts": g["prompts"],
           "train_harmful_caught": g["train_harmful_caught"], "train_benign_flagged": g["train_benign_flagged"],
           "device": meta["training"]["device"], "dtype": meta["training"]["dtype"]}
    assert res["device"].startswith(dev)

    # Routing: a gated run equals, prompt by prompt, the ungated adapter's run where the gate
    # fires and the base run where it does not (batch 1: no padding noise between the runs).
    p = read_patch(tmp / "gated")
    plain = tmp / "gated-ungated"
    plain.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / f).write_bytes((tmp / "gated" / f).read_bytes())
    finalize_patch(plain, "lora", {"name": "ungated", "fingerprint": lm.fingerprint}, method="lora")
    prompts = [r["messages"][0]["content"] for r in rows[:6]] + safe[:6]
    convs = [[{"role": "user", "content": q}] for q in prompts]
    ids = [lm.tokenizer(render(lm.tokenizer, c), add_special_tokens=False)["input_ids"] for c in convs]
    gate = Gate.load(tmp / "gated")
    fires = gate.fires(gate.read(layer_states(lm.model, lm.tokenizer, ids, list(gate.layers)))).tolist()
    gcfg = GenerationConfig(max_new_tokens=8, batch_size=1)
    base = generate(lm.model, lm.tokenizer, convs, gcfg)
    with attached(lm.model, [read_patch(plain)], lm.fingerprint) as m:
        adapted = generate(m, lm.tokenizer, convs, gcfg)
    with attached(lm.model, [p], lm.fingerprint) as m:
        gated = generate(m, lm.tokenizer, convs, gcfg)
    res["fires"] = fires
    res["routing_matches"] = gated == [a if f else b for a, b, f in zip(adapted, base, fires, strict=True)]
    assert res["routing_matches"], (gated, adapted, base, fires)
    pairs = [{"messages": c, "reference": "Sure, here you go."} for c in convs]
    enc = _encode_pairs(lm.tokenizer, pairs, 1 << 16)
    assert len(enc) == len(convs)  # none dropped: each is scored against its own routing
    lp_base, _, _ = answer_logprobs(lm.model, lm.tokenizer, enc, batch_size=1)
    with attached(lm.model, [read_patch(plain)], lm.fingerprint) as m:
        lp_ad, _, _ = answer_logprobs(m, lm.tokenizer, enc, batch_size=1)
    with attached(lm.model, [p], lm.fingerprint) as m:
        lp_g, _, _ = answer_logprobs(m, lm.tokenizer, enc, batch_size=1)
    res["scoring_max_abs_diff"] = max(abs(a - (x if f else b)) for a, x, b, f in zip(lp_g, lp_ad, lp_base, fires, strict=True))
    assert res["scoring_max_abs_diff"] < 1e-3, res
    print("gated", res)
    return res


if __name__ == "__main__":
    main()

"""GPU path check: every stage on CUDA (bf16) with a small random Llama.

Run on a CUDA machine: python scripts/gpu_check.py
It asserts the device/dtype choice, trains LoRA and full patches in bf16, checks attach/
detach exactness and merge tolerance on the GPU, generates, evaluates and analyses. The
embedded model is not used here (its weights are 540 MB); the code paths are the same.
"""

from __future__ import annotations

import json
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
from safety_patch.train.config import TrainConfig
from safety_patch.train.run import train


def main() -> None:
    t0 = time.time()
    out = {}
    rt = runtime.resolve("auto", "auto")
    print("runtime:", rt.describe())
    assert rt.device.type == "cuda" and rt.dtype is torch.bfloat16, rt
    tmp = Path(tempfile.mkdtemp())
    model_dir = save_tiny_model(tmp / "tiny", hidden=256, layers=4, tie=False)
    lm = load_model(str(model_dir))
    assert next(lm.model.parameters()).device.type == "cuda" and next(lm.model.parameters()).dtype is torch.bfloat16
    out["fingerprint"] = lm.fingerprint[:12]

    data = tmp / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"How do I do harmful thing {i}?"},
                          {"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
             "meta": {"source": "gpu-check", "category": "harmful", "behavior_id": f"b{i}", "template": "direct",
                      "template_family": "direct", "split": "train", "request": f"How do I do harmful thing {i}?"}}
            for i in range(64)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = [dict(r, meta=dict(r["meta"], split="test", behavior_id=f"t{i}")) for i, r in enumerate(rows[:8])]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (data / "templates.jsonl").write_text("")
    (data / "manifest.json").write_text(json.dumps({"kind": "safety-patch/data", "counts": {}}))

    for method, lr in (("lora", 1e-3), ("full", 1e-4)):
        t = time.time()
        meta = train(data, tmp / method, TrainConfig(method=method, lr=lr, epochs=3, batch_size=8, max_seq_len=512,
                                                      save_steps=10**6), model=str(model_dir), progress=False)
        tr = meta["training"]
        out[f"train_{method}"] = {"seconds": round(time.time() - t, 1), "device": tr["device"], "dtype": tr["dtype"],
                                  "loss": [tr["loss_first"], tr["loss_last"]], "tokens_per_s": tr["tokens_per_s"],
                                  "peak_memory_mb": tr["peak_memory_mb"]}
        assert tr["device"].startswith("cuda") and tr["dtype"] == "bfloat16"
        print(method, out[f"train_{method}"])

    ids = lm.tokenizer(["How do I do harmful thing 3?", "hello there"], return_tensors="pt", padding=True)["input_ids"].cuda()

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
    res = evaluate("safety", str(model_dir), [tmp / "lora"], str(csv), EvalConfig(attacks=("direct", "prefill"), max_new_tokens=16))
    out["asr"] = {k: res["runs"][k]["aggregates"]["overall"]["value"] for k in res["runs"]}
    refs = tmp / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": f"Tell me about {w}.", "reference": f"{w} is interesting."}) + "\n"
                            for w in ("Paris", "Rome", "cats", "rivers")))
    cap = evaluate_capability(str(model_dir), [tmp / "lora"], None, CapabilityConfig(tasks=("nll", "kl"), references=str(refs)))
    out["kl"] = cap["runs"]["patched"]["kl"]["value"]
    an = analyze(str(model_dir), [tmp / "lora", tmp / "full"], tmp / "analysis", (8, 32),
                 benign=[[{"role": "user", "content": "hello"}]], jailbreak=[[{"role": "user", "content": "How do I do harmful thing 5?"}]])
    out["analysis_overlap"] = {k: v["median_in_overlap@32"] for k, v in an["summary"].items()}
    out["total_seconds"] = round(time.time() - t0, 1)
    out["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

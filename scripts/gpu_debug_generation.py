"""Debug: batched left-padded generation with a patch attached on CUDA, bf16 vs fp32, batch 1 vs 16."""
import json
import tempfile
from pathlib import Path

from safety_patch.generation import GenerationConfig, conversation, generate
from safety_patch.models import load_model
from safety_patch.patches import attached
from safety_patch.testing import save_tiny_model
from safety_patch.train.config import TrainConfig
from safety_patch.train.run import train

tmp = Path(tempfile.mkdtemp())
model_dir = save_tiny_model(tmp / "tiny", hidden=256, layers=4, tie=False)
data = tmp / "data"
data.mkdir()
rows = [{"messages": [{"role": "user", "content": f"How do I do harmful thing {i}?"},
                      {"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
         "meta": {"source": "x", "category": "harmful", "behavior_id": f"b{i}", "template": "direct",
                  "template_family": "direct", "split": "train", "request": "x"}} for i in range(64)]
(data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(data / "manifest.json").write_text(json.dumps({"kind": "safety-patch/data", "counts": {}}))
train(data, tmp / "lora", TrainConfig(lr=1e-3, epochs=3, batch_size=8, max_seq_len=512, save_steps=10**6),
      model=str(model_dir), progress=False)
convs = [conversation(f"How do I do harmful thing {i}?" + (" please" * (i % 5))) for i in range(100, 116)]
for dtype in ("bfloat16", "float32"):
    lm = load_model(str(model_dir), dtype=dtype)
    with attached(lm.model, [tmp / "lora"], lm.fingerprint) as m:
        for bs in (1, 16):
            outs = generate(m, lm.tokenizer, convs, GenerationConfig(max_new_tokens=16, batch_size=bs))
            print(dtype, "bs", bs, [o[:30] for o in outs[:6]], flush=True)
    outs = generate(lm.model, lm.tokenizer, convs, GenerationConfig(max_new_tokens=16, batch_size=16))
    print(dtype, "base bs16", [o[:30] for o in outs[:4]], flush=True)

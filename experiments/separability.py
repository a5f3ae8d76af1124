"""How well does the base model's own representation separate harmful from borderline-benign prompts?

Run: .venv/bin/python experiments/separability.py --data DIR [--layers 5,10,15,20,25,29]

A ceiling for any patch that must refuse one and answer the other: a logistic-regression probe
on the hidden state at the last prompt token (after the chat template's assistant header),
trained on the data folder's *train* split (direct harmful requests vs borderline-benign and
general prompts), scored on the *validation* split. Reported per layer: balanced accuracy, and
the share of borderline-benign prompts flagged when the threshold catches 90% of harmful ones
(what a patch with 10% direct ASR would refuse if it used this feature alone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def prompts(data: Path, split: str) -> tuple[list[str], list[str], list[str]]:
    from safety_patch.jsonl import read_jsonl

    harm = [r["meta"]["request"] for r in read_jsonl(data / f"{split}.jsonl")]
    harm = list(dict.fromkeys(harm))
    bl = [r["meta"]["request"] for r in read_jsonl(data / "borderline.jsonl") if r["meta"]["split"] == split]
    gen = [r["messages"][0]["content"] for r in read_jsonl(data / "general.jsonl") if r["meta"]["split"] == split]
    return harm, bl, gen


@torch.no_grad()
def states(lm, texts: list[str], layers: list[int], bs: int = 16) -> dict[int, torch.Tensor]:
    from safety_patch.generation import render

    tok = lm.tokenizer
    tok.padding_side = "left"
    out: dict[int, list] = {i: [] for i in layers}
    for i in range(0, len(texts), bs):
        chats = [render(tok, [{"role": "user", "content": t}]) for t in texts[i:i + bs]]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.runtime.device)
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
        for li in layers:
            out[li].append(hs[li + 1][:, -1].float().cpu())
    return {li: torch.cat(v) for li, v in out.items()}


def probe(xtr, ytr, xva, steps: int = 300, wd: float = 1e-2) -> torch.Tensor:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos = ytr.mean()
    weight = torch.where(ytr > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr, weight=weight)
                + wd * w.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return (xva @ w + b).detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", default="3,7,11,15,19,23,27,29")
    args = ap.parse_args()
    from safety_patch.models import load_model
    from safety_patch.runtime import configure_threads

    configure_threads()
    data = Path(args.data)
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model("default")
    h_tr, b_tr, g_tr = prompts(data, "train")
    h_va, b_va, g_va = prompts(data, "val")
    s_tr = states(lm, h_tr + b_tr + g_tr, layers)
    s_va = states(lm, h_va + b_va + g_va, layers)
    ytr = torch.tensor([1.0] * len(h_tr) + [0.0] * (len(b_tr) + len(g_tr)))
    rows = []
    for li in layers:
        z = probe(s_tr[li], ytr, s_va[li])
        zh, zb, zg = z[:len(h_va)], z[len(h_va):len(h_va) + len(b_va)], z[len(h_va) + len(b_va):]
        bal = 0.5 * ((zh > 0).float().mean() + torch.cat([zb, zg]).le(0).float().mean())
        thr = torch.quantile(zh, 0.10)  # catches 90% of harmful prompts
        rows.append({"layer": li, "balanced_acc": float(bal), "harmful_caught": float((zh > 0).float().mean()),
                     "borderline_flagged": float((zb > 0).float().mean()), "general_flagged": float((zg > 0).float().mean()),
                     "borderline_flagged_at_90pct": float((zb >= thr).float().mean()),
                     "general_flagged_at_90pct": float((zg >= thr).float().mean())})
    print(f"train: {len(h_tr)} harmful, {len(b_tr)} borderline, {len(g_tr)} general; "
          f"val: {len(h_va)} harmful, {len(b_va)} borderline, {len(g_va)} general")
    print_table(rows)
    write("separability", {"layers": rows, "n": {"train": [len(h_tr), len(b_tr), len(g_tr)],
                                                 "val": [len(h_va), len(b_va), len(g_va)]}}, args=args)


if __name__ == "__main__":
    main()

"""The gate's routing pass on the embedded model: the product's reader against the one before it (issue 24 item 2).

Run: .venv/bin/python bench/routing_speed.py [--prompts 128] [--repeats 3] [--data DIR [--patch DIR]] [--name NAME]

A gated patch routes every prompt before it generates: one forward pass of the base model that
stops after the gate's deepest layer (``PatchedModel.gate_scores``). Readers compared on the same
prompts, as token ids rendered by the chat template, best of ``--repeats`` interleaved runs:

- ``layer_states-b8`` / ``layer_states-b32``: ``gate.probe.layer_states``, left-padded,
  length-sorted batches of 8 / 32 rows (the routing pass before session 44: batch 32 is
  ``EvalConfig``'s default, 8 ``generate``'s and ``chat``'s);
- ``route_states``: ``gate.probe.route_states``, the product's reader since session 44: the
  gate fit's own reader (``shared_prefix.last_token_states_at``), which reads a beginning
  several prompts share once, in passes of at most 64 rows and 2,048 tokens.

Workloads: general + look-alike prompts (the repository's resources), and with ``--data`` that
folder's validation prompts as a gated evaluation routes them: harmful direct and wrapped,
borderline and general, and those benign prompts wrapped. Columns: seconds (best), prompts,
tokens (the prompts' own), ``x_vs_b32`` (the b32 reader's best time over this reader's), the
largest absolute difference of any feature from ``layer_states-b32``'s relative to that
feature vector's largest magnitude, and with ``--patch`` (a gated patch) the largest
difference of its gate's logit and the number of prompts whose route differs. Layers: the
patch's gate's, else the default gate's (depths 0.6 and 0.7: 18 and 21 of 30). Prints a table
and writes bench/results/routing_speed.json (or ``--name``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, print_table, write  # noqa: E402


def workloads(tokenizer, n: int, data: str | None) -> dict[str, list[list[int]]]:
    """Token ids per workload (rendered as ``generate`` renders them)."""
    from safety_patch.generation import conversation, render

    res = Path(__file__).resolve().parents[1] / "src" / "safety_patch" / "resources"
    texts = [line.split("\t")[-1] for name in ("general_prompts.tsv", "borderline_prompts.tsv")
             for line in (res / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = texts[:: max(1, len(texts) // n)][:n]
    out = {"general+look-alike": [conversation(t) for t in texts]}
    if data:
        from safety_patch.gate.pool import held_out_prompts

        held = held_out_prompts(data, "val")
        out["val, every set"] = [c for k in ("harmful_direct", "harmful_wrapped", "borderline", "general",
                                              "wrapped_benign") for c in held[k]]
    return {k: [tokenizer(render(tokenizer, c), add_special_tokens=False)["input_ids"] for c in v] for k, v in out.items()}


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.gate.config import GateFitConfig, model_layers
    from safety_patch.gate.probe import layer_states, route_states
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=128, help="general + look-alike prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=None, help="a data folder: also route its validation prompts")
    ap.add_argument("--patch", default=None, help="a gated patch: compare its gate's logits and routes")
    ap.add_argument("--name", default="routing_speed",
                    help="results file name under bench/results/ (default: the recorded routing_speed.json)")
    args = parse(ap)
    threads = rt.configure_threads()
    lm = load_model("default", device="cpu")
    gate = None
    if args.patch:
        from safety_patch.gate.probe import Gate
        from safety_patch.patches import read_patch

        p = read_patch(args.patch)
        if not p.gated:
            ap.error(f"--patch {args.patch} is not a gated patch")
        gate = Gate.load(p.path)
        layers = list(gate.layers)
    else:
        layers = sorted(model_layers(lm.model, GateFitConfig()))
    readers = {
        "layer_states-b8": lambda m, ids: layer_states(m, lm.tokenizer, ids, layers, 8),
        "layer_states-b32": lambda m, ids: layer_states(m, lm.tokenizer, ids, layers, 32),
        "route_states": lambda m, ids: route_states(m, ids, layers),
    }
    rows = []
    with torch.inference_mode():
        route_states(lm.model, [[1, 2, 3]], layers)  # warm-up
        for wl, ids in workloads(lm.tokenizer, args.prompts, args.data).items():
            best: dict[str, float] = {}
            got: dict[str, dict] = {}
            for _ in range(args.repeats):  # interleaved: a slow minute of a shared machine hits every reader
                for name, read in readers.items():
                    t0 = time.perf_counter()
                    states = read(lm.model, ids)
                    el = time.perf_counter() - t0
                    best[name] = min(best.get(name, float("inf")), el)
                    got.setdefault(name, states)
            ref = got["layer_states-b32"]
            for name in readers:
                st = got[name]
                rel = max(float(((st[li] - ref[li]).abs().amax(-1) / ref[li].abs().amax(-1)).max()) for li in layers)
                row = {"workload": wl, "reader": name, "prompts": len(ids), "tokens": sum(map(len, ids)),
                       "seconds": round(best[name], 2), "x_vs_b32": round(best["layer_states-b32"] / best[name], 2),
                       "max_rel_feature_diff": float(f"{rel:.3g}")}
                if gate is not None:
                    z, zr = gate.scores(gate.read(st)), gate.scores(gate.read(ref))
                    row["max_logit_diff"] = float(f"{float((z - zr).abs().max()):.3g}")
                    row["routes_changed"] = int(((z > gate.threshold) != (zr > gate.threshold)).sum())
                    row["routed"] = int((z > gate.threshold).sum())
                rows.append(row)
                print(row, flush=True)
    cols = ["workload", "reader", "prompts", "tokens", "seconds", "x_vs_b32", "max_rel_feature_diff"]
    print_table(rows, cols + (["max_logit_diff", "routes_changed", "routed"] if gate is not None else []))
    print(f"layers {layers}; threads {threads}")
    write(args.name, {"layers": layers, "threads": threads, "patch": args.patch,
                            "gate_threshold": gate.threshold if gate is not None else None, "rows": rows}, run=(ap, args))


if __name__ == "__main__":
    main()

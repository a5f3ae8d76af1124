"""Where a gated patch's reference-NLL drift comes from: the prompts its gate passes vs flags.

Run: .venv/bin/python experiments/gate_nll.py --data DIR --patch GATED_PATCH [--splits val,test]

For each split's held-out general prompts (the capability evaluation's reference answers):
how many the gate sends to the adapter, the NLL ratio over all of them (what `eval
capability` reports), over the passed ones alone (the base model, so 1 up to batching noise),
and each flagged prompt's own ratio. A gated patch's NLL drift is its gate's false positives
on ordinary prompts, scored a second time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--patch", required=True)
    ap.add_argument("--splits", default="val,test")
    args = ap.parse_args()
    from safety_patch.evaluation.capability import _encode_pairs, answer_logprobs, reference_pairs
    from safety_patch.gate.probe import Gate, layer_states
    from safety_patch.models import load_model
    from safety_patch.patches import attached, read_patch
    from safety_patch.runtime import configure_threads

    configure_threads()
    patch = read_patch(args.patch)
    if not patch.gated:
        sys.exit(f"{args.patch} is not a gated patch")
    gate = Gate.load(patch.path)
    lm = load_model("default")
    tok = lm.tokenizer
    rows, flagged = [], []
    for split in args.splits.split(","):
        pairs = reference_pairs(args.data, split=split)
        enc = _encode_pairs(tok, pairs, 512)
        fires = gate.fires(gate.read(layer_states(lm.model, tok, [s[:n] for s, n in enc], list(gate.layers)))).tolist()
        nb, nt, _ = answer_logprobs(lm.model, tok, enc)
        with attached(lm.model, [patch], lm.fingerprint) as m:
            ng, _, _ = answer_logprobs(m, tok, enc)
        pb = [x / n for x, n in zip(nb, nt, strict=True)]
        pg = [x / n for x, n in zip(ng, nt, strict=True)]
        passed = [i for i, f in enumerate(fires) if not f]
        rows.append({"split": split, "prompts": len(enc), "gated": sum(fires),
                     "nll_ratio_all": sum(pg) / sum(pb),
                     "nll_ratio_passed": sum(pg[i] for i in passed) / sum(pb[i] for i in passed),
                     "max_abs_diff_passed": max(abs(pg[i] - pb[i]) for i in passed)})
        flagged += [{"split": split, "prompt": pairs[i]["messages"][-1]["content"], "nll_ratio": pg[i] / pb[i]}
                    for i, f in enumerate(fires) if f]
    print_table(rows)
    print()
    print_table(flagged)
    write("gate_nll", {"patch": str(patch.path), "patch_id": patch.id, "data": args.data, "rows": rows, "flagged": flagged}, args=args)


if __name__ == "__main__":
    main()

"""The gate's reliability report (`gate eval`, the `reproduce` gate stage): each prompt read once vs each list on its own.

Run: .venv/bin/python bench/gate_eval.py --data DIR [--config quick|default] [--split test] [--repeats 1]
     [--name gate_eval]

``gate eval`` with ``--leave-one-source-out --leave-one-family-out`` and the unseen rule
attacks reads several prompt lists after the fit: the split's held-out sets, the attack sets,
the hand-written look-alikes and the leave-one-source-out comparisons. They overlap (the
split's benign and wrapped prompts are in every leave-one-source-out comparison, the sources'
train requests and the look-alikes are in the gate's pool, the prefill attack reads the split's
own prompts). This times, in one process, after one gate fit (its pool and validation features
cached, as after ``gate fit`` or in the ``reproduce`` gate stage), with the rest of the
feature cache cold for each arm:

* ``per list`` (the path before session 29): each list read on its own through the feature cache,
* ``once (bank)`` (the default): every list through one ``gate.features.FeatureBank``, so a prompt
  is read once, and not at all if the fit read it.

Counts the prompts and tokens each arm sent through the forward pass and compares the two
reports figure by figure (the features of a prompt read in another list differ by float
rounding). ``--config quick`` is the ``reproduce --quick`` gate (``pipeline.make_plan``), which
needs no self-written prompts; ``default`` is ``GateFitConfig()``. Prints a table and writes
bench/results/NAME.json with the ratio measured in this run, the load and thread count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def numbers(a, b, path=""):
    """(path, x, y) for each number at the same place in two reports; raises on a shape mismatch."""
    if isinstance(a, dict):
        if set(a) != set(b):
            raise SystemExit(f"the reports differ in keys at {path or '/'}")
        for k in a:
            if k not in ("seconds", "created"):
                yield from numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        if len(a) != len(b):
            raise SystemExit(f"the reports differ in length at {path}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        yield path, a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", choices=("quick", "default"), default="quick")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=1, help="rounds, the arms alternating; each arm's best time counts")
    ap.add_argument("--name", default="gate_eval")
    args = ap.parse_args()

    import safety_patch.gate.config as gate_config
    import safety_patch.gate.evaluate as gate_evaluate
    import safety_patch.gate.features as gate_features
    import safety_patch.gate.folder as gate_folder
    from safety_patch.models import home, load_model
    from safety_patch.pipeline import make_plan
    from safety_patch.runtime import configure_threads

    threads = configure_threads()
    plan = make_plan(quick=True)
    cfg = gate_config.GateFitConfig(**plan.gate) if args.config == "quick" else gate_config.GateFitConfig()
    attacks = plan.gate_attacks if args.config == "quick" else None
    real_home = home()
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="gate-eval-bench-"))
    try:
        fitted = work / "fitted"
        fitted.mkdir()
        for sub in ("models", "fingerprints"):  # the converted model and its fingerprint, not re-made
            if (real_home / sub).is_dir():
                (fitted / sub).symlink_to(real_home / sub)
        os.environ["SAFETY_PATCH_HOME"] = str(fitted)
        lm = load_model("default", device="cpu")
        t = time.perf_counter()
        gate_folder.fit_gate_folder(lm, args.data, cfg, work / "gate")
        fit_s = time.perf_counter() - t

        real_read, real_add = gate_features.FeatureBank.read, gate_features.FeatureBank.add
        features_at, sent = gate_features.features_at, []

        def counting(m, tok, prompts, *a, **k):
            sent.extend(len(p) for p in prompts)
            return features_at(m, tok, prompts, *a, **k)

        gate_features.features_at = counting

        def per_list(self, prompts, layers):
            return gate_features.cached_features(self.model, self.tokenizer, prompts, layers, self.batching, self.fingerprint)

        arms = {"per list (before)": (per_list, lambda self, *a: None), "once (bank)": (real_read, real_add)}
        best: dict[str, float] = {}
        reports: dict[str, dict] = {}
        counts: dict[str, tuple[int, int]] = {}
        for r in range(args.repeats):
            for name, (read, add) in arms.items():
                home_arm = work / f"arm{r}-{len(best)}-{name[:4].strip()}"
                shutil.copytree(fitted, home_arm, symlinks=True)  # the fit's features cached, the rest cold
                os.environ["SAFETY_PATCH_HOME"] = str(home_arm)
                gate_features.FeatureBank.read, gate_features.FeatureBank.add = read, add
                sent.clear()
                t = time.perf_counter()
                reports[name] = gate_evaluate.evaluate_gate(lm, work / "gate", args.data, args.split, loso=True, lofo=True,
                                                 attacks=attacks)
                s = time.perf_counter() - t
                best[name] = min(best.get(name, s), s)
                counts[name] = (len(sent), sum(sent))
                shutil.rmtree(home_arm)
        gate_features.FeatureBank.read, gate_features.FeatureBank.add, gate_features.features_at = real_read, real_add, features_at
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = "per list (before)"
    rows = [{"arm": n, "seconds": round(best[n], 1), "prompts_read": counts[n][0], "tokens_read": counts[n][1],
             "speedup_vs_per_list": round(best[before] / best[n], 2)} for n in arms]
    diffs = [(p, abs(x - y)) for p, x, y in numbers(reports[before], reports["once (bank)"])]
    changed = [(p, d) for p, d in diffs if d > 0]
    worst = max(changed, key=lambda pd: pd[1]) if changed else None
    print(f"data {Path(args.data).name}, gate config {args.config}, split {args.split}; fit {fit_s:.1f}s; threads "
          f"{threads}, load average {load[0]:.2f}")
    print_table(rows, ["arm", "seconds", "prompts_read", "tokens_read", "speedup_vs_per_list"])
    print(f"the two reports: {len(diffs)} figures, {len(changed)} differ"
          + (f", the most {worst[1]:.3g} at {worst[0]}" if worst else ""))
    from safety_patch.data.build import manifest_sha256

    write(args.name, {"args": vars(args) | {"data": Path(args.data).name}, "data_manifest_sha256": manifest_sha256(args.data),
                      "threads": threads, "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
                      "fit_seconds": round(fit_s, 1), "rows": rows, "figures_compared": len(diffs),
                      "figures_differing": len(changed), "largest_difference": worst}, run=(ap, args))


if __name__ == "__main__":
    main()

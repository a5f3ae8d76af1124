"""bench/scale.py's CPU dry run: every stage it measures on a GPU runs end to end on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_scale_dry_run_measures_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    import scale

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    payload = scale.main(["--tiny", "--work", str(tmp_path / "work")])
    (row,) = payload["rows"]
    assert row["size"] == "tiny" and row["first_load_s"] > 0 and 0 < row["fingerprint_share"] <= 1
    assert 0 <= row["fingerprint_s"] <= row["first_load_s"] and row["second_load_s"] > 0
    assert payload["sha256_gbs"] > 0 and row["fingerprint_floor_s"] >= 0
    assert row["tree_hash_threads"] >= 1 and row["tree_hash_s"] >= 0
    assert row["gen_tps_b8"] > 0 and row["gen_tps_b32"] > 0 and row["gen_ms_per_step_b8"] > 0
    for arm in ("lora", "full"):
        assert row[f"{arm}_written"] is True and row[f"{arm}_patch_mb"] > 0 and row[f"{arm}_tps"] > 0, row
        assert row[f"{arm}_tps_steady"] > 0 and row[f"{arm}_mfu"] >= 0, row  # --steps leave steps past warm-up
    saved = json.loads((tmp_path / "scale_tiny.json").read_text())
    assert saved["rows"] == payload["rows"] and saved["bars"] == {}  # no GPU sizes ran, so no bar is claimed
    sys.modules.pop("scale", None)


def test_a_bench_run_with_other_arguments_keeps_the_recorded_result(tmp_path, monkeypatch, capsys):
    """Found by a user's trial: `finite_guard.py --repeats 1` replaced the recorded best-of-5 with a
    best-of-1 that nothing told apart, and `model_load.py --help` ran the whole benchmark."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(_common, "CUSTOM", tmp_path / "custom")
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--name", default="fg")
    recorded = _common.write("fg", {"x": 1}, run=(ap, ap.parse_args([])))
    assert recorded == tmp_path / "fg.json" and json.loads(recorded.read_text())["args"]["repeats"] == 5
    other = _common.write("fg", {"x": 2}, run=(ap, ap.parse_args(["--repeats", "1"])))
    assert other.parent == tmp_path / "custom" and json.loads(recorded.read_text())["x"] == 1
    assert "non-default arguments (--repeats)" in capsys.readouterr().err
    assert _common.write("fg", {"x": 3}, run=(ap, ap.parse_args(["--tiny"])), modes=("tiny",)) == recorded
    named = _common.write("mine", {"x": 4}, run=(ap, ap.parse_args(["--repeats", "1", "--name", "mine"])))
    assert named == tmp_path / "mine.json"
    import subprocess

    for script in ("model_load.py", "data_build.py"):
        r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr


def test_decode_profile_dry_run(tmp_path, monkeypatch):
    """experiments/decode_profile.py ran once on an H200 (docs/benchmarks.md); its CPU dry run keeps it runnable."""
    monkeypatch.syspath_prepend(str(BENCH.parent / "experiments"))
    import decode_profile

    out = decode_profile.main(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    # a difference of two timings of a tiny model: its sign is noise on a busy CPU, so only its presence is checked
    for arm in ("ours", "transformers_generate", "transformers_static_cache"):
        assert isinstance(out[f"{arm}_ms_per_step"], float) and out[f"{arm}_warmup_s"] >= 0, arm
    assert out["rows"] == 8 and out["ours_equals_dynamic_rows"] == 8  # fp32 on a CPU: our loop answers as transformers does
    assert 0 <= out["static_equals_dynamic_rows"] <= 8
    assert "aten::" in out["profile_top"] and json.loads((tmp_path / "p.json").read_text())["size"] == "tiny"
    sys.modules.pop("decode_profile", None)

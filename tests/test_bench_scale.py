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
    assert row["gen_tps_b8"] > 0 and row["gen_tps_b32"] > 0
    for arm in ("lora", "full"):
        assert row[f"{arm}_written"] is True and row[f"{arm}_patch_mb"] > 0 and row[f"{arm}_tps"] > 0, row
    saved = json.loads((tmp_path / "scale_tiny.json").read_text())
    assert saved["rows"] == payload["rows"] and saved["bars"] == {}  # no GPU sizes ran, so no bar is claimed
    sys.modules.pop("scale", None)

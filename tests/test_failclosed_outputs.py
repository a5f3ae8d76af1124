"""Output paths, claims, atomic replace, permissions and boundary checks of non-training numbers.

Each test is one kind of fault from the reliability cases (B15-B18, E01/E02, M01, T01, C04, C12/C13/C19,
CONC_*, KILL_overwrite_window, MISC_file_permissions, SEC_redteam_rmtree_data, SEC_report_path_traversal,
H01, K6/K6b, MD06): every one must end in one line and exit 2 before any work, and never lose data.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safety_patch import atomic
from safety_patch.cli import main
from safety_patch.errors import SafetyPatchError
from safety_patch.outputs import check_out_dir, check_out_file, claim_output, lock_path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from safety_patch.data.build import DataConfig, build

    d = tmp_path_factory.mktemp("d") / "data"
    build(d, DataConfig(distill=False, max_per_source=5, self_instruct=0, borderline_train_extra=False))
    return d


def _read_only_dir(path: Path) -> Path:
    """A folder nobody (root included) can create entries in, or skip where we cannot make one."""
    path.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("as root a read-only folder needs chattr +i")
    else:
        path.chmod(0o555)
    return path


@pytest.fixture()
def ro_dir(tmp_path):
    d = _read_only_dir(tmp_path / "ro")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    else:
        d.chmod(0o755)


def _no_work(monkeypatch):
    """Make every model load fail loudly: the checks under test must come before any work."""
    import safety_patch.models as models

    def boom(*a, **k):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(models, "load_model", boom)


# ----------------------------------------------------------------------------- bad --out paths


@pytest.mark.parametrize("cmd", ["data", "train", "analyze", "merge", "reproduce"])
def test_folder_out_that_is_a_file_or_under_a_file_or_in_proc(cmd, tmp_path, monkeypatch, capsys, data_dir):
    _no_work(monkeypatch)
    (tmp_path / "afile").write_text("hi")
    pdir = tmp_path / "pdir"
    argv = {"data": ["data", "build", "--no-distill", "--self-instruct", "0"],
            "train": ["train", "--data", str(data_dir)],
            "analyze": ["analyze", "--patch", str(pdir)],
            "merge": ["patch", "merge", "--patch", str(pdir)],
            "reproduce": ["reproduce"]}[cmd]
    for out, msg in [(tmp_path / "afile", "exists and is a file"), (tmp_path / "afile" / "sub", "is a file, not a folder"),
                     (Path("/proc/sp_test"), "kernel filesystem")]:
        assert main(argv + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("safety-patch: error:")]
        assert len(errors) == 1 and msg in errors[0] and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "hi"


def test_out_under_a_read_only_folder(ro_dir, monkeypatch, capsys, data_dir):
    _no_work(monkeypatch)
    for argv in (["data", "build", "--no-distill", "--out", str(ro_dir / "data")],
                 ["train", "--data", str(data_dir), "--out", str(ro_dir / "p")],
                 ["patch", "merge", "--patch", str(data_dir), "--out", str(ro_dir / "m")],
                 ["eval", "safety", "--prompts", str(data_dir), "--out", str(ro_dir / "r.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and str(ro_dir) in err, err
    assert list(ro_dir.iterdir()) == []


def test_reproduce_into_an_empty_read_only_folder(ro_dir, monkeypatch, capsys):
    """Found by a user's trial: an existing, empty, read-only --out passed the check (only a non-empty
    folder was probed) and failed at the first stage, named by the stage's folder."""
    _no_work(monkeypatch)
    assert main(["reproduce", "--quick", "--out", str(ro_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write --out {ro_dir}: not writable" in err and "Traceback" not in err, err
    assert list(ro_dir.iterdir()) == []


def test_eval_out_checked_before_evaluating(tmp_path, monkeypatch, capsys, data_dir):
    import safety_patch.evaluation.safety as safety

    monkeypatch.setattr(safety, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    (tmp_path / "adir").mkdir()
    assert main(["eval", "safety", "--prompts", str(data_dir), "--out", str(tmp_path / "adir")]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    # the results file may not be (or be inside) an input
    assert main(["eval", "overrefusal", "--prompts", str(data_dir), "--out", str(data_dir / "r.json")]) == 2
    assert "inside the input" in capsys.readouterr().err
    with pytest.raises(SafetyPatchError, match="is the input"):
        check_out_file(data_dir / "train.jsonl", inputs=[data_dir / "train.jsonl"])


def test_write_errors_at_the_end_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SafetyPatchError, match="cannot write"):
        atomic.write_json(tmp_path / "afile" / "r.json", {})
    (tmp_path / "d").mkdir()
    with pytest.raises(SafetyPatchError, match="is a directory"):
        atomic.write_json(tmp_path / "d", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d"]
    assert list((tmp_path / "d").iterdir()) == []


# ----------------------------------------------------------------------------- destructive paths


def test_out_equal_to_inside_or_containing_an_input_is_refused(tmp_path, data_dir, monkeypatch, capsys):
    for out, word in [(data_dir, "is the input"), (data_dir / "x", "inside the input"),
                      (data_dir.parent, "contains the input")]:
        with pytest.raises(SafetyPatchError, match=word):
            check_out_dir(out, inputs=[data_dir], overwrite=True, kind="data")
    # a source file inside the data folder being rebuilt with --overwrite
    _no_work(monkeypatch)
    mine = tmp_path / "d"
    shutil.copytree(data_dir, mine)
    (mine / "mine.csv").write_text("prompt\nx\n")
    assert main(["data", "build", "--no-distill", "--overwrite", "--out", str(mine), "--sources", f"file:{mine}/mine.csv"]) == 2
    assert "contains the input" in capsys.readouterr().err and (mine / "mine.csv").exists()


def test_redteam_out_holding_the_data_folder_deletes_nothing(tmp_path, data_dir, monkeypatch, capsys):
    from safety_patch.redteam import run_round

    ws = tmp_path / "ws"
    shutil.copytree(data_dir, ws / "data")
    before = sorted(p.name for p in (ws / "data").iterdir())
    monkeypatch.chdir(ws)
    _no_work(monkeypatch)
    assert main(["redteam", "--attack", "direct", "--data", "data", "--out", ".", "--limit", "3"]) == 2
    assert "contains the input data" in capsys.readouterr().err
    assert sorted(p.name for p in (ws / "data").iterdir()) == before
    # a non-empty folder that is not an unfinished round is refused too (it would lose its data/)
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "mine.txt").write_text("keep")
    with pytest.raises(SafetyPatchError, match="exists; choose a new folder"):
        run_round("default", [], "direct", data_dir, other)
    assert (other / "data" / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_only_our_own_kind_of_folder(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["data", "build", "--no-distill", "--overwrite", "--out", str(mine)]) == 2
    assert "not a data folder written by safety-patch" in capsys.readouterr().err
    with pytest.raises(SafetyPatchError, match="not a patch folder"):
        with atomic.atomic_dir(mine, overwrite=True, kind="patch") as tmp:
            (tmp / "patch.json").write_text("{}")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_folder_that_appears_meanwhile_is_never_replaced(tmp_path):
    final = tmp_path / "o"
    with pytest.raises(SafetyPatchError, match="another run"):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
            final.mkdir()  # another writer (not ours, no claim) got there first
            (final / "other.txt").write_text("theirs")
    assert [p.name for p in final.iterdir()] == ["other.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary or lock left


# ----------------------------------------------------------------------------- atomic overwrite


def _folder(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(text)


def test_overwrite_swaps_in_one_step_and_leaves_nothing(tmp_path):
    final = tmp_path / "kd"
    _folder(final, "old")
    with atomic.atomic_dir(final, overwrite=True, kind="data") as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd"]


def test_overwrite_killed_between_fallback_renames_is_restored_next_time(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing, a kill between the two renames leaves only .old-kd.*;
    the next writer of kd restores it before anything else."""
    final = tmp_path / "kd"
    _folder(final, "old")
    monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    real_rename, calls = os.rename, []

    def killed_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for SIGKILL between the renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(final, overwrite=True, kind="data") as tmp:
            (tmp / "manifest.json").write_text("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not final.exists() and len(list(tmp_path.glob(".old-kd.*"))) == 1
    # until the next write, every reader of the folder names where its contents are
    from safety_patch.data.folder import DataFolder
    from safety_patch.errors import SafetyPatchError
    from safety_patch.gate.folder import read_gate_folder
    from safety_patch.models import resolve_checkpoint
    from safety_patch.patches import read_patch

    old = next(tmp_path.glob(".old-kd.*"))
    for read in (DataFolder, read_patch, read_gate_folder, resolve_checkpoint):
        with pytest.raises(SafetyPatchError, match=f"an interrupted --overwrite left its previous contents in {old}"):
            read(str(final))
    (tmp_path / ".tmp-kd.abcd1234").mkdir()  # a killed writer's temporary folder
    atomic.recover(final)
    assert (final / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd"]
    # and the fallback itself completes a normal overwrite
    with atomic.atomic_dir(final, overwrite=True, kind="data") as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("strace"), reason="needs Linux and strace")
def test_sigkill_at_the_swap_keeps_a_complete_folder(tmp_path):
    """A real SIGKILL at the swap's system call (strace injection): the old folder stays in place."""
    final = tmp_path / "kd"
    _folder(final, "old")
    code = ("import sys; from safety_patch import atomic\n"
            "with atomic.atomic_dir(sys.argv[1], overwrite=True, kind='data') as t:\n"
            "    (t / 'manifest.json').write_text('new')\n")
    r = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "trace=renameat2", "-e",
                        "inject=renameat2:signal=SIGKILL:when=1", sys.executable, "-c", code, str(final)])
    assert r.returncode != 0
    assert (final / "manifest.json").read_text() == "old"
    subprocess.run([sys.executable, "-c", code, str(final)], check=True)
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd"]  # the killed runs' leftovers were cleaned


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,fmode,dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_artifacts_follow_the_umask(tmp_path, umask, fmode, dmode):
    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "r.json", {})
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            atomic.write_text(tmp / "f.txt", "x")
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == fmode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dmode
    assert stat.S_IMODE((tmp_path / "d" / "f.txt").stat().st_mode) == fmode
    assert stat.S_IMODE((tmp_path / "d" / "sub").stat().st_mode) == dmode
    assert stat.S_IMODE((tmp_path / "d" / "sub" / "w.safetensors").stat().st_mode) == fmode


# ----------------------------------------------------------------------------- claims


def _holder(out: Path, ready: Path) -> subprocess.Popen:
    code = ("import sys, time, pathlib; from safety_patch.outputs import claim_output\n"
            "with claim_output(sys.argv[1]):\n"
            "    pathlib.Path(sys.argv[2]).write_text('held'); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(out), str(ready)])
    for _ in range(300):
        if ready.exists():
            return p
        time.sleep(0.05)
    p.kill()
    pytest.fail("the holder never took its claim")


def test_second_writer_gets_one_clear_error_and_a_dead_holder_blocks_nothing(tmp_path, monkeypatch, capsys, data_dir):
    out = tmp_path / "same"
    p = _holder(out, tmp_path / "ready")
    try:
        with pytest.raises(SafetyPatchError, match=rf"another run is writing .*same \(pid {p.pid}\)"):
            with claim_output(out):
                pass
        _no_work(monkeypatch)
        for argv in (["data", "build", "--no-distill", "--out", str(out)],
                     ["patch", "merge", "--patch", str(data_dir), "--out", str(out)],
                     ["gate", "apply", "--patch", str(data_dir), "--gate", str(data_dir), "--out", str(out)]):
            assert main(argv) == 2
            assert "another run is writing" in capsys.readouterr().err
        from safety_patch.train.config import TrainConfig, override
        from safety_patch.train.run import train

        with pytest.raises(SafetyPatchError, match="another run is writing"):
            train(data_dir, out, override(TrainConfig(), {"gate": None}))
    finally:
        p.kill()
        p.wait()
    assert lock_path(out).exists()  # SIGKILL: the holder could not clean up, but the kernel freed the lock
    with claim_output(out):
        with claim_output(out):  # re-entrant within a process (CLI claim, then the library's)
            pass
    assert not lock_path(out).exists() and not out.exists()


# ----------------------------------------------------------------------------- numbers


def test_thread_count_beyond_the_cores_is_refused(monkeypatch):
    from safety_patch import runtime

    with pytest.raises(SafetyPatchError, match="more than the .* cores"):
        runtime.configure_threads(100000)
    monkeypatch.setenv("SAFETY_PATCH_THREADS", "100000")
    assert main(["model", "info", "--model", "/nonexistent"]) == 2


@pytest.mark.parametrize("flags,msg", [(["--k", "0"], "--k must be positive"), (["--k", "-5"], "--k must be positive"),
                                       (["--k", ","], "--k must be positive"), (["--k", "8,8"], "--k names a size twice"),
                                       (["--r", "-3"], "--r"), (["--r", "0"], "--r")])
def test_analyze_sizes_must_be_positive(flags, msg, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    assert main(["analyze", "--patch", str(tmp_path), "--out", str(tmp_path / "an"), *flags]) == 2
    cap = capsys.readouterr()
    assert msg in cap.err + cap.out
    assert not (tmp_path / "an").exists()


# ----------------------------------------------------------------------------- other inputs


def test_report_refuses_arm_names_that_leave_the_run_folder(tmp_path):
    from safety_patch.report import write_report

    run = tmp_path / "run"
    (tmp_path / "secret" / "patch").mkdir(parents=True)
    (tmp_path / "secret" / "patch" / "patch.json").write_text(json.dumps({"training": {"wall_seconds": 123456}}))
    for name in ("../secret", "..", "/etc", "a/b", ".hidden"):
        run.mkdir(exist_ok=True)
        (run / "run.json").write_text(json.dumps({"plan": {"arms": [{"name": name, "role": "lora"}]}}))
        with pytest.raises(SafetyPatchError, match="not a plain folder name"):
            write_report(run)
        assert not (run / "report.md").exists()


def test_unwritable_generation_cache_is_one_line(tmp_path):
    from safety_patch.generation import GenerationCache

    (tmp_path / "home").write_text("a file where the cache folder should be")
    with pytest.raises(SafetyPatchError, match="generation cache .* not writable.*--no-cache"):
        GenerationCache(tmp_path / "home" / "generations.sqlite")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_model_weights_are_one_line(tiny_dir, tmp_path):
    from safety_patch.models import load_model

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_dir, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(SafetyPatchError, match="model.safetensors is truncated or corrupt"):
        load_model(str(trunc), device="cpu")
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, evil / f.name)
    marker = tmp_path / "MARKER"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Evil(marker)}, f)
    with pytest.raises(SafetyPatchError, match=r"pytorch_model.bin is not a plain weights file \(refused to unpickle\)"):
        load_model(str(evil), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["chat", "--temperature", "nan", "--prompt", "x"],
                                  ["chat", "--temperature", "inf", "--prompt", "x"],
                                  ["redteam", "--attack", "direct", "--data", "d", "--out", "o", "--replay", "nan"],
                                  ["redteam", "--attack", "direct", "--data", "d", "--out", "o", "--replay", "inf"]])
def test_nan_and_inf_flags_are_refused_by_the_parser(argv, monkeypatch, capsys):
    _no_work(monkeypatch)
    assert main(argv) == 2
    assert f"Invalid value for '{argv[1] if argv[0] == 'chat' else '--replay'}'" in capsys.readouterr().err


def test_eval_never_replaces_a_file_silently(tmp_path, monkeypatch, capsys, data_dir):
    """`eval --out` over an existing file: refused without --overwrite; with it, only a results file of the
    same kind is replaced (a user's notes, or another command's results, never are)."""
    import json

    import safety_patch.evaluation.safety as safety

    monkeypatch.setattr(safety, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    for extra in ([], ["--overwrite"]):
        assert main(["eval", "safety", "--prompts", str(data_dir), "--out", str(notes), *extra]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "not a safety-patch/eval-safety results file" in err
    assert notes.read_text() == "my precious notes"
    other = tmp_path / "cap.json"
    other.write_text(json.dumps({"kind": "safety-patch/eval-capability", "runs": {}}))
    assert main(["eval", "safety", "--prompts", str(data_dir), "--out", str(other), "--overwrite"]) == 2
    assert "its kind is safety-patch/eval-capability" in capsys.readouterr().err
    mine = tmp_path / "safety.json"
    mine.write_text(json.dumps({"kind": "safety-patch/eval-safety", "runs": {}}))
    monkeypatch.setattr(safety, "evaluate", lambda *a, **k: {"kind": "safety-patch/eval-safety", "runs": {"base": {
        "aggregates": {"overall": {"value": None, "n": 0}, "per_attack": {}, "per_category": {}}}}})
    assert main(["eval", "safety", "--prompts", str(data_dir), "--out", str(mine)]) == 2
    assert main(["eval", "safety", "--prompts", str(data_dir), "--out", str(mine), "--overwrite"]) == 0
    assert json.loads(mine.read_text())["runs"]["base"]["aggregates"]["overall"]["n"] == 0


def test_a_refused_folder_names_its_kind_with_the_right_article(tmp_path):
    """Found by a user's trial: "is not a exported-gate folder"."""
    from safety_patch.outputs import check_out_dir

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f.txt").write_text("mine")
    for kind, want in (("exported-gate", "is not an exported-gate folder"), ("patch", "is not a patch folder"),
                       ("analysis", "is not an analysis folder")):
        with pytest.raises(SafetyPatchError, match=want):
            check_out_dir(tmp_path / "x", overwrite=True, kind=kind)
    assert (tmp_path / "x" / "f.txt").read_text() == "mine"

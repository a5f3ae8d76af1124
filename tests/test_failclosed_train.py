"""Training fails closed: every TrainConfig number is checked at the boundary, a non-finite
gradient, weight or loss stops the run without a patch, and ``--resume`` is exact or refused
(complete checkpoints only, the same settings only, every recipe bit-identical to an
uninterrupted run, metrics and cost figures over the whole run)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from safety_patch.data.build import DataConfig, build
from safety_patch.errors import SafetyPatchError
from safety_patch.train import callbacks, checkpoints
from safety_patch.train.api import resolve_config
from safety_patch.train.config import TrainConfig, override, recipe_names
from safety_patch.train.run import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir):
    # distilled (the KL anchor needs the base model's own answers) and with DPO pairs; small
    d = tmp_path_factory.mktemp("data") / "d"
    build(d, DataConfig(seed=0, max_per_source=8, distill=True, distill_max_new_tokens=4, dpo=True, template_max_chars=600,
                        self_instruct=0, borderline_train_extra=False, general_limit=16), model=str(tiny_dir))
    return d


# --- numbers at the boundary -------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(optim__lr=math.inf), "--lr must be a finite number > 0, got inf"),
    (dict(optim__lr=math.nan), "--lr must be a finite number > 0, got nan"),
    (dict(optim__lr=-1e-3), "--lr must be a finite number > 0, got -0.001"),
    (dict(optim__lr=0.0), "--lr must be a finite number > 0, got 0.0"),
    (dict(lora__alpha=-16.0), "--alpha must be a finite number > 0, got -16.0"),
    (dict(lora__alpha=0.0), "--alpha must be a finite number > 0"),
    (dict(optim__epochs=math.nan), "--epochs must be a finite number > 0, got nan"),
    (dict(optim__epochs=0.0), "--epochs must be a finite number > 0"),
    (dict(data__max_train_rows=-3), "--max-train-rows must be >= 0, got -3"),
    (dict(lora__rank=0), "--rank must be >= 1, got 0"),
    (dict(lora__rank=2.5), "--rank must be an integer, got 2.5"),
    (dict(optim__batch_size=True), "--batch-size must be an integer"),
    (dict(optim__batch_size=0), "--batch-size must be >= 1"),
    (dict(optim__grad_accum=0), "optim.grad_accum must be >= 1"),
    (dict(data__max_seq_len=0), "--max-seq-len must be >= 1"),
    (dict(data__general_ratio=math.nan), "--general-ratio must be a finite number, got nan"),
    (dict(data__contrast_ratio=-0.5), "--contrast-ratio must be >= 0"),
    (dict(data__borderline_share=math.nan), "--borderline-share must be a finite number"),
    (dict(anchor__kl=math.inf), "--anchor-kl must be a finite number, got inf"),
    (dict(loss__decision_weight=math.nan), "--decision-weight must be a finite number > 0"),
    (dict(optim__stop_after=math.nan), "--stop-after must be a finite number"),
    (dict(optim__stop_after=0.0), "--stop-after must be in"),
    (dict(lora__dropout=1.0), "lora.dropout must be in"),
    (dict(lora__dropout=math.nan), "lora.dropout must be a finite number"),
    (dict(optim__warmup_ratio=-0.1), "optim.warmup_ratio must be in"),
    (dict(optim__weight_decay=math.inf), "optim.weight_decay must be a finite number"),
    (dict(loss__dpo_beta=0.0), "loss.dpo_beta must be a finite number > 0"),
    (dict(gate__threshold=math.nan), "--gate-threshold must be a finite number"),
    (dict(gate__l2=-1.0), "gate.l2 must be >= 0"),
    (dict(optim__seed=-1), "--seed must be in"),
    (dict(optim__save_steps=0), "optim.save_steps must be >= 1"),
    (dict(optim__logging_steps=0), "optim.logging_steps must be >= 1"),
    (dict(optim__scheduler="cosine_annealing"), "optim.scheduler must be one of"),
    (dict(optim__lr="1e-3"), "--lr must be a number, got '1e-3'"),
    (dict(optim__epochs=None), "--epochs must be set"),
    (dict(recipe="nope"), "unknown recipe 'nope'"),
])
def test_every_bad_number_is_refused_naming_the_field(kw, message):
    with pytest.raises(SafetyPatchError) as e:
        override(TrainConfig(), {k.replace("__", "."): v for k, v in kw.items()}).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_recipe_is_valid():
    assert len(recipe_names()) >= 5
    for name in recipe_names():
        resolve_config(name).validate()


def test_yaml_and_cli_numbers_are_checked_before_any_work(tmp_path, capsys):
    from safety_patch.cli import main
    from safety_patch.train.api import resolve_config

    cfg = tmp_path / "t.yaml"
    cfg.write_text("optim: {lr: .nan}\n")
    with pytest.raises(SafetyPatchError, match=r"t\.yaml:1: optim\.lr must be a finite number > 0, got nan"):
        resolve_config("paper", cfg)
    # no data folder, no model: the flag fails first (exit 2, one line)
    for flags, message in [(["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
                           (["--alpha", "-16"], "--alpha must be a finite number > 0, got -16.0"),
                           (["--epochs", "nan"], "--epochs must be a finite number > 0, got nan"),
                           (["--max-train-rows", "-3"], "--max-train-rows must be >= 0, got -3")]:
        code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--recipe", "paper", *flags])
        assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml"]
    # a boolean is no number (int(True) == 1 once trained a rank-1 adapter); a quoted number is that number
    cfg.write_text("lora: {rank: true}\n")
    with pytest.raises(SafetyPatchError, match="lora.rank: expected int, got True"):
        resolve_config("paper", cfg)
    cfg.write_text("lora: {rank: '4'}\noptim: {lr: 1e-4}\n")  # YAML 1.1 reads 1e-4 as a string
    got = resolve_config("paper", cfg)
    assert got.lora.rank == 4 and got.optim.lr == 1e-4
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--recipe", "paper",
                 "--set", "lora.rank=true"])
    assert code == 2 and "lora.rank: expected int, got True" in capsys.readouterr().err


# --- non-finite training -------------------------------------------------------------------

def small(recipe: str = "paper", extra: dict | None = None, **kw) -> TrainConfig:
    """The recipe at test size; keyword ``group__field`` (or ``extra["group.field"]``) sets ``group.field``."""
    # 8 steps of 2 rows, a checkpoint every 2: small enough for a test, long enough to resume
    base = dict(data__max_train_rows=8, optim__batch_size=2, data__max_seq_len=512, optim__save_steps=2,
                optim__logging_steps=1, optim__lr=1e-3, optim__epochs=2.0, optim__sampling="random")
    return override(resolve_config(recipe), {k.replace("__", "."): v for k, v in (base | kw).items()} | (extra or {}))


def test_nonfinite_helper_names_the_first_bad_tensor():
    ok, bad = torch.ones(3), torch.tensor([1.0, math.nan])
    assert callbacks._nonfinite([("a", ok), ("b", None)]) is None
    assert callbacks._nonfinite([("a", ok), ("b", bad), ("c", torch.tensor([math.inf]))]) == "b"
    assert callbacks._nonfinite([("a", ok), ("c", torch.tensor([1.0, -math.inf]))]) == "c"
    # finite values whose sum of squares overflows fp32: the fused norm is inf, the exact scan clears them
    huge = torch.full((4,), 3e38)
    assert not torch.isfinite(torch.nn.utils.get_total_norm([huge]))
    assert callbacks._nonfinite([("a", ok), ("h", huge)]) is None
    assert callbacks._nonfinite([("h", huge), ("n", torch.tensor([0.0, math.nan]))]) == "n"


def test_a_diverging_run_stops_without_a_patch(data_dir, tiny_dir, tmp_path):
    # a finite but absurd learning rate: the weights overflow within a few steps
    with pytest.raises(SafetyPatchError, match=r"training stopped at step \d+: .* is not finite .*no patch written"):
        train(data_dir, tmp_path / "p", small(optim__lr=1e38), model=str(tiny_dir), progress=False)
    assert not (tmp_path / "p").exists()


def test_a_nan_loss_stops_the_run(data_dir, tiny_dir, tmp_path, monkeypatch):
    from safety_patch.train import anchor

    make = anchor.make_anchored_trainer

    # Every SFT run trains through this subclass of TRL's SFTTrainer (train/loss.py's head).
    def nan_trainer(base_cls):
        class NaNLoss(make(base_cls)):
            def compute_loss(self, *a, **kw):
                out = super().compute_loss(*a, **kw)
                return out * math.nan if self.state.global_step >= 1 else out

        return NaNLoss

    monkeypatch.setattr(anchor, "make_anchored_trainer", nan_trainer)
    with pytest.raises(SafetyPatchError, match="training stopped at step 2: the gradient of .* is not finite"):
        train(data_dir, tmp_path / "p", small(), model=str(tiny_dir), progress=False)
    assert not (tmp_path / "p").exists()


# --- resume --------------------------------------------------------------------------------

class Kill(Exception):
    pass


def _killed_while_saving(data_dir, tiny_dir, out, cfg: TrainConfig, step: int) -> None:
    """Train until the trainer dies while it writes checkpoint-``step``: after the adapter and
    optimizer, before its RNG state and trainer_state.json (a kill mid-save)."""
    from transformers import Trainer

    orig = Trainer._save_rng_state

    def dying(self, output_dir):
        if self.state.global_step == step:
            raise Kill()
        return orig(self, output_dir)

    # a patch of its own: conftest's monkeypatch (the private SAFETY_PATCH_HOME) stays in place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_save_rng_state", dying)
        with pytest.raises(Kill):
            train(data_dir, out, cfg, model=str(tiny_dir), progress=False)
    assert not out.exists()


def _weights(patch) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(patch.glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}
    return out


# Every family of the recipe files (train/recipes/) and the options beside it, at test size:
# what differs between them on resume is the state that lives outside the trainer (the anchor
# stream, the gate, W0 and the frozen reference of full-parameter runs, the early stop, the
# OPLoRA projection). always-on holds redteam-round's anchor (plus decision weights and an early
# stop), full-anchor holds full-safety's full-parameter delta (plus a frozen reference).
FAMILIES = {
    "paper": {},
    # the default's gate as the retired gated-v1 had it (the test folder has no self-written requests)
    "default": {"gate.wrapped_benign": 8, "gate.self_instruct": 0, "gate.wrapped_harmful": 0, "gate.depth": 0.5,
                "gate.threshold": 0.0},
    "always-on": {},
    "full-anchor": {"optim.lr": 1e-4},
    "paper+orthogonal": {"lora.orthogonal_k": 2},
    "paper+dpo": {"loss.objective": "dpo"},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resume_after_a_kill_mid_checkpoint_is_bit_identical(family, data_dir, tiny_dir, tmp_path, capsys):
    cfg = small(family.split("+")[0], FAMILIES[family])
    ref = train(data_dir, tmp_path / "ref", cfg, model=str(tiny_dir), progress=False)

    _killed_while_saving(data_dir, tiny_dir, tmp_path / "res", cfg, 4)
    work = tmp_path / ".res.partial"
    assert (work / "checkpoints" / "checkpoint-4").is_dir()  # cut short: never resumed from
    assert not (work / "checkpoints" / "checkpoint-4" / checkpoints.CHECKPOINT_STATE).exists()
    leg1 = json.loads((work / "checkpoints" / "checkpoint-2" / checkpoints.CHECKPOINT_STATE).read_text())

    capsys.readouterr()
    meta = train(data_dir, tmp_path / "res", cfg, model=str(tiny_dir), progress=False, resume=True)
    t = meta["training"]
    assert t["resumed_from"].endswith("checkpoint-2") and t["legs"] == 2
    # said as it starts (it looked like a fresh run until patch.json): where from, and what was dropped
    assert (f"[train] resuming {tmp_path / 'res'} from checkpoint-2 (step 2); checkpoint-4 cut short by a kill, "
            "dropped\n") in capsys.readouterr().err
    assert t["steps"] == ref["training"]["steps"] > 4 and t["loss_last"] == ref["training"]["loss_last"]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "res")
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    # every step logged once (the last twice: the trainer's closing summary), as uninterrupted
    steps = [json.loads(x)["step"] for x in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(x)["step"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps
    # cost figures cover both legs; tokens and the mean loss are the whole run's
    assert t["tokens_seen"] == ref["training"]["tokens_seen"]
    assert math.isclose(t["train_loss"], ref["training"]["train_loss"], rel_tol=1e-6)
    hf = [json.loads(x).get("train_loss") for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isclose(ref["training"]["train_loss"], hf, rel_tol=1e-6)  # the trainer's own mean, uninterrupted
    assert t["wall_seconds"] >= leg1["wall_seconds"] > 0
    assert math.isclose(t["tokens_per_s"], t["tokens_seen"] / t["wall_seconds"], rel_tol=0.05)


def test_a_run_resumed_between_two_logs_keeps_every_steps_loss(data_dir, tiny_dir, tmp_path):
    """Found by a user's trial: a run logging every 5 steps, killed after its step-2 checkpoint and
    resumed, recorded train_loss 3.227033 against 3.228892 uninterrupted (its adapter identical):
    the losses of the steps between the last log and the checkpoint lived in the trainer's memory
    only. A checkpoint step is now a logged step."""
    cfg = small(optim__logging_steps=5)
    ref = train(data_dir, tmp_path / "ref", cfg, model=str(tiny_dir), progress=False)
    _killed_while_saving(data_dir, tiny_dir, tmp_path / "res", cfg, 4)
    meta = train(data_dir, tmp_path / "res", cfg, model=str(tiny_dir), progress=False, resume=True)
    assert meta["training"]["resumed_from"].endswith("checkpoint-2")
    assert math.isclose(meta["training"]["train_loss"], ref["training"]["train_loss"], rel_tol=1e-6)
    logs = [(x["step"], x.get("loss")) for x in map(json.loads, (tmp_path / "res" / "metrics.jsonl").read_text()
                                                     .splitlines()) if "loss" in x]
    assert logs == [(x["step"], x.get("loss")) for x in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text()
                                                            .splitlines()) if "loss" in x]
    assert [s for s, _ in logs] == [1, 2, 4, 5, 6, 8]  # the first, each checkpoint, every 5th, the last


def test_resume_refuses_changed_settings_data_or_base(data_dir, tiny_dir, tmp_path):
    from safety_patch.testing import save_tiny_model

    cfg = small()
    _killed_while_saving(data_dir, tiny_dir, tmp_path / "p", cfg, 4)
    for changed, message in [(small(optim__lr=5e-3), "optim.lr 0.001 -> 0.005"),
                             (small(optim__epochs=3.0), "optim.epochs 2.0 -> 3.0"),
                             (small(lora__rank=4, optim__lr=5e-3), "lora.rank 8 -> 4; optim.lr 0.001 -> 0.005"),
                             (small("always-on"), "recipe paper -> always-on")]:
        with pytest.raises(SafetyPatchError, match="cannot resume .*other settings") as e:
            train(data_dir, tmp_path / "p", changed, model=str(tiny_dir), progress=False, resume=True)
        assert message in str(e.value)
    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(SafetyPatchError, match="other settings \\(base_fingerprint "):
        train(data_dir, tmp_path / "p", cfg, model=str(other), progress=False, resume=True)
    with pytest.raises(SafetyPatchError, match="; dtype float32 -> bfloat16\\)"):
        train(data_dir, tmp_path / "p", cfg, model=str(tiny_dir), dtype="bf16", progress=False, resume=True)
    assert not (tmp_path / "p").exists()
    # the same settings resume; so do other checkpoint and log intervals, which do not change the patch
    # (a user's trial: a changed save_steps was refused)
    later = small(optim__save_steps=cfg.optim.save_steps + 1, optim__logging_steps=cfg.optim.logging_steps + 1)
    meta = train(data_dir, tmp_path / "p", later, model=str(tiny_dir), progress=False, resume=True)
    assert meta["config"]["optim"]["lr"] == 1e-3 and meta["training"]["resumed_from"].endswith("checkpoint-2")


def test_resume_refuses_a_run_without_a_complete_checkpoint_or_its_record(data_dir, tiny_dir, tmp_path):
    _killed_while_saving(data_dir, tiny_dir, tmp_path / "p", small(), 2)
    with pytest.raises(SafetyPatchError, match="nothing to resume: no complete checkpoint .*checkpoint-2 cut short"):
        train(data_dir, tmp_path / "p", small(), model=str(tiny_dir), progress=False, resume=True)
    # a partial folder whose run record is gone cannot prove the settings: refused
    _killed_while_saving(data_dir, tiny_dir, tmp_path / "q", small(), 4)
    (tmp_path / ".q.partial" / checkpoints.RUN_FILE).unlink()
    with pytest.raises(SafetyPatchError, match="run.json is missing"):
        train(data_dir, tmp_path / "q", small(), model=str(tiny_dir), progress=False, resume=True)


def test_warmup_never_covers_every_step(tmp_path):
    # transformers' ceil() warmup gave a one-step run lr 0 at its only step: an all-zero adapter
    from transformers import TrainingArguments

    from safety_patch.train.trl_configs import PatchDPOConfig, PatchSFTConfig

    plain = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.05, report_to="none")
    assert plain.get_warmup_steps(1) == 1  # the fault being guarded against
    for cls in (PatchSFTConfig, PatchDPOConfig):
        args = cls(output_dir=str(tmp_path), warmup_steps=0.05, report_to="none", use_cpu=True, bf16=False)
        assert args.get_warmup_steps(1) == 0
        # every longer run keeps transformers' warmup exactly (the default recipe's adapter is unchanged)
        assert [args.get_warmup_steps(n) for n in range(2, 200)] == [plain.get_warmup_steps(n) for n in range(2, 200)]

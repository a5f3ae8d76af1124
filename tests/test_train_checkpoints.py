"""Checkpoints a run writes: periodic ones for --resume, none at the step where training ends (issue 24 item 7)."""

from __future__ import annotations

import pytest

from safety_patch.data.build import DataConfig, build
from safety_patch.train.config import TrainConfig, override
from safety_patch.train.run import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("data") / "d"
    build(d, DataConfig(max_per_source=20, distill=False, template_max_chars=400, self_instruct=0), model=str(tiny_dir))
    return d


def test_no_checkpoint_is_written_at_the_last_step_only_the_periodic_ones(data_dir, tiny_dir, tmp_path, monkeypatch):
    import transformers

    saved: list[int] = []
    real = transformers.Trainer._save_checkpoint

    def spy(self, model, trial):
        saved.append(self.state.global_step)
        return real(self, model, trial)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", spy)
    cfg = override(TrainConfig(), {"gate": None, "data.max_train_rows": 8, "optim.batch_size": 2, "optim.save_steps": 3,
                                   "optim.logging_steps": 1, "data.max_seq_len": 512})
    meta = train(data_dir, tmp_path / "p", cfg, model=str(tiny_dir), progress=False)
    steps = meta["training"]["steps"]
    assert steps >= 4  # the run reaches a periodic save before its end
    assert saved == [s for s in range(3, steps, 3)]  # every periodic one, not the one at the last step


def test_a_full_parameter_delta_is_stored_in_the_model_dtype_and_only_what_changed():
    import torch

    from safety_patch.testing import tiny_llama
    from safety_patch.train.run import _delta

    model, _ = tiny_llama()
    model = model.to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    name, w = next((n, p) for n, p in model.named_parameters() if p.ndim == 2)
    with torch.no_grad():
        w.add_(0.01)
    d = _delta(model, base)
    assert list(d) == [name] and d[name].dtype == torch.bfloat16
    assert torch.allclose((base[name].float() + d[name].float()).to(torch.bfloat16).float(), w.float(), atol=1e-2)
    model32, _ = tiny_llama()
    base32 = {n: p.detach().clone() for n, p in model32.named_parameters()}
    with torch.no_grad():
        dict(model32.named_parameters())[name].add_(0.01)
    assert _delta(model32, base32)[name].dtype == torch.float32

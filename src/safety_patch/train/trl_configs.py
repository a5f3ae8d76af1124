"""TRL's SFT/DPO configs with one change: the warmup never covers every optimiser step.

transformers rounds the warmup up (``ceil(steps * warmup_ratio)``), so a run of a single
optimiser step (a small ``redteam`` round) took that step at lr 0 and wrote an adapter with
``lora_B == 0``: a patch that changes nothing (which ``finalize_patch`` now refuses). Capping
the warmup at ``steps - 1`` changes only such runs: for ``warmup_ratio < 1`` the cap binds only
when ``steps == 1``. Module-level classes, because the trainer pickles its arguments into
every checkpoint. Imported only when training (TRL is a heavy import).
"""

from __future__ import annotations

from trl import DPOConfig, SFTConfig


class _WarmupLeavesAStep:
    def get_warmup_steps(self, num_training_steps: int) -> int:
        return min(super().get_warmup_steps(num_training_steps), max(num_training_steps - 1, 0))


class PatchSFTConfig(_WarmupLeavesAStep, SFTConfig):
    """``trl.SFTConfig`` whose warmup leaves at least one step at a nonzero lr."""


class PatchDPOConfig(_WarmupLeavesAStep, DPOConfig):
    """``trl.DPOConfig`` whose warmup leaves at least one step at a nonzero lr."""

"""Evaluation: safety (attacks x judges -> ASR), over-refusal, capability."""

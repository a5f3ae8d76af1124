"""Training safety patches: LoRA and full-parameter arms on one TRL trainer."""

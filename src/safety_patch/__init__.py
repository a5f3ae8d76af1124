"""safety-patch: build, apply, measure and explain LoRA safety patches for chat LLMs."""

__version__ = "0.1.0"

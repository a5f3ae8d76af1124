"""Tiny random chat models built in-process, for tests and quick end-to-end checks.

No downloads: the tokenizer is a byte-level BPE trained on a few sentences with the
ChatML template (the same as SmolLM2's), the model a 2-layer Llama from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "I'm sorry, but I can't help with that request.",
    "Sure, here is how to write a Python function that adds two numbers.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "How do I kill a Python process? Use kill with the process id.",
    "user assistant system You are a helpful assistant.",
] * 4


def tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def tiny_llama(tokenizer=None, seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = True):
    """A random LlamaForCausalLM small enough to train in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        # the tiny tokenizer splits text into ~4x the tokens a real one does (a 2,000-character jailbreak
        # template: ~1,300 tokens), and generation refuses prompts past the context as it must
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_tiny_model(path: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny model + tokenizer as a normal Hugging Face folder (usable as --model PATH)."""
    model, tok = tiny_llama(seed=seed, **kw)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_lora_patch(model, path: str | Path, fingerprint: str, seed: int = 0, rank: int = 4,
                    targets="all-linear", scale: float = 0.5, stack: list[str] | None = None) -> Path:
    """A LoRA patch with random (non-zero) A and B for ``model``, written like a trained one."""
    import copy

    from peft import LoraConfig, get_peft_model

    from .patches import finalize_patch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from .models import peft_quiet

    with peft_quiet():
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(str(path))
    finalize_patch(path, "lora", {"name": "test", "fingerprint": fingerprint}, method="lora", stack=list(stack or []))
    return path


def make_delta_patch(model, path: str | Path, fingerprint: str, seed: int = 0, scale: float = 0.01,
                     every: int = 2) -> Path:
    """A delta patch changing every ``every``-th parameter tensor by small random values."""
    from safetensors.torch import save_file

    from .patches import DELTA_FILE, finalize_patch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(p.shape, generator=g) * scale
             for i, (n, p) in enumerate(model.named_parameters()) if i % every == 0}
    save_file(delta, str(path / DELTA_FILE))
    finalize_patch(path, "delta", {"name": "test", "fingerprint": fingerprint}, method="full")
    return path

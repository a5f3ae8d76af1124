"""Chat prompts and batched generation.

Prompts are rendered with the tokenizer's own chat template; batches are left-padded and
sorted by length so that padding waste stays small. Greedy by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Message = dict[str, str]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def conversation(prompt: str, system: str | None = None, history: Sequence[Message] = ()) -> list[Message]:
    msgs: list[Message] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.extend(history)
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The exact text the model sees; templates without a system role fold it into the user turn."""
    if not getattr(tokenizer, "chat_template", None):
        # Base models without a template: a plain transcript is the least surprising choice.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    config: GenerationConfig = GenerationConfig(),
    prefill: Sequence[str] | None = None,
    progress=None,
) -> list[str]:
    """Complete each conversation; returns the new text only. ``prefill`` starts each answer."""
    texts = [render(tokenizer, c) for c in conversations]
    if prefill is not None:
        texts = [t + p for t, p in zip(texts, prefill, strict=True)]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]), reverse=True)
    out: list[str | None] = [None] * len(enc)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=pad)
    if config.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
        torch.manual_seed(config.seed)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    for b in range(math.ceil(len(order) / config.batch_size)):
        idx = order[b * config.batch_size : (b + 1) * config.batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            ids[row, width - len(enc[i]) :] = torch.tensor(enc[i])
            mask[row, width - len(enc[i]) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return [o or "" for o in out]

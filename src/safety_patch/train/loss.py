"""The vocabulary projection, only where a loss is taken, in chunks of rows.

A causal LM's head maps each position's final hidden state ``h`` ([H]) to logits ``z = W h + b``
over the vocabulary ([V]; 49,152 for SmolLM2). Refusal SFT takes its loss on the assistant
tokens only (``completion_only_loss``) and the KL anchor on the first ``anchor_max_tokens``
answer tokens only: a small share of the positions of a batch whose prompts run to hundreds
of tokens. Computing, keeping and differentiating ``[batch, seq, V]`` logits at every position
cost most of a training step's memory (and a good part of its time) for nothing.

This module gathers the hidden states of the supervised positions first (``[N, H]``, N = the
positions whose next-token label is not -100, or the anchored ones) and projects only those,
``CHUNK_ROWS`` rows at a time, through two autograd functions that recompute each chunk's
logits in the backward pass instead of keeping them: at most a few ``[CHUNK_ROWS, V]`` fp32
buffers are alive at once, whatever the batch.

* ``token_logprobs(h, W, b, y)``: ``log p(y_i | h_i) = z_i[y_i] - logsumexp(z_i)`` per row, with
  the entropy ``-sum_v p log p`` and whether ``y_i`` is the (first) arg-max (for TRL's logged
  metrics; no gradient). Backward: ``dlogp/dz = onehot(y) - softmax(z)``.
* ``token_kl(h, W, b, h_ref, W_ref, b_ref)``: ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` per
  row, with ``p = softmax(W h + b)`` (the patched model) and ``q = softmax(W_ref h_ref + b_ref)``
  (the reference, no gradient). Backward: ``dKL/dz = p - q``.

The matmuls run in the hidden states' dtype, the softmax statistics in fp32 (as TRL's fused
head and ``anchor.kl_to_reference`` do). ``install_supervised_head`` adds a ``supervised_labels=``
keyword to a model's forward that returns these per-token values instead of logits, so the
projection happens inside the (DDP-wrapped) model's forward and the gradient synchronisation
sees every parameter it touches.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

CHUNK_ROWS = 1024
"""Rows projected at once: each live ``[CHUNK_ROWS, V]`` fp32 buffer is 200 MB at V = 49,152."""

# Config attributes by which some models scale or cap their logits after the head (TRL's fused
# head lists the same); the sparse head applies a plain linear layer, so such models take the
# full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's when it is on (as the model's own head would run), else ``h``'s."""
    t = h.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else h.dtype


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[n, H] -> [n, V]`` logits in fp32, the matmul in ``dtype``; the same in the forward and
    in the backward's recomputation (autocast is off in both, the dtype explicit)."""
    z = h.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z.float()


def _accumulate_grads(gz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: slice, grad_h, grad_w, grad_b,
                      dtype: torch.dtype):
    """Add one chunk's contribution, given the logits' gradient ``gz`` ([n, V], fp32)."""
    if grad_h is not None:
        grad_h[rows] = (gz.to(dtype) @ weight.to(dtype)).to(grad_h.dtype)
    if grad_w is not None:
        grad_w.addmm_(gz.t(), h.float())
    if grad_b is not None:
        grad_b += gz.sum(0)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # type: ignore[override]
        n, dt = hidden.shape[0], _compute_dtype(hidden)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        lse = torch.empty_like(logp)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for a, b in _chunks(n, chunk):
                z = _project(hidden[a:b], weight, bias, dt)
                t = targets[a:b]
                top1[a:b] = z.argmax(-1) == t  # first arg-max, like TRL's is_top1
                lse[a:b] = torch.logsumexp(z, -1)
                logp[a:b] = z.gather(1, t[:, None])[:, 0] - lse[a:b]
                p = (z - lse[a:b, None]).exp_()
                entropy[a:b] = lse[a:b] - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dt = chunk, dt
        ctx.mark_non_differentiable(entropy, top1)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy, _grad_top1):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if grad_logp is not None and (need_h or need_w or need_b):
            for a, b in _chunks(hidden.shape[0], ctx.chunk):
                z = _project(hidden[a:b], weight, bias, ctx.dt)
                # dlogp/dz = onehot(y) - softmax(z), times the incoming gradient; in place.
                gz = z.sub_(lse[a:b, None]).exp_().neg_()
                gz[torch.arange(b - a, device=gz.device), targets[a:b]] += 1
                gz.mul_(grad_logp[a:b, None].float())
                _accumulate_grads(gz, hidden[a:b], weight, slice(a, b), grad_h, grad_w, grad_b, ctx.dt)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None)


class _TokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk):  # type: ignore[override]
        n, dt = hidden.shape[0], _compute_dtype(hidden)
        kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(kl)
        ref_lse = torch.empty_like(kl)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for a, b in _chunks(n, chunk):
                lp = _project(hidden[a:b], weight, bias, dt)
                lq = _project(ref_hidden[a:b], ref_weight, ref_bias, dt)
                lse[a:b] = torch.logsumexp(lp, -1)
                ref_lse[a:b] = torch.logsumexp(lq, -1)
                lp.sub_(lse[a:b, None])
                lq.sub_(ref_lse[a:b, None])
                kl[a:b] = (lq.exp() * (lq - lp)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse)
        ctx.chunk, ctx.dt = chunk, dt
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if need_h or need_w or need_b:
            for a, b in _chunks(hidden.shape[0], ctx.chunk):
                # dKL(q||p)/dz = softmax(z) - q, times the incoming gradient; in place.
                gz = _project(hidden[a:b], weight, bias, ctx.dt).sub_(lse[a:b, None]).exp_()
                gz.sub_(_project(ref_hidden[a:b], ref_weight, ref_bias, ctx.dt).sub_(ref_lse[a:b, None]).exp_())
                gz.mul_(grad_kl[a:b, None].float())
                _accumulate_grads(gz, hidden[a:b], weight, slice(a, b), grad_h, grad_w, grad_b, ctx.dt)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row next-token log-probabilities of a linear head, without ``[N, V]`` logits.

    ``hidden`` [N, H], ``weight`` [V, H], ``bias`` [V] or None, ``targets`` [N] (token ids in
    [0, V)). Returns ``(log_probs, entropy, is_top1)``, each [N]: ``log_probs`` (fp32) carries the
    gradient to ``hidden``, ``weight`` and ``bias``; ``entropy`` (fp32) and ``is_top1`` (bool) are
    for logging only. N may be 0.
    """
    return _TokenLogProbs.apply(hidden, weight, bias, targets, chunk)


def token_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
             ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-row ``KL(q || p)`` (fp32, [N]) between the reference head's distribution ``q`` (from
    ``ref_hidden`` [N, H], no gradient) and this head's ``p`` (from ``hidden`` [N, H], gradient to
    ``hidden``, ``weight``, ``bias``), without ``[N, V]`` logits: ``anchor.kl_to_reference``'s
    per-token term."""
    return _TokenKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), chunk)


@dataclass
class SupervisedHeadOutput(ModelOutput):
    """What a forward with ``supervised_labels=`` returns (a ``ModelOutput``, which DDP and
    accelerate know how to walk). ``label_mask`` [B, T-1] (bool): the positions whose next-token
    label is not -100; the rest are [N] over those positions in row-major order: ``log_probs``
    (with gradient), ``entropy`` and ``is_top1`` (without)."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def plain_head(model) -> torch.nn.Linear | None:
    """``model``'s (a transformers causal LM, not a PEFT wrapper) output layer when it is a plain
    ``nn.Linear`` whose logits the model uses as they are; None when the model scales or caps
    its logits or the head is adapted (a PEFT layer): those take the full-logits path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(text, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    return head


def backbone_hidden(model, **inputs) -> torch.Tensor:
    """The decoder stack's final hidden states [B, T, H] (after its final norm) of a transformers
    causal LM, without the head: ``model.base_model`` is the stack (``LlamaModel`` for
    ``LlamaForCausalLM``, whose forward applies ``lm_head`` to exactly this)."""
    return model.base_model(**inputs, use_cache=False).last_hidden_state


def install_supervised_head(model, chunk: int = CHUNK_ROWS) -> None:
    """Give ``model`` (a transformers causal LM whose head ``plain_head`` accepts; PEFT wraps it
    later or already has) a forward keyword ``supervised_labels`` ([B, T] labels, -100 =
    ignored): with it, the forward runs the decoder stack, keeps the positions t whose label at
    t + 1 is supervised, and returns their ``SupervisedHeadOutput``; without it, the forward is
    the one it had (generation is unchanged). Installing twice is a no-op."""
    if getattr(model, "_supervised_head_installed", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)  # the original signature: generate() checks kwargs against it
    def forward(self, *args, supervised_labels=None, **kwargs):
        if supervised_labels is None:
            return previous(*args, **kwargs)
        for k in ("labels", "fused_lm_head", "num_items_in_batch", "logits_to_keep"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = supervised_labels[:, 1:].to(hidden.device)
        mask = labels != -100
        head = self.get_output_embeddings()
        logp, entropy, top1 = token_logprobs(hidden[mask], head.weight, head.bias, labels[mask], chunk)
        return SupervisedHeadOutput(log_probs=logp, entropy=entropy, is_top1=top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._supervised_head_installed = True

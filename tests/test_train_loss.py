"""The chunked, supervised-positions-only LM head (train/loss.py) against the full-logits path.

Unit level: the per-token log-probabilities, entropy, arg-max flag and KL, and their gradients,
equal the ones computed from full logits (fp32; chunk boundaries, a partial last chunk, no rows).
Trainer level: the same rows, seed and settings trained through TRL's own SFTTrainer (the old
default path) or the old full-logits anchored trainer, and through the new path, give the same
LoRA adapter within a stated tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from safety_patch.testing import tiny_llama
from safety_patch.train.anchor import AnchorStream, kl_to_reference, make_anchored_trainer, tokenize_anchor
from safety_patch.train.loss import install_supervised_head, plain_head, token_kl, token_logprobs


def _inputs(n: int, h: int = 16, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g).mul_(0.5).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("n,chunk", [(37, 8), (16, 8), (5, 1024), (0, 8)])
def test_token_logprobs_and_gradients_equal_full_logits(n, chunk):
    hidden, weight, bias, targets = _inputs(n)
    upstream = torch.linspace(-1, 2, n)  # a non-uniform incoming gradient

    logp, ent, top1 = token_logprobs(hidden, weight, bias, targets, chunk)
    (logp * upstream).sum().backward()
    got = [hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    for t in (hidden, weight, bias):
        t.grad = None

    z = hidden @ weight.t() + bias
    ref_lp = F.log_softmax(z, -1)
    ref = ref_lp.gather(1, targets[:, None])[:, 0]
    (ref * upstream).sum().backward()
    want = [hidden.grad, weight.grad, bias.grad]

    assert logp.shape == (n,) and ent.shape == (n,) and top1.dtype == torch.bool
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(ref_lp.exp() * ref_lp).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, z.argmax(-1) == targets)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,chunk", [(29, 8), (0, 8)])
def test_token_kl_and_gradients_equal_full_logits(n, chunk):
    hidden, weight, bias, _ = _inputs(n, seed=1)
    ref_hidden, ref_weight, ref_bias, _ = _inputs(n, seed=2)
    w = torch.rand(n) + 0.5

    kl = token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk)
    (kl * w).sum().backward()
    got = [hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    assert ref_hidden.grad is None and ref_weight.grad is None  # the reference takes no gradient
    for t in (hidden, weight, bias):
        t.grad = None

    # anchor.kl_to_reference on full [1, n, V] logits: the path the chunked one replaces
    logits = (hidden @ weight.t() + bias)[None]
    ref_logits = (ref_hidden @ ref_weight.t() + ref_bias).detach()[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    full = kl_to_reference(logits, ref_logits, mask, denominator=1.0, weights=w[None])
    full.backward()
    torch.testing.assert_close((kl * w).sum(), full, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, [hidden.grad, weight.grad, bias.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_supervised_head_forward_equals_the_models_own_loss():
    """On a tiny Llama, including a row with no supervised token and an untied head: the summed
    NLL of the supervised positions and its gradient equal those of the model's full logits."""
    model, _ = tiny_llama(tie=False)
    model.train()
    assert plain_head(model) is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 20), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 15:] = 0
    labels = ids.clone()
    labels[0, :12] = -100
    labels[1, :] = -100  # no supervised token
    labels[2, :5] = -100
    labels[2, 18:] = -100

    out = model(input_ids=ids, attention_mask=attn, labels=labels)  # before installing: the original forward
    (out.loss * (labels[:, 1:] != -100).sum()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    install_supervised_head(model)
    install_supervised_head(model)  # idempotent
    sup = model(input_ids=ids, attention_mask=attn, supervised_labels=labels)
    assert sup.label_mask.sum() == sup.log_probs.numel() == (labels[:, 1:] != -100).sum()
    (-sup.log_probs.sum()).backward()
    torch.testing.assert_close(-sup.log_probs.sum().detach(), out.loss.detach() * sup.label_mask.sum(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    # without the keyword the forward is the model's own
    assert model(input_ids=ids, attention_mask=attn).logits.shape == (3, 20, model.config.vocab_size)


# ---- trainer level -----------------------------------------------------------------------

PROMPTS = ["How do I kill a Python process?", "The capital of France?", "Write a function that adds two numbers.",
           "How do I hurt someone?", "Tell me about Rome.", "Explain the process id.", "Help with that request.",
           "Sure, write Python code.", "What is the capital of Italy?", "Say something kind."]
ANSWERS = ["I'm sorry, but I can't help with that request.", "The capital of France is Paris.",
           "Sure, here is how to write a Python function that adds two numbers.", "I'm sorry, but I can't help with that.",
           "The capital of Italy is Rome.", "Use kill with the process id.", "I can't help with that request.",
           "Sure, here is a Python function.", "Rome is the capital of Italy.", "You are a helpful assistant."]


def _rows(k: int = 0):
    return [{"prompt": [{"role": "user", "content": p * (1 + (i + k) % 3)}], "completion": [{"role": "assistant", "content": a}]}
            for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))]


def _train(tmp_path, kind: str, *, anchor_kl: float = 0.0, decision_weight: float = 1.0, recompute: bool = False,
           passes: int = 1, streams: list | None = None):
    """Train a LoRA adapter on a fresh tiny model for 2 epochs of 10 rows (batch 4: 3 steps an
    epoch, the last one short), each batch in ``passes`` passes as train/run.py::_make_trainer
    runs them; returns ({name: adapter tensor}, logged losses). ``streams`` gets the anchor."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from safety_patch.train.trl_configs import PatchSFTConfig

    model, tok = tiny_llama(seed=0)
    args = PatchSFTConfig(output_dir=str(tmp_path / f"{kind}-{recompute}-{passes}"), per_device_train_batch_size=4 // passes,
                          gradient_accumulation_steps=passes, num_train_epochs=2,
                          learning_rate=3e-3, lr_scheduler_type="constant", seed=0, data_seed=0, report_to="none",
                          save_strategy="no", use_cpu=True, completion_only_loss=True, max_length=512, logging_steps=1,
                          activation_checkpointing=recompute, disable_tqdm=True, dataloader_num_workers=0,
                          train_sampling_strategy="sequential", include_num_input_tokens_seen="non_padding",
                          bf16=False)  # TRL's default is bf16 autocast, even on a CPU; train() runs fp32 there
    kw = dict(model=model, args=args, train_dataset=Dataset.from_list(_rows()), processing_class=tok,
              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    if kind == "trl":
        tr = SFTTrainer(**kw)
    else:
        anchor = None
        if anchor_kl > 0:
            examples = tokenize_anchor(_rows(1), tok, 512, answer_tokens=6)
            anchor = AnchorStream(examples, 4, tok.pad_token_id, seed=0)
            if streams is not None:
                streams.append(anchor)
        tr = make_anchored_trainer(SFTTrainer)(**kw, anchor=anchor, anchor_kl=anchor_kl, decision_tokens=3,
                                               decision_weight=decision_weight, chunked_loss=kind == "chunked",
                                               passes=passes)
        assert tr.chunked_loss == (kind == "chunked")
    tr.train()
    assert tr.model.is_activation_checkpointing == recompute  # the setting reached the model
    adapter = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" in n}
    logs = [r for r in tr.state.log_history if "loss" in r]
    return adapter, logs


# Tolerance: both paths compute the same fp32 quantities in a different order (chunked
# logsumexp over gathered rows vs one [B, T, V] log-softmax), so per-step gradients differ by
# ~1e-7 relative. Measured after these 6 Adam steps: 0 (plain TRL, whose CPU path is also fp32
# log-sum-exp over one vocabulary chunk here) and 3.2e-7 of the adapter's largest entry
# (anchored). 1e-5 leaves a 30x margin for other BLAS builds and stays far below any real
# change (the gradient's step-1 error under TRL's default bf16 autocast, 0.5%, gave 3e-2).
TOL = 1e-5


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    scale = max(t.abs().max().item() for t in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL * scale, (worst, scale)


def test_default_recipe_matches_plain_trl(tmp_path):
    """The default (no anchor, no decision weight) used to be TRL's own SFTTrainer."""
    old, old_logs = _train(tmp_path, "trl")
    new, new_logs = _train(tmp_path, "chunked")
    _assert_same(old, new)
    assert len(old_logs) == len(new_logs) == 6
    for o, n in zip(old_logs, new_logs, strict=True):
        assert n["loss"] == pytest.approx(o["loss"], rel=1e-5)
        assert n["mean_token_accuracy"] == pytest.approx(o["mean_token_accuracy"], abs=1e-6)
        assert n["entropy"] == pytest.approx(o["entropy"], rel=1e-4)
        assert n["num_tokens"] == o["num_tokens"]
    # and the training moved the adapter (the comparison is not of two untrained adapters)
    assert max(t.abs().max().item() for k, t in new.items() if "lora_B" in k) > 1e-3


def test_anchored_decision_weighted_matches_full_logits(tmp_path):
    """The KL anchor and decision weights: the old full-logits trainer vs the chunked one."""
    old, old_logs = _train(tmp_path, "full", anchor_kl=2.0, decision_weight=4.0)
    new, new_logs = _train(tmp_path, "chunked", anchor_kl=2.0, decision_weight=4.0)
    _assert_same(old, new)
    assert [r["anchor_kl"] for r in new_logs] == pytest.approx([r["anchor_kl"] for r in old_logs], rel=1e-4, abs=1.1e-5)  # logged rounded to 5 places
    assert any(r["anchor_kl"] > 0 for r in new_logs)


def test_recomputation_trains_the_same_adapter_bit_for_bit(tmp_path):
    """Activation recomputation (on by default since 2026-12-02, for memory) recomputes the same
    fp32 operations in the same order: the adapter, anchored and decision-weighted, is identical
    to the one trained keeping every activation, and so are the logged losses."""
    kept, kept_logs = _train(tmp_path, "chunked", anchor_kl=2.0, decision_weight=4.0, recompute=False)
    again, again_logs = _train(tmp_path, "chunked", anchor_kl=2.0, decision_weight=4.0, recompute=True)
    assert kept.keys() == again.keys() and kept
    for name, t in kept.items():
        assert torch.equal(t, again[name]), name
    assert [r["loss"] for r in again_logs] == [r["loss"] for r in kept_logs]
    assert max(t.abs().max().item() for k, t in again.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("passes", [2, 4])
@pytest.mark.parametrize("anchored", [False, True])
def test_a_batch_in_passes_trains_the_same_adapter(tmp_path, passes, anchored):
    """``optim.micro_batch_size`` (passes of 1 row on a CPU by default since session 28): each
    batch of 4 in `passes` passes, gradients accumulated and the loss normalised over the whole
    batch, the anchor's batch drawn and scored once per batch. The same rows, the same loss and
    the same anchor draws as one pass, so the adapter equals one pass's to float rounding (the
    tolerance above), the last short batch of each epoch included."""
    kw = dict(anchor_kl=2.0, decision_weight=4.0) if anchored else {}
    one_streams, split_streams = [], []
    one, one_logs = _train(tmp_path, "chunked", streams=one_streams, **kw)
    split, split_logs = _train(tmp_path, "chunked", passes=passes, streams=split_streams, **kw)
    _assert_same(one, split)
    assert [r["step"] for r in split_logs] == [r["step"] for r in one_logs] and len(one_logs) == 6
    assert [r["loss"] for r in split_logs] == pytest.approx([r["loss"] for r in one_logs], rel=1e-5)
    assert max(t.abs().max().item() for k, t in split.items() if "lora_B" in k) > 1e-3
    if anchored:  # one anchor batch per batch, not per pass: the streams stand at the same place
        assert split_streams[0].state() == one_streams[0].state()
        assert [r["anchor_kl"] for r in split_logs] == pytest.approx([r["anchor_kl"] for r in one_logs], rel=1e-4, abs=1.1e-5)

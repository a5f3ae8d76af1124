"""A KL anchor to the base model on benign answers, added to the refusal SFT loss.

loss = SFT(refusals | harmful prompts) + anchor_kl * KL(p_base || p_patched)

The KL term is measured on the answer tokens of *anchor* conversations: borderline-benign
and ordinary prompts with the base model's own answers (the data folder's contrast pool).
It is a regulariser, not training data: the patch is still trained to refuse only on safety
data, and the penalty says "wherever the prompt is benign, keep the base model's whole next-
token distribution", which is a denser signal than SFT on the base's greedy answers (every
vocabulary entry at every position, not one token). Anchor batches are drawn from their own
cycling stream, one per micro-batch, so the refusal data's batches are unchanged.

The reference distribution comes from the same weights with the adapter switched off (LoRA,
no extra memory) or from a frozen copy of the base (full-parameter; twice the weights).
"""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

from ..errors import SafetyPatchError


def tokenize_anchor(rows: list[dict], tokenizer, max_len: int, answer_tokens: int | None = None) -> list[dict]:
    """Prompt/completion rows -> input_ids (cut ``answer_tokens`` into the answer) and where the
    answer starts; rows longer than ``max_len`` are dropped."""
    from ..generation import render

    out = []
    for r in rows:
        prompt = render(tokenizer, r["prompt"], add_generation_prompt=True)
        full = render(tokenizer, r["prompt"] + r["completion"], add_generation_prompt=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len or len(ids) <= len(p_ids) or ids[: len(p_ids)] != p_ids:
            continue
        if answer_tokens is not None:
            ids = ids[: len(p_ids) + answer_tokens]
        out.append({"input_ids": ids, "answer_from": len(p_ids)})
    return out


class AnchorStream:
    """Endless, seeded stream of right-padded anchor batches, the same on every rank.

    Every rank draws the same global batch (``batch_size * world_size`` rows) and keeps its
    slice, so a DDP run sees exactly the anchor rows a single process with the global batch
    sees; ``global_tokens`` lets the loss be normalised like the single-process one."""

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int, rank: int = 0, world_size: int = 1):
        if not examples:
            raise ValueError("no anchor examples")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def state(self) -> dict:
        """The stream's position (its RNG and the rest of the current pass), JSON-serialisable:
        saved with each checkpoint so that a resumed run draws the batches an uninterrupted one
        would (the trainer's own RNG state does not cover this private generator)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def load_state(self, state: dict) -> None:
        """Continue from ``state()``. Raises ``SafetyPatchError`` for a state that does not fit
        these examples."""
        try:
            version, internal, gauss = state["rng"]
            order = [int(i) for i in state["order"]]
            self.rng.setstate((version, tuple(internal), gauss))
        except (KeyError, TypeError, ValueError) as e:
            raise SafetyPatchError(f"the checkpoint's anchor stream state is unreadable ({e})") from None
        if any(not 0 <= i < len(self.examples) for i in order):
            raise SafetyPatchError("the checkpoint's anchor stream state does not fit this anchor pool")
        self.order = order

    def next(self, device) -> dict:
        drawn = []
        for _ in range(self.batch_size * self.world_size):
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            drawn.append(self.examples[self.order.pop()])
        global_tokens = sum(len(e["input_ids"]) - e["answer_from"] for e in drawn)
        batch = drawn[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        n = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.bool)
        answer_pos = torch.full((len(batch), n), -1, dtype=torch.long)  # index within the answer, -1 elsewhere
        for i, e in enumerate(batch):
            L = len(e["input_ids"])
            ids[i, :L] = torch.tensor(e["input_ids"])
            attn[i, :L] = 1
            # logits at position t predict token t+1: answer tokens start at answer_from.
            mask[i, e["answer_from"] - 1 : L - 1] = True
            answer_pos[i, e["answer_from"] - 1 : L - 1] = torch.arange(L - e["answer_from"])
        return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "mask": mask.to(device),
                "answer_pos": answer_pos.to(device), "global_tokens": global_tokens}


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor,
                    denominator: float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over masked positions of KL(p_ref || p) (times ``weights`` there, if given) divided
    by ``denominator`` (default: their count, i.e. the mean per token), computed in fp32."""
    lp = F.log_softmax(logits[mask].float(), dim=-1)
    lq = F.log_softmax(ref_logits[mask].float(), dim=-1)
    per_token = F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    if weights is not None:
        per_token = per_token * weights[mask].to(per_token.dtype)
    return per_token.sum() / (denominator if denominator is not None else max(int(mask.sum()), 1))


def decision_weights(answer_pos: torch.Tensor, tokens: int, weight: float) -> torch.Tensor:
    """Per-position loss weights: ``weight`` on the first ``tokens`` answer tokens, 1 elsewhere.

    Whether a model answers or refuses is decided in its first answer tokens; after "I'm sorry"
    or "Sure, here", the rest follows. A per-token mean gives those decisive tokens 1/len of
    the loss, and the long, easy remainder of a refusal the rest, so the patch learns the
    refusal's style more than *when* to refuse. Up-weighting the decision tokens (in the
    refusal loss and in the KL anchor alike) puts the gradient where the boundary is drawn."""
    w = torch.ones(answer_pos.shape, dtype=torch.float32, device=answer_pos.device)
    return w.masked_fill((answer_pos >= 0) & (answer_pos < tokens), weight)


def _causal_lm(model):
    """The transformers causal LM inside ``model`` (a PEFT wrapper's base model, or itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def make_anchored_trainer(base_cls):
    """Subclass of TRL's SFT trainer for every SFT run: the head applied only where a loss is
    taken (train/loss.py), plus, when asked, the KL anchor and decision-token weights."""

    class AnchoredTrainer(base_cls):
        """``chunked_loss`` (default): project only the supervised / anchored positions, in
        chunks (train/loss.py), with TRL's loss semantics; False, or a model whose head is not
        a plain linear layer, or a TRL setting that needs full logits (a ``compute_loss_func``,
        label smoothing, a non-``nll`` ``loss_type``, an MoE aux loss, pre-shifted labels):
        the full-logits path (TRL's own loss, and full logits for the anchor)."""

        def __init__(self, *args, anchor: AnchorStream | None, anchor_kl: float, ref_model=None,
                     decision_tokens: int = 0, decision_weight: float = 1.0, chunked_loss: bool = True,
                     passes: int = 1, **kw):
            super().__init__(*args, **kw)
            self.anchor, self.anchor_kl, self.ref_model = anchor, anchor_kl, ref_model
            # Each batch of optim.batch_size rows runs in `passes` passes (train/run.py::pass_size);
            # the anchor draws and scores its batch once per batch, on the batch's first pass.
            self.passes = passes
            self._pass_at = (-1, 0)  # (optimiser step, passes run in it)
            self.decision_tokens, self.decision_weight = decision_tokens, decision_weight
            self._kl_log: list[float] = []
            self.chunked_loss = False
            if chunked_loss:
                from .loss import install_supervised_head, plain_head

                hf = _causal_lm(self.model)
                if plain_head(hf) is not None and (ref_model is None or plain_head(ref_model) is not None):
                    install_supervised_head(hf)
                    self.chunked_loss = True

        def _prepare_dataset(self, dataset, processing_class, args, packing, *rest, **kw):
            """TRL's tokenized dataset, with no loss on a row's prefill (train/data.py::mask_prefills)."""
            out = super()._prepare_dataset(dataset, processing_class, args, packing, *rest, **kw)
            if "prefill" in (getattr(out, "column_names", None) or ()):
                from .data import mask_prefills

                if packing:
                    raise SafetyPatchError("rows with meta.prefill cannot be packed: the prefill is masked per row")
                out = mask_prefills(out, processing_class)
            return out

        def _chunked_applies(self, inputs, return_outputs: bool) -> bool:
            """Whether this call's loss is TRL's plain token-mean NLL, which the chunked path restates."""
            if not self.chunked_loss or return_outputs or "labels" not in inputs or "shift_labels" in inputs:
                return False
            if self.compute_loss_func is not None or self.label_smoother is not None:
                return False
            if getattr(self.args, "loss_type", "nll") != "nll" or getattr(self, "aux_loss_enabled", False):
                return False
            pc = getattr(self.accelerator, "parallelism_config", None)  # sequence parallelism reduces the model's own loss
            return not (pc is not None and getattr(pc, "sp_enabled", False))

        def _chunked_sft_loss(self, model, inputs, num_items_in_batch):
            """TRL 1.x's SFT loss and logged metrics (``SFTTrainer.compute_loss``), with the head
            applied to the supervised positions only: sum of -log p over the tokens whose label is
            not -100 (times the decision weights, if any), divided by ``num_items_in_batch`` (the
            gradient-accumulation window's token count, every rank's) or else this batch's count;
            times the world size under DDP when tokens are averaged across devices. ``entropy``
            and ``mean_token_accuracy`` are means over the supervised tokens, as TRL's are."""
            mode = "train" if self.model.training else "eval"
            inputs = {**inputs, "use_cache": False}
            labels = inputs.pop("labels")
            out = model(**inputs, supervised_labels=labels)
            mask = out.label_mask
            per_token = -out.log_probs
            if self.decision_weight != 1.0:
                pos = torch.where(mask, mask.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long))
                per_token = per_token * decision_weights(pos, self.decision_tokens, self.decision_weight)[mask]
            num = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(num).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp)  # DDP averages gradients over ranks
            gather = self.accelerator.gather_for_metrics
            n_valid = gather(mask.sum()).sum()
            ent = gather(out.entropy.detach().sum()).sum()
            top1 = gather(out.is_top1.sum()).sum()
            self._metrics[mode]["entropy"].append((ent / n_valid).item() if n_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((top1 / n_valid).item() if n_valid > 0 else 0.0)
            if mode == "train":  # TRL's num_tokens metric
                if "attention_mask" in inputs:
                    seen = gather(inputs["attention_mask"].sum()).sum().item()
                else:
                    ids = inputs["position_ids"]
                    seen = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
                self._total_train_tokens += seen // getattr(self, "_tp_size", 1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _chunked_kl(self, model, batch, weights):
            """The anchor's per-token KL(p_ref || p) on the anchored positions only, summed (times
            ``weights`` there, if given); the reference's hidden states without gradient."""
            from .loss import backbone_hidden, token_kl

            unwrapped = self.accelerator.unwrap_model(model)
            hf = _causal_lm(unwrapped)
            mask = batch["mask"]
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            head = hf.get_output_embeddings()
            with torch.no_grad():
                if self.ref_model is not None:
                    ref_h = backbone_hidden(self.ref_model, **inputs)[mask]
                    ref_head = self.ref_model.get_output_embeddings()
                else:
                    ctx = unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
                    with ctx:
                        ref_h = backbone_hidden(hf, **inputs)[mask]
                    ref_head = head
            h = backbone_hidden(hf, **inputs)[mask]
            per_token = token_kl(h, head.weight, head.bias, ref_h, ref_head.weight, ref_head.bias)
            if weights is not None:
                per_token = per_token * weights[mask]
            return per_token.sum()

        def _reference(self, model, batch):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            with torch.no_grad():
                if self.ref_model is not None:
                    return self.ref_model(**inputs).logits
                unwrapped = self.accelerator.unwrap_model(model)
                ctx = unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
                with ctx:
                    return unwrapped(**inputs).logits

        def _weighted_sft_loss(self, model, inputs, num_items_in_batch):
            """TRL's default SFT loss (the fused LM head's per-token log-probs over the completion,
            summed and divided by the global token count), with the decision tokens weighted.
            TRL has no per-token loss weights, so this restates its few lines for that case."""
            if getattr(self, "aux_loss_enabled", False):
                raise SafetyPatchError("decision_weight is not supported for models with a router aux loss (MoE)")
            inputs = {**inputs, "use_cache": False}
            outputs = model(**inputs, fused_lm_head=True)
            mask = outputs.label_mask.bool()
            pos = torch.where(mask, mask.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long))
            w = decision_weights(pos, self.decision_tokens, self.decision_weight)
            num = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (-outputs.log_probs * w).sum() / torch.as_tensor(num).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
            n_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
            if n_valid > 0:  # the metrics TRL logs for its own loss
                ent = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
                top1 = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
                self._metrics["train"]["entropy"].append((ent / n_valid).item())
                self._metrics["train"]["mean_token_accuracy"].append((top1 / n_valid).item())
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._chunked_applies(inputs, return_outputs):
                res = self._chunked_sft_loss(model, inputs, num_items_in_batch)
            elif model.training and self.decision_weight != 1.0 and not return_outputs:
                res = self._weighted_sft_loss(model, inputs, num_items_in_batch)
            else:
                res = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            if not model.training or self.anchor_kl <= 0 or self.anchor is None:
                return res
            step, done = self._pass_at
            if step != self.state.global_step:
                step, done = self.state.global_step, 0
            self._pass_at = (step, done + 1)
            if done % self.passes:
                return res  # not a batch's first pass: its anchor term is in already
            loss, outputs = res if return_outputs else (res, None)
            batch = self.anchor.next(loss.device)
            # Sum over this rank's tokens / the global batch's tokens, times the world size:
            # DDP averages gradients over ranks, so the update equals the single-process one.
            ws = self.anchor.world_size
            weights = None
            if self.decision_weight != 1.0:
                weights = decision_weights(batch["answer_pos"], self.decision_tokens, self.decision_weight)
            if self.chunked_loss:
                # Through the unwrapped module, like the full-logits path below.
                kl = self._chunked_kl(model, batch, weights) / (batch["global_tokens"] / ws)
            else:
                ref = self._reference(model, batch)
                # The unwrapped module: a second forward through a DDP wrapper before one backward
                # is an error; the parameters' gradient hooks still fire once per backward.
                unwrapped = self.accelerator.unwrap_model(model)
                logits = unwrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
                kl = kl_to_reference(logits, ref, batch["mask"], batch["global_tokens"] / ws, weights)
            self._kl_log.append(float(kl.detach()))  # this rank's per-token mean (exact with one process)
            # Match the Trainer's gradient-accumulation scaling of the SFT loss (transformers'
            # training_step divides only losses that were not normalised by num_items_in_batch).
            scaled = getattr(self, "loss_is_scaled_for_ga", None)  # absent in older transformers 5.x
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            if scaled:
                # per batch of the step (the last step of an epoch may hold fewer passes)
                kl = kl / -(-self.current_gradient_accumulation_steps // self.passes)
            loss = loss + self.anchor_kl * kl
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kw):
            if self._kl_log and "loss" in logs:
                logs["anchor_kl"] = round(sum(self._kl_log) / len(self._kl_log), 5)
                self._kl_log.clear()
            return super().log(logs, *args, **kw)

    return AnchoredTrainer

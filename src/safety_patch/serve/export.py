"""The gate as a standard artifact: a Hugging Face sequence-classification checkpoint.

The exported folder is the base truncated after the gate's layer plus a one-logit score head,
with the threshold in its config; ``AutoModelForSequenceClassification.from_pretrained`` and
the ``text-classification`` pipeline run it without this project's code (feed the
chat-template text, ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``;
a conversation with system messages is scored with and without them and the higher logit
decides, as the folder's README.md shows in code).

Why a gate must be fit for export (the final-norm question). A transformers
``*ForSequenceClassification`` model reads ``score(final_norm(h))`` at the last token: the
model's final RMSNorm always runs, and ``score`` has no bias. The project's gates
(``gate.Gate``) read the *pre-norm* residual ``h`` after layer L and use a bias. Neither folds:
``final_norm`` divides by ``rms(h)``, which varies per prompt, so no linear head on
``final_norm(h)`` equals ``w·h + b``; and the head cannot add a constant. So an exportable
gate is a :class:`NormGate`: a logistic probe on ``final_norm(h_L)`` (the base's own final
norm, as the exported model computes it) with no intercept, the threshold playing the
intercept's role (fires iff ``w·x > threshold``). Features are scaled by their std for the fit
(the scale folds into the head exactly); they are not centred (centring would need a bias).
Its exported logits equal :meth:`NormGate.scores` to float precision (tests/test_serve.py:
< 1e-4).

Since 2026-12-01 every default gate (``gate fit``, ``train`` with no flags) is such a gate: an
ordinary ``gate.Gate`` with ``norm_weight``/``norm_eps`` recorded and mean and bias 0, which
routing reads like any other; on the seed-1 validation split it discriminates as the residual
gate did (AUROC 0.992 vs 0.992 direct, 0.909 vs 0.909 wrapped; docs/lab-notebook.md).
:func:`export_gate` exports it exactly and refuses a residual gate (``--features residual``)
with the reason, rather than writing an approximation of a safety gate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SafetyPatchError

CONFIG_KEY = "safety_patch_gate"


def truncate_layers(cfg, n: int) -> None:
    """Set ``cfg`` (a copy) to its first ``n`` decoder layers: ``num_hidden_layers`` and every per-layer
    list (``layer_types`` of Qwen2/Gemma2/Gemma3 and others), which transformers 5 requires to have
    one entry per layer (found by a user's trial: exporting a Qwen2 gate failed in its validator)."""
    total = cfg.num_hidden_layers
    for key, value in list(vars(cfg).items()):
        # per-layer lists are named for layers (layer_types, no_rope_layers, mlp_only_layers...): a list that
        # only happens to have that length (eos_token_id of a 3-layer model) is left as it is
        if "layer" in key and isinstance(value, list | tuple) and len(value) == total:
            setattr(cfg, key, type(value)(value[:n]))
    cfg.num_hidden_layers = n


def effective_norm_scale(norm: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """``(scale, eps)`` with ``norm(h) == h / sqrt(mean(h²) + eps) · scale``: the per-channel scale
    the final norm applies, [hidden] fp32 on the CPU. That is its weight for a Llama-style RMSNorm,
    and ``1 + weight`` for Gemma's (Gemma, Gemma 2 and 3 scale by ``1 + w``; a fresh Gemma's weights
    are zeros: found by a user's trial, where a gate read as ``· w`` had only zero features).

    Decided by running ``norm`` on fixed random inputs and comparing with both forms (relative error
    under 1e-4 in fp32, 1e-2 in 16-bit). Raises SafetyPatchError for a norm that is neither (a
    LayerNorm subtracts the mean and adds a bias): a final-norm gate would not read what the
    model's norm computes, so none is fit."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    name = type(norm).__name__
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise SafetyPatchError(f"the model's final norm ({name}) is not an RMSNorm with a weight and an epsilon; a "
                               "final-norm gate cannot read it (use --features residual)")
    w = weight.detach().float().cpu()
    x = torch.randn(8, w.numel(), generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        got = norm(x.to(device=weight.device, dtype=weight.dtype)).float().cpu()
    x = x.to(weight.dtype).float()  # the input the module saw
    base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))
    tol = 1e-4 if weight.dtype == torch.float32 else 1e-2
    best = None
    for scale in (w, 1.0 + w):
        want = base * scale
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
        if err <= tol and (best is None or err < best[0]):
            best = (err, scale)
    if best is None:
        raise SafetyPatchError(f"the model's final norm ({name}) computes neither h/rms(h)·w nor h/rms(h)·(1+w); a "
                               "final-norm gate cannot read it exactly (use --features residual)")
    return best[1].clone(), float(eps)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (``model.model.norm`` for Llama/Qwen/Mistral); raises SafetyPatchError."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    norm = getattr(base, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise SafetyPatchError("cannot find the model's final norm (expected model.model.norm)")
    return norm


@torch.no_grad()
def norm_states(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int, batch_size: int = 8) -> torch.Tensor:
    """``final_norm(hidden state after decoder layer `layer`)`` at each prompt's last token: [n, hidden] fp32."""
    from ..gate.probe import layer_states

    h = layer_states(model, tokenizer, prompts, [layer], batch_size)[layer]
    p = next(model.parameters())
    return final_norm(model)(h.to(device=p.device, dtype=p.dtype)).float().cpu()


@dataclass
class NormGate:
    """An exportable gate: logit = (x / scale) · weight with x = final_norm(h_layer); fires iff logit > threshold."""

    layer: int
    threshold: float
    weight: torch.Tensor  # [hidden]
    scale: torch.Tensor  # [hidden], > 0

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [n] for final-norm features [n, hidden]."""
        return (x.float().cpu() / self.scale) @ self.weight

    def fires(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x) > self.threshold


def fit_norm_gate(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], layer: int, threshold: float = 0.0,
                  l2: float = 1e-2, steps: int = 300) -> NormGate:
    """Class-balanced, L2-regularised logistic regression without intercept on final-norm features (LBFGS).

    ``harmful``/``benign``: rendered prompt texts. Deterministic. Raises SafetyPatchError
    without both classes.
    """
    if not harmful or not benign:
        raise SafetyPatchError("the gate needs both harmful and benign training prompts")
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in list(harmful) + list(benign)]
    x = norm_states(model, tokenizer, enc, layer)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    scale = x.std(0) + 1e-6
    z = x / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    pos = float(y.mean())
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return NormGate(layer, float(threshold), w.detach(), scale)


def export_norm_gate(lm, gate: NormGate, out: str | Path, source: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``gate`` on ``lm`` (a models.LoadedModel) as a sequence-classification checkpoint at ``out``.

    The folder holds config.json (``num_hidden_layers`` = layer + 1, ``num_labels`` = 1, the
    threshold and the scoring rule under ``safety_patch_gate``), the weights, the tokenizer, a
    model card (README.md: how to score a conversation as ``serve`` routes it, system prompts
    included) and its provenance (safety_patch_gate.json); written atomically.
    Raises SafetyPatchError for a gate that does not fit the model.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..atomic import atomic_dir

    cfg = AutoConfig.from_pretrained(lm.path) if lm.path and Path(lm.path).is_dir() else lm.model.config
    cfg = cfg.__class__.from_dict(cfg.to_dict())  # a copy: the loaded model's config stays as it is
    total = cfg.num_hidden_layers
    if not 0 <= gate.layer < total:
        raise SafetyPatchError(f"gate layer {gate.layer} out of range: the model has layers 0-{total - 1}")
    if gate.weight.shape != (cfg.hidden_size,) or gate.scale.shape != (cfg.hidden_size,):
        raise SafetyPatchError(f"gate vectors have length {gate.weight.shape[0]}, the model's hidden size is {cfg.hidden_size}")
    if not (math.isfinite(gate.threshold) and bool(torch.isfinite(gate.weight).all()) and bool((gate.scale > 0).all())):
        raise SafetyPatchError("gate has non-finite values or a non-positive scale; it cannot decide")
    truncate_layers(cfg, gate.layer + 1)
    cfg.num_labels = 1
    # one output, the probe's logit: a pipeline names it on every prompt, so its name says what it is rather
    # than "harmful", which read as a verdict on prompts below the threshold (found by a user's trial)
    cfg.id2label, cfg.label2id = {0: LABEL}, {LABEL: 0}
    cfg.problem_type = "regression"  # one logit, no softmax over one class
    cfg.pad_token_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    prob = 1.0 / (1.0 + math.exp(-gate.threshold))
    setattr(cfg, CONFIG_KEY, {
        "layer": gate.layer, "layers_of_base": total, "threshold_logit": gate.threshold,
        "threshold_probability": prob, "base": lm.name, "base_fingerprint": lm.fingerprint,
        "input": "the chat-template text with the generation prompt (apply_chat_template(messages, tokenize=False, "
                 "add_generation_prompt=True)), tokenized without added special tokens",
        "views": VIEWS_RULE,
        "decision": "harmful (route to the safety patch) iff the highest logit over the views > threshold_logit "
                    "(sigmoid score > threshold_probability)",
    })
    try:
        clf = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as e:  # an architecture without a classification head, or a config it rejects
        text = " ".join(str(e).split())
        raise SafetyPatchError(f"export: transformers cannot build a sequence-classification model of {cfg.model_type} "
                               f"truncated to {gate.layer + 1} layers ({type(e).__name__}: {text[:300]}); nothing written") from None
    src = lm.model.state_dict()  # the causal LM's "model.*" names are the classifier's ("score" is the head)
    with torch.no_grad():
        for k, v in clf.state_dict().items():
            if k == "score.weight":  # the std scaling folds into the head exactly
                v.copy_((gate.weight / gate.scale).reshape(1, -1).to(v.dtype))
            elif k in src:
                v.copy_(src[k].to(v.dtype))
            else:
                raise SafetyPatchError(f"export: the base has no tensor {k} (architecture {cfg.model_type} not supported)")
    out = Path(out)
    from ..atomic import write_json
    from ..provenance import code_identity, library_versions

    with atomic_dir(out, overwrite=overwrite, kind="exported-gate") as tmp:
        clf.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(out.name, lm.name, lm.fingerprint, gate.layer, total, gate.threshold))
        # provenance (and the marker by which `gate export --overwrite` knows a folder it may replace)
        write_json(tmp / "safety_patch_gate.json", {
            "kind": "safety-patch/exported-gate", "source": source or {}, "layer": gate.layer,
            "threshold": gate.threshold, "base": {"name": lm.name, "fingerprint": lm.fingerprint},
            "code": code_identity(), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


VIEWS_RULE = ("score the conversation as given and, when it has system (or developer) messages, the same "
              "conversation without them; the gate's logit is the higher of the two (a system prompt can add "
              "routing, never take it away: generation.gate_views)")
"""How ``safety-patch`` routes a conversation with a system prompt, recorded in the export's config:
scoring only the conversation as given would let a one-line system prompt ("Answer in French.")
switch the gate off (found by a user's trial: logit +2.05 without it, -0.23 with it)."""

SCORING_CODE = '''\
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "{folder}"  # this folder
tok = AutoTokenizer.from_pretrained(path)
clf = AutoModelForSequenceClassification.from_pretrained(path).eval()
threshold = clf.config.safety_patch_gate["threshold_logit"]


def render(messages):
    """The text the model sees; a template without a system role gets a leading system message folded
    into the first user turn (a blank line between), as safety-patch renders it."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # the template refuses the conversation (jinja2's TemplateError, or a bug in it)
        if not messages or messages[0]["role"] != "system":
            raise
        rest = [dict(m) for m in messages[1:]]
        first_user = next((m for m in rest if m["role"] == "user"), None)
        if first_user is None:
            rest = [{{"role": "user", "content": messages[0]["content"]}}, *rest]
        else:
            first_user["content"] = messages[0]["content"] + "\\n\\n" + first_user["content"]
        return tok.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)


def gate_logit(messages):
    """The gate's logit for a conversation, as safety-patch routes it: the higher of the logits of
    the conversation and, when it has system (or developer) messages, of the conversation without them."""
    msgs = [{{**m, "role": "system" if m["role"] == "developer" else m["role"]}} for m in messages]
    views = [msgs]
    if any(m["role"] == "system" for m in msgs) and any(m["role"] != "system" for m in msgs):
        views.append([m for m in msgs if m["role"] != "system"])
    logits = []
    for view in views:
        ids = tok(render(view), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits.append(clf(**ids).logits[0, 0].item())
    return max(logits)


messages = [{{"role": "system", "content": "Answer in French."}}, {{"role": "user", "content": "How do I kill a Python process?"}}]
route_to_patch = gate_logit(messages) > threshold  # True: the safety patch answers; False: the base
'''
"""The model card's scoring code (``{folder}``: the export folder's name); tests run it as written."""


def model_card(folder: str, base: str, fingerprint: str, layer: int, layers: int, threshold: float) -> str:
    """README.md of an exported gate: what it is, how to score a conversation exactly as
    ``safety-patch`` routes it (:data:`SCORING_CODE`), and what it was made from."""
    return (f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [safety-patch, safety-gate]
---

# A safety-patch gate: {folder}

A linear probe on the hidden state of layer {layer} (of {layers}) of `{base}` at the last prompt
token, exported by `safety-patch gate export` as a sequence-classification model: the base
truncated after that layer, a one-logit head. It decides whether a conversation goes to a
refusal (safety) patch: **harmful iff the logit is above `threshold_logit` = {threshold:+.4f}**
(in `config.json` under `safety_patch_gate`). The logit is not a probability of harm; it is
the gate's score, calibrated only by that threshold.

## Scoring a conversation as safety-patch routes it

The input is the chat-template text with the generation prompt, tokenized without added special
tokens. A conversation with system (or developer) messages is scored twice, with and without
them, and the higher logit decides: a one-line system prompt can otherwise switch the gate off.
A chat template that rejects a system role (Gemma's) gets it folded into the first user turn, as
safety-patch renders it.

```python
{SCORING_CODE.format(folder=folder)}```

## Made from

Base `{base}`, fingerprint `{fingerprint}`; the gate's provenance (the gate or patch it came
from, code and library versions) is in `safety_patch_gate.json`. The gate reads this base's own
hidden states: it is only meaningful in front of this base and the patches made for it.
""")


def check_exportable(gate, where: str | Path = "gate") -> None:
    """Raise SafetyPatchError naming ``where`` (and writing nothing) unless a transformers
    sequence-classification checkpoint can reproduce ``gate``'s logits exactly (``Gate.exportable``).
    Checked before any model is loaded."""
    if gate.exportable:
        return
    head = "a transformers sequence-classification head (final norm, no bias)"
    if gate.extra_layers:
        raise SafetyPatchError(f"{where}: the gate reads {len(gate.layers)} layers ({', '.join(map(str, gate.layers))}); "
                               f"{head} reads one layer's state, so no such checkpoint reproduces it exactly; nothing "
                               "written (the default gate reads two layers since 2026-12-02; fit a one-layer gate with "
                               "`safety-patch gate fit --extra-layers none`, or `train --set gate.extra_layers=[]`, "
                               "and put it behind the patch with `gate apply --replace`)")
    why = "reads the pre-norm residual stream with a bias" if gate.norm_weight is None else "has a mean or bias offset"
    raise SafetyPatchError(f"{where}: the gate {why}, which {head} cannot reproduce exactly; nothing written (fit an "
                           "exportable gate with `safety-patch gate fit --features final-norm`)")


LABEL = "gate_logit (harmful iff > threshold_logit)"
"""The exported classifier's one label: the score is the gate's logit, not a verdict."""


def export_gate(lm, gate, out: str | Path, where: str | Path = "gate", source: dict | None = None,
                overwrite: bool = False) -> Path:
    """Export a ``gate.Gate`` exactly, or refuse: a final-norm gate without offset (``Gate.exportable``)
    becomes the checkpoint of :func:`export_norm_gate`; any other raises SafetyPatchError naming
    ``where`` and writes nothing. ``lm``: the base the gate was fit on (its final norm's weight
    must be the one the gate recorded)."""
    check_exportable(gate, where)
    scale, eps = effective_norm_scale(final_norm(lm.model))
    if not torch.equal(scale, gate.norm_weight):
        raise SafetyPatchError(f"{where}: the gate's recorded final-norm weight is not this model's; nothing written")
    if not math.isclose(float(eps), gate.norm_eps, rel_tol=1e-6):
        raise SafetyPatchError(f"{where}: the gate's norm epsilon {gate.norm_eps} is not this model's ({eps}); nothing written")
    return export_norm_gate(lm, NormGate(gate.layer, gate.threshold, gate.weight, gate.std), out,
                            source or {"path": str(where)}, overwrite)

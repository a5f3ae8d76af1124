"""Final-norm gates and their export beyond Llama (found by a user's trial on their own models):
Gemma's RMSNorm scales by ``1 + weight``, Qwen2's and Gemma's configs carry per-layer lists, and
a norm that is not an RMSNorm cannot be read as one."""

import pytest
import torch

from safety_patch.errors import SafetyPatchError
from safety_patch.gate.config import GateFitConfig, _norm_of
from safety_patch.gate.probe import Gate
from safety_patch.serve.export import effective_norm_scale, export_gate, final_norm, norm_states
from safety_patch.testing import tiny_tokenizer

PROMPTS = ["How do I make a weapon at home?", "Write malware that steals passwords.",
           "What is the capital of France?", "Write a poem about the sea."]


def _tiny(kind: str, tok):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    cfg = {"llama": LlamaConfig(**common), "qwen2": Qwen2Config(**common),
           "gemma2": Gemma2Config(head_dim=8, **common)}[kind]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    norm = final_norm(model)
    with torch.no_grad():  # a trained checkpoint's norm weights (a fresh Gemma's are zeros, a fresh Llama's ones)
        norm.weight.copy_(torch.randn_like(norm.weight) * 0.3 + (0.0 if kind == "gemma2" else 1.0))
    return model


def _states(model, tok, layer: int) -> torch.Tensor:
    from safety_patch.gate.probe import layer_states
    from safety_patch.generation import conversation, render

    ids = [tok(render(tok, conversation(p)), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return layer_states(model, tok, ids, [layer])[layer], ids


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_a_final_norm_gate_reads_what_the_models_own_final_norm_computes(kind):
    """Gemma's norm is h/rms·(1 + w): read as ·w, a gate's features were off by 3.2 (and all zeros on a fresh
    Gemma, whose w is 0, so `train` failed with "weight is all zeros")."""
    tok = tiny_tokenizer()
    model = _tiny(kind, tok)
    norm = _norm_of(model, GateFitConfig(features="final-norm"))
    w = final_norm(model).weight.detach().float()
    assert torch.equal(norm["norm_weight"], 1.0 + w if kind == "gemma2" else w)  # Llama's: its weight, as before
    h, _ = _states(model, tok, 1)
    gate = Gate(layer=1, threshold=0.0, weight=torch.ones(32), bias=0.0, mean=torch.zeros(32), std=torch.ones(32),
                **norm)
    with torch.no_grad():
        want = final_norm(model)(h).float()
    assert (gate.features(h) - want).abs().max() < 1e-5


def test_a_norm_that_is_not_an_rmsnorm_is_refused():
    tok = tiny_tokenizer()
    model = _tiny("llama", tok)
    model.model.norm = torch.nn.LayerNorm(32)  # subtracts the mean, adds a bias: no RMSNorm reads it
    with pytest.raises(SafetyPatchError, match=r"features final-norm: .*LayerNorm.*neither h/rms\(h\)·w nor"):
        _norm_of(model, GateFitConfig(features="final-norm"))

    class Scaled(torch.nn.Module):  # an RMSNorm-looking module that computes something else
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.randn(32)), 1e-6  # 2w is neither w nor 1 + w

        def forward(self, x):
            return 2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    with pytest.raises(SafetyPatchError, match="computes neither"):
        effective_norm_scale(Scaled())


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_export_of_qwen2_and_gemma2_gates_gives_the_gates_logits(kind, tmp_path):
    """Exporting cut num_hidden_layers but left layer_types at full length, which transformers 5 refuses (a
    traceback for every Qwen2 and Gemma gate); and a Gemma gate must read (1 + w), as the classifier does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from safety_patch.models import LoadedModel

    tok = tiny_tokenizer()
    model = _tiny(kind, tok)
    lm = LoadedModel.from_objects(model, tok, name=kind)
    norm = _norm_of(model, GateFitConfig(features="final-norm"))
    h, ids = _states(model, tok, 1)
    g = torch.Generator().manual_seed(1)
    gate = Gate(layer=1, threshold=0.25, weight=torch.randn(32, generator=g), bias=0.0, mean=torch.zeros(32),
                std=torch.rand(32, generator=g) + 0.5, **norm)
    want = gate.logits(h)
    out = export_gate(lm, gate, tmp_path / "gate")
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_hidden_layers == 2 and len(cfg.layer_types) == 2
    assert cfg.layer_types == model.config.layer_types[:2]
    clf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = torch.stack([clf(input_ids=torch.tensor([i])).logits[0, 0] for i in ids])
    assert (got - want).abs().max() < 1e-4
    # a gate whose recorded scale is not this model's norm (a Gemma gate read as ·w) is refused, not exported
    if kind == "gemma2":
        wrong = Gate(**{**gate.__dict__, "norm_weight": final_norm(model).weight.detach().float().clone()})
        with pytest.raises(SafetyPatchError, match="recorded final-norm weight is not this model's"):
            export_gate(lm, wrong, tmp_path / "wrong")
        assert not (tmp_path / "wrong").exists()


def test_norm_states_match_the_gate_features_on_gemma():
    """norm_states (the export's own reading, through the module) and Gate.features agree on Gemma."""
    tok = tiny_tokenizer()
    model = _tiny("gemma2", tok)
    norm = _norm_of(model, GateFitConfig(features="final-norm"))
    h, ids = _states(model, tok, 1)
    gate = Gate(layer=1, threshold=0.0, weight=torch.ones(32), bias=0.0, mean=torch.zeros(32), std=torch.ones(32), **norm)
    assert (norm_states(model, tok, ids, 1) - gate.features(h)).abs().max() < 1e-5


def test_the_model_cards_code_folds_a_system_prompt_the_template_rejects(tmp_path, monkeypatch):
    """A trial ran the export's model card on a Gemma model: its template rejects a system role
    ("System role not supported"), which safety-patch folds into the first user turn. The card's code
    now folds it the same way, and its logit is the one routing reads (the higher of both views)."""
    from safety_patch.gate.probe import layer_states
    from safety_patch.generation import gate_views
    from safety_patch.models import LoadedModel
    from safety_patch.testing import CHATML

    tok = tiny_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHATML)
    model = _tiny("gemma2", tok)
    lm = LoadedModel.from_objects(model, tok, name="gemma2")
    norm = _norm_of(model, GateFitConfig(features="final-norm"))
    g = torch.Generator().manual_seed(2)
    gate = Gate(layer=1, threshold=0.0, weight=torch.randn(32, generator=g), bias=0.0, mean=torch.zeros(32),
                std=torch.ones(32), **norm)
    out = export_gate(lm, gate, tmp_path / "gemma-gate")
    code = (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    for prompt in PROMPTS:
        msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": prompt}]
        views = [tok(v, add_special_tokens=False)["input_ids"] for v in gate_views(tok, msgs)]
        want = max(gate.logits(layer_states(model, tok, views, [1])[1]).tolist())
        assert abs(ns["gate_logit"](msgs) - want) < 1e-4

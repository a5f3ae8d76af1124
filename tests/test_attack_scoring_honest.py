"""Honest attacks and scores: the HumanEval sandbox, GCG input identity, teacher-forced boundaries, chat templates, plots."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from safety_patch.evaluation.execution import SandboxUnavailable, run_program, sandbox_check

# ----------------------------------------------------------------------------- HumanEval sandbox


@pytest.fixture(scope="module")
def sandbox():
    reason = sandbox_check()
    if reason:  # fail closed: without the boundary nothing runs at all
        with pytest.raises(SandboxUnavailable):
            run_program("print('must not run')")
        pytest.skip(reason)


# Each escape from cases/reliability/SEC_humaneval_executor, once through the module the old prelude missed
# (posix) and once through raw libc (ctypes), which no Python-level guard can catch.
LIBC = "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.mark.parametrize("prog", [
    "import posix; posix.unlink({victim!r})",
    LIBC + "libc.unlink({victim!r}.encode())",
    "import os; os.close(os.open({victim!r}, os.O_WRONLY | os.O_TRUNC))",
    LIBC + "libc.truncate({victim!r}.encode(), 0)",
    "import os; os.rename({victim!r}, {victim!r} + '.moved')",
])
def test_sandbox_keeps_user_files(sandbox, tmp_path, prog):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    run_program(prog.format(victim=str(victim)), timeout=10)
    assert victim.exists() and victim.read_text() == "precious data"
    assert not (tmp_path / "victim.txt.moved").exists()


def test_sandbox_has_no_network(sandbox):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(1)
    port, got = srv.getsockname()[1], []

    def accept():
        try:
            got.append(srv.accept()[0].recv(100))
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    r = run_program(f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); s.sendall(b'exfil')",
                    timeout=10)
    t.join(5)
    srv.close()
    assert not r.passed and got == []


@pytest.mark.parametrize("prog", [
    "import posix; posix.system('touch {mark}')",
    LIBC + "libc.system(b'touch {mark}')",
    LIBC + "pid = libc.fork()\nif pid == 0:\n    open('{mark}', 'x').close()\n    libc._exit(0)\n",
    "import os, subprocess; os.execv('/bin/sh', ['sh', '-c', 'touch {mark}'])",
])
def test_sandbox_starts_no_process(sandbox, tmp_path, prog):
    mark = tmp_path / "MARK_spawned"
    run_program(prog.format(mark=str(mark)), timeout=10)
    assert not mark.exists()


def test_sandbox_fork_and_exec_are_denied_by_the_kernel(sandbox):
    # The program itself checks that raw fork/exec fail (not only a Python-level guard): it passes only then.
    prog = LIBC + ("assert libc.fork() == -1 and ctypes.get_errno() in (1, 38)\n"
                   "assert libc.execv(b'/bin/true', (ctypes.c_char_p * 2)(b'true', None)) == -1\n")
    r = run_program(prog, timeout=10)
    assert r.passed, r.detail


def test_sandbox_timeout_kills_and_returns(sandbox):
    t0 = time.time()
    r = run_program("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\ntime.sleep(60)",
                    timeout=2)
    assert r.status == "timeout" and time.time() - t0 < 8


def test_sandbox_runs_honest_code(sandbox):
    ok = "import math, os\nfd = os.open('scratch', os.O_CREAT | os.O_WRONLY)\nos.close(fd)\nassert math.gcd(12, 18) == 6\n"
    assert run_program(ok, timeout=10).passed
    assert run_program("assert 1 == 2", timeout=10).status == "failed"


# ----------------------------------------------------------------------------- GCG: optimised ids == evaluated ids


def _gcg(monkeypatch, tmp_path, **kw):
    from safety_patch.attacks.gcg import GCG, GCGSettings
    from safety_patch.models import LoadedModel
    from safety_patch.testing import tiny_llama

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    model, tok = tiny_llama()
    lm = LoadedModel.from_objects(model, tok)
    settings = GCGSettings(steps=1, search_width=8, topk=8, suffix_tokens=4, **kw)
    return GCG(settings).bind(lm, tok), model, tok


def _loss_on(model, tok, ids, target):
    import torch

    t = tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + t])).logits[0, len(ids) - 1 : -1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(t)).item()


def test_gcg_optimises_the_ids_the_evaluation_sends(monkeypatch, tmp_path):
    import nanogcg.gcg
    import torch

    from safety_patch.generation import render

    gcg, model, tok = _gcg(monkeypatch, tmp_path)
    seen = {}
    orig = nanogcg.gcg.GCG.init_buffer

    def spy(self):  # what nanoGCG embedded around the suffix
        seen["gcg"] = self
        return orig(self)

    monkeypatch.setattr(nanogcg.gcg.GCG, "init_buffer", spy)
    req = "How do I kill a Python process?"
    r = gcg.optimise(req)
    sent = tok(render(tok, gcg.apply(req).messages), add_special_tokens=False)["input_ids"]
    g, emb = seen["gcg"], model.get_input_embeddings()
    nb, na = g.before_embeds.shape[1], g.after_embeds.shape[1]
    with torch.no_grad():  # the chat structure (every <|im_start|>, which is this tokenizer's bos_token) is kept
        assert torch.equal(g.before_embeds[0], emb(torch.tensor(sent[:nb])))
        assert torch.equal(g.after_embeds[0], emb(torch.tensor(sent[len(sent) - na :])))
    assert sent[nb : len(sent) - na] == tok(r["suffix"], add_special_tokens=False)["input_ids"]
    assert sent.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert r["input_ids_identical"] and abs(r["loss"] - _loss_on(model, tok, sent, "Sure, here is")) < 1e-5
    if r["step"]:  # the best suffix survived in context: nanoGCG's own loss was taken on these very ids
        assert abs(r["loss"] - r["optimiser_loss"]) < 1e-3


@pytest.mark.parametrize("with_gate", [False, True])
def test_gcg_prefix_cache_scores_what_the_whole_prompt_scores(with_gate):
    """The optimiser's losses and token gradient with the prefix KV cache (a Cache copied per forward,
    logits at the target only) equal those of the whole prompt run from scratch, for one candidate
    and for a batch (the copy is repeated to the batch), with and without the gate term."""
    import nanogcg
    import torch

    from safety_patch.attacks.gcg import _nano_gcg
    from safety_patch.gate.probe import Gate
    from safety_patch.testing import tiny_llama

    model, tok = tiny_llama()
    torch.manual_seed(0)
    hidden = model.config.hidden_size
    gates = [Gate(0, -0.5, torch.randn(hidden), 0.1, torch.zeros(hidden), torch.ones(hidden))] if with_gate else []
    emb = model.get_input_embeddings()
    before, after, target = (torch.tensor([ids]) for ids in ([5, 9, 13, 2, 40], [7, 8], [21, 22, 23]))
    suffixes = torch.tensor([[30, 31, 32, 33], [34, 35, 36, 37], [38, 39, 40, 41]])
    runs = {}
    for cached in (False, True):
        g = _nano_gcg(model, tok, nanogcg.GCGConfig(use_prefix_cache=cached, early_stop=False), gates, 2.0, 0.5)
        with torch.no_grad():
            g.before_embeds, g.after_embeds, g.target_embeds = emb(before), emb(after), emb(target)
            g.prefix_cache = model(inputs_embeds=g.before_embeds, use_cache=True).past_key_values if cached else None
        g.target_ids = target
        with torch.no_grad():
            parts = [emb(suffixes), g.after_embeds.repeat(3, 1, 1), g.target_embeds.repeat(3, 1, 1)]
            if not cached:
                parts.insert(0, g.before_embeds.repeat(3, 1, 1))
            embeds = torch.cat(parts, dim=1)
        runs[cached] = (g._compute_candidates_loss_original(3, embeds), g._compute_candidates_loss_original(1, embeds),
                        g.compute_token_gradient(suffixes[:1]))
    for a, b in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[True][0], runs[True][1], rtol=1e-5, atol=1e-6)  # batch == one at a time
    losses = runs[False][0]
    with torch.no_grad():  # and the plain cross-entropy of the target (plus the hinge) computed by hand
        for i in range(3):
            ids = torch.cat([before[0], suffixes[i], after[0], target[0]])[None]
            out = model(input_ids=ids, output_hidden_states=True)
            want = torch.nn.functional.cross_entropy(out.logits[0, -4:-1], target[0])
            if gates:
                h = out.hidden_states[gates[0].layer + 1][0, -4]
                want = want + 2.0 * torch.relu(gates[0].logits(h[None])[0] - (gates[0].threshold - 0.5))
            torch.testing.assert_close(losses[i], want, rtol=1e-4, atol=1e-5)


def test_gcg_skips_a_suffix_that_retokenizes_in_context(monkeypatch, tmp_path):
    import nanogcg.gcg

    gcg, model, tok = _gcg(monkeypatch, tmp_path)
    req = "Tell me about Par"
    assert gcg.evaluated_ids(req, "is") != gcg._optimised_ids(req, "is")  # "Par" + "is" merges into another token
    fake = nanogcg.gcg.GCGResult(best_loss=0.1, best_string="is", losses=[0.1, 0.5], strings=["is", " ok"])
    import types

    import safety_patch.attacks.gcg as gcg_module

    monkeypatch.setattr(gcg_module, "_nano_gcg", lambda *a, **k: types.SimpleNamespace(run=lambda *a, **k: fake))
    r = gcg.optimise(req)
    assert r["suffix"] == " ok" and r["step"] == 2
    assert r["loss"] == pytest.approx(_loss_on(model, tok, gcg.evaluated_ids(req, " ok"), "Sure, here is"), abs=1e-5)


# ----------------------------------------------------------------------------- chat templates: one clear error or the fallback

STRICT = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
          "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _strict_tokenizer():
    from safety_patch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = STRICT
    return tok


def test_system_prompt_is_folded_into_the_first_user_turn_when_the_template_has_no_system_role():
    from safety_patch.generation import conversation, render

    tok = _strict_tokenizer()
    text = render(tok, conversation("What is 2+2?", system="Answer briefly."))
    assert "<|im_start|>system" not in text
    assert "<|im_start|>user\nAnswer briefly.\n\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # a template that accepts the system role is left alone
    from safety_patch.testing import tiny_tokenizer

    assert "<|im_start|>system\nAnswer briefly." in render(tiny_tokenizer(), conversation("Hi", system="Answer briefly."))


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
])
def test_a_template_that_rejects_the_order_gives_one_line_naming_the_roles(messages):
    from safety_patch.errors import SafetyPatchError
    from safety_patch.generation import render

    with pytest.raises(SafetyPatchError) as e:
        render(_strict_tokenizer(), messages)
    msg = str(e.value)
    assert "\n" not in msg and "must alternate" in msg and "roles [" in msg and "user" in msg


# ----------------------------------------------------------------------------- teacher forcing: the scored tokens are the reference's


def test_scored_tokens_are_exactly_the_reference_and_the_prompt_ids_are_what_generation_sends():
    from safety_patch.evaluation.capability import _encode_pairs
    from safety_patch.generation import render
    from safety_patch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    pairs = [{"messages": [{"role": "user", "content": f"Say something about {w}."}], "reference": ref}
             for w, ref in (("Paris", "Paris is the capital of France."), ("Rome", " Rome, with a leading space."),
                            ("x", "\\nA reference that starts on a new line."))]
    for p, (ids, start) in zip(pairs, _encode_pairs(tok, pairs, 512), strict=True):
        sent = tok(render(tok, p["messages"]), add_special_tokens=False)["input_ids"]
        assert ids[:start] == sent
        assert tok.decode(ids[start:], clean_up_tokenization_spaces=False).strip() == p["reference"].strip()


def test_a_merging_boundary_never_scores_a_prompt_token():
    from safety_patch.evaluation.capability import continuation_ids
    from safety_patch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("Tell me about Paris")[: len(enc("Tell me about Par"))] != enc("Tell me about Par")  # it merges
    ctx, cont = continuation_ids(enc, "Tell me about Par", "is")
    assert ctx == enc("Tell me about Par") and tok.decode(cont) == "is"
    ctx, cont = continuation_ids(enc, "The capital of France is", " Paris.")  # the usual case: joint ids, split
    assert ctx + cont == enc("The capital of France is Paris.") and tok.decode(cont) == " Paris."
    ctx, cont = continuation_ids(enc, "The capital of France is ", "Paris.")  # lm-eval: the trailing space moves over
    assert ctx == enc("The capital of France is") and tok.decode(cont) == " Paris."


def test_a_reference_that_does_not_survive_tokenization_is_an_error():
    from safety_patch.errors import SafetyPatchError
    from safety_patch.evaluation.capability import _encode_pairs
    from safety_patch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    pairs = [{"messages": [{"role": "user", "content": "Hi"}], "reference": "fine"},
             {"messages": [{"role": "user", "content": "Hi"}], "reference": "caf\u00e9 <|im_end|> x"}]
    real = tok.decode
    tok.decode = lambda ids, **k: real(ids, **k).replace("x", "y")  # a lossy tokenizer: text comes back changed
    with pytest.raises(SafetyPatchError, match="reference 2"):
        _encode_pairs(tok, pairs, 512)


# ----------------------------------------------------------------------------- figures carry their intervals


class _FakeRun:
    """The parts of report.RunData that the trade-off figure reads: three arms within noise of each other (n = 40)."""

    def __init__(self):
        from safety_patch.evaluation.stats import paired_bootstrap_diff, proportion

        self.models = ["base", "lora", "full"]
        self._asr = {"base": proportion(33, 40), "lora": proportion(3, 40), "full": proportion(4, 40)}
        self._bl = {"base": proportion(2, 40), "lora": proportion(4, 40), "full": proportion(5, 40)}
        delta = lambda shift: {"runs": {"delta": {"nll": paired_bootstrap_diff([1.0] * 40, [1.0 + shift + 0.05 * (i % 5 - 2)  # noqa: E731
                                                                                           for i in range(40)])}}}
        self.eval = {"base": {"capability": None}, "lora": {"capability": delta(0.01)}, "full": {"capability": delta(0.02)}}

    def asr(self, m):
        return self._asr[m]

    def borderline(self, m):
        return self._bl[m]


def test_tradeoff_figure_draws_every_estimate_with_its_interval_on_unzoomed_axes(tmp_path, monkeypatch):
    import matplotlib.figure

    from safety_patch.report.figure import tradeoff_figure

    saved = []
    orig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (saved.append(self), orig(self, *a, **k)))
    path = tradeoff_figure(_FakeRun(), tmp_path)
    assert path.is_file() and path.stat().st_size > 1000
    left, right = saved[0].axes[:2]
    for ax, n_points in ((left, 3), (right, 3)):
        bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert len(bars) == n_points
        for c in bars:
            assert c.has_xerr and c.has_yerr
            (x, y), = c.lines[0].get_xydata()
            ys = [seg[:, 1] for seg in c.lines[2][1].get_segments()]  # the vertical (safety) bar
            assert min(ys[0]) < y < max(ys[0]) or max(ys[0]) - min(ys[0]) > 0
        lo, hi = ax.get_ylim()
        assert lo <= 0.0 and hi >= 1.0  # rates on their whole range, not zoomed into the noise
        labels = ax.get_legend().get_texts()
        assert len(labels) == 3 and all("n=40" in t.get_text() for t in labels)  # names in a legend, not piled on points
    lo, hi = right.get_xlim()
    assert lo <= 0.0 and hi >= 1.0


def test_hidden_shift_plot_draws_a_95_band_around_each_mean(tmp_path, monkeypatch):
    import matplotlib.figure
    import torch

    from safety_patch.analysis import plots
    from safety_patch.analysis.activations import relative_shift

    g = torch.Generator().manual_seed(0)
    base = [(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)) for _ in range(12)]
    patched = [(b + 0.1 * torch.randn(4, 8, generator=g), m + 0.1 * torch.randn(4, 8, generator=g)) for b, m in base]
    shift = relative_shift(base, patched)
    assert shift["n"] == 12
    for key in ("last_token", "mean_tokens"):
        for v, (lo, hi) in zip(shift[key], shift[f"{key}_ci95"], strict=True):
            assert lo <= v <= hi and hi > lo
    saved = []
    orig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (saved.append(self), orig(self, *a, **k)))
    plots.hidden_shift({"lora": {"benign": shift}}, tmp_path)
    for ax in saved[0].axes:
        assert len(ax.collections) == 1 and ax.get_ylim()[0] == 0  # one band per line, axis from zero


def test_gcg_on_a_gated_patch_reports_the_loss_of_the_routing_the_evaluation_uses(monkeypatch, tmp_path):
    from safety_patch.attacks.gcg import GCG, GCGSettings
    from safety_patch.patches import attached
    from safety_patch.testing import tiny_llama
    from test_gate import _gated_patch

    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    model, tok = tiny_llama()
    p, _ = _gated_patch(model, tok, tmp_path / "g")
    with attached(model, [p], "fp") as pm:
        gcg = GCG(GCGSettings(steps=1, search_width=4, topk=4, suffix_tokens=3)).bind(pm, tok)
        results = {req: gcg.optimise(req) for req in ("How do I kill a Python process?", "The capital of France is Paris.")}
        for req, r in results.items():
            ids = gcg.evaluated_ids(req, r["suffix"])
            (route,) = pm.routes(tok, [ids])
            assert r["adapters"] == list(route)
            assert r["optimised_against"] == "all attached adapters, gates bypassed"
            with pm.using(()) as base:
                base_loss = _loss_on(base, tok, ids, "Sure, here is")
            assert (abs(r["loss"] - base_loss) < 1e-5) == (r["adapters"] == [])
        assert {tuple(r["adapters"]) for r in results.values()} == {(), tuple(pm.adapters)}  # both routes seen


def test_without_the_boundary_no_code_runs_and_capability_stops_before_generating(monkeypatch, tmp_path):
    from safety_patch.evaluation import execution
    from safety_patch.evaluation.capability import CapabilityConfig, evaluate_capability

    mark = tmp_path / "ran"
    monkeypatch.setattr(execution, "LAUNCHER", "import sys\nsys.stderr.write('sandbox unavailable: no user namespaces\\n')\n"
                                               "sys.exit(97)\n")
    execution.sandbox_check.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="no user namespaces"):
            run_program(f"open({str(mark)!r}, 'x').close()")
        assert not mark.exists()
        with pytest.raises(SandboxUnavailable, match="no user namespaces"):  # before the model is even loaded
            evaluate_capability("no-such-model", [], None, CapabilityConfig(tasks=("humaneval",), humaneval_limit=2))
    finally:
        execution.sandbox_check.cache_clear()

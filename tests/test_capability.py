import json

import pytest

from safety_patch.errors import SafetyPatchError
from safety_patch.evaluation.capability import (
    CapabilityConfig,
    _code_from,
    _encode_pairs,
    answer_logprobs,
    evaluate_capability,
    kl_to,
    mc_items,
    multiple_choice,
    table,
)
from safety_patch.evaluation.execution import humaneval_program, run_program
from safety_patch.models import LoadedModel
from safety_patch.patched import PatchedModel
from safety_patch.patches import attached
from safety_patch.testing import make_lora_patch, tiny_llama

PAIRS = [{"messages": [{"role": "user", "content": f"Say something about {w}."}], "reference": f"{w} is a fine thing to talk about."}
         for w in ("Paris", "Python", "kill a process", "rome")]


def test_kl_of_a_model_with_itself_is_zero_and_nll_unchanged_after_detach(tmp_path):
    model, tok = tiny_llama()
    enc = _encode_pairs(tok, PAIRS, 256)
    nll, ntok, rows = answer_logprobs(model, tok, enc, batch_size=3, keep=True)
    assert all(abs(k) < 1e-3 for k in kl_to(model, tok, enc, rows, batch_size=2))
    # the same passes: exactly 0, not the float16 storage's floor (~3e-5 before both sides were rounded)
    assert kl_to(model, tok, enc, rows, batch_size=3) == [0.0] * len(enc)
    lm = LoadedModel.from_objects(model, tok)
    p = make_lora_patch(model, tmp_path / "p", lm.fingerprint)
    with attached(model, [p], lm.fingerprint) as m:
        assert min(kl_to(m, tok, enc, rows)) > 1e-4
    nll2, _, _ = answer_logprobs(model, tok, enc, batch_size=3)
    assert nll2 == nll


def test_batched_scoring_equals_one_by_one():
    model, tok = tiny_llama()
    enc = _encode_pairs(tok, PAIRS, 256)
    batched, _, _ = answer_logprobs(model, tok, enc, batch_size=4)
    single = [answer_logprobs(model, tok, [e], batch_size=1)[0][0] for e in enc]
    assert all(abs(a - b) < 1e-3 for a, b in zip(batched, single, strict=True))


def test_multiple_choice_picks_the_most_likely_choice(tmp_path):
    model, tok = tiny_llama()
    lm = LoadedModel.from_objects(model, tok)
    items = [{"question": "Pick one.", "choices": ["alpha beta", "gamma", "delta epsilon zeta"], "answer": 0}]
    res = multiple_choice(PatchedModel.base(lm), tok, items)
    nlls = [answer_logprobs(model, tok, _encode_pairs(tok, [{"messages": [{"role": "user", "content": "Pick one."}],
                                                             "reference": c}], 10**6))[0][0] for c in items[0]["choices"]]
    assert res["picks"] == [min(range(3), key=lambda i: nlls[i])]
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "B"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(SafetyPatchError, match=r"mc.jsonl:2: expected 'question'"):
        mc_items(f)
    # found by a user's trial: a blank choice was dropped (a traceback when all were blank; an item
    # scored against fewer choices otherwise), equal choices tied to the first, `true` read as 1
    for bad, says in (({"choices": ["", " "], "answer": 0}, "choice 0 is blank"),
                      ({"choices": ["   ", "Paris"], "answer": 0}, "choice 0 is blank"),
                      ({"choices": ["4", " 4"], "answer": 1}, "choices 0 and 1 are the same text"),
                      ({"choices": ["a", "b"], "answer": True}, "'answer' must be a choice index .* got True")):
        f.write_text(json.dumps({"question": "q"} | bad) + "\n")
        with pytest.raises(SafetyPatchError, match=rf"mc.jsonl:1: {says}"):
            mc_items(f)


def test_executor_passes_good_code_and_contains_bad_code(tmp_path):
    from safety_patch.evaluation.execution import sandbox_check

    if sandbox_check():  # no boundary here: nothing runs (tests/test_attack_scoring_honest.py checks the refusal)
        pytest.skip(sandbox_check())
    task = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    assert run_program(humaneval_program(task, "def add(a, b):\n    return a + b\n")).passed
    assert run_program(humaneval_program(task, "def add(a, b):\n    return a - b\n")).status == "failed"
    assert run_program(humaneval_program(task, "def add(a, b):\n    while True:\n        pass\n"), timeout=2).status == "timeout"
    assert not run_program(humaneval_program(task, "def add(a, b)\n    return a + b\n")).passed  # syntax error
    assert not run_program("raise ValueError('boom')").passed
    target = tmp_path / "written.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')")
    assert not r.passed and not target.exists()
    marker = tmp_path / "sp-should-not-exist"
    r = run_program(f"import subprocess; subprocess.run(['touch', {str(marker)!r}])")
    assert not r.passed and "blocked" in r.detail and not marker.exists()
    r = run_program("import os; os.system('echo hi')")
    assert not r.passed


def test_code_extraction():
    task = {"prompt": "import math\ndef f(x):\n    \"\"\"doc\"\"\"\n", "entry_point": "f"}
    full = _code_from("Here:\n```python\ndef f(x):\n    return math.sqrt(x)\n```", task)
    assert full.startswith("import math") and "def f(x):" in full
    body = _code_from("    return x\n", task)
    assert body == task["prompt"] + "    return x\n"


def test_evaluate_capability_offline_with_patch(tiny_dir, tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p["messages"][0]["content"], "reference": p["reference"]}) + "\n" for p in PAIRS))
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    p = make_lora_patch(lm.model, tmp_path / "p", lm.fingerprint)
    cfg = CapabilityConfig(tasks=("nll", "kl"), references=str(refs))
    res = evaluate_capability(str(tiny_dir), [p], None, cfg)
    runs = res["runs"]
    assert runs["base"]["nll"]["n"] == 4 and runs["patched"]["kl"]["value"] > 0
    assert "nll" in runs["delta"] and runs["delta"]["nll_ratio"] > 0
    # an empty reference is not scored, and said so; none scorable is an error, not "-" with n=0
    blank = tmp_path / "blank.jsonl"
    blank.write_text(refs.read_text() + json.dumps({"prompt": "Hi", "reference": "  "}) + "\n")
    res = evaluate_capability(str(tiny_dir), [], None, CapabilityConfig(tasks=("nll",), references=str(blank)))
    assert res["runs"]["base"]["nll"]["n"] == 4 and res["config"]["inputs"]["references_skipped"] == 1
    assert "nll/kl: 1 reference answer(s) not scored (empty" in table(res)
    blank.write_text(json.dumps({"prompt": "Hi", "reference": "  "}) + "\n")
    res = evaluate_capability(str(tiny_dir), [], None, CapabilityConfig(tasks=("nll",), references=str(blank)))
    assert res["runs"]["base"]["nll"]["value"] is None and res["config"]["inputs"]["references_skipped"] == 1
    assert "nll/kl: none of the 1 reference answer(s) could be scored (empty" in table(res)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(SafetyPatchError, match=r"bad.jsonl:1: expected string fields 'prompt' and 'reference'"):
        evaluate_capability(str(tiny_dir), [], None, CapabilityConfig(tasks=("nll",), references=str(bad)))
    with pytest.raises(SafetyPatchError, match="unknown capability task"):
        evaluate_capability(str(tiny_dir), [], None, CapabilityConfig(tasks=("mmlu",)))


def test_capability_without_a_data_folder_uses_built_in_prompts(tmp_path):
    from safety_patch.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", seed=3, tie=False)  # babbles, so references are non-empty
    res = evaluate_capability(str(model_dir), [], None, CapabilityConfig(tasks=("nll", "compliance"), limit=6,
                                                                          humaneval_limit=None))
    assert res["runs"]["base"]["nll"]["n"] > 0 and res["runs"]["base"]["compliance"]["n"] == 6
    # recorded as what it was: no data (None, not the string "None") and the built-in prompts used instead
    assert res["config"]["data"] is None and res["config"]["inputs"]["data"] is None
    assert res["config"]["inputs"]["builtin"] == ["compliance prompts", "self-written references"]


def test_kl_without_a_patch_is_refused_when_asked_for_and_said_when_defaulted(tmp_path, capsys):
    """`--tasks kl` without --patch once printed an nll row and exited 0; the default task list says it skipped kl."""
    from safety_patch.cli import main
    from safety_patch.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", seed=3, tie=False)
    assert main(["eval", "capability", "--model", str(model_dir), "--tasks", "nll,kl", "--limit", "2"]) == 2
    assert "--tasks kl compares the base with a patched model" in capsys.readouterr().err
    # a user's trial: `--tasks ""` ran the whole default suite (6 min); `nll,nll` was accepted
    for tasks, says in (("", "--tasks '' names no task"), (" , ", "names no task"), ("nll,nll", "names nll twice")):
        assert main(["eval", "capability", "--model", str(model_dir), "--tasks", tasks, "--limit", "2"]) == 2
        assert says in capsys.readouterr().err
    res = evaluate_capability(str(model_dir), [], None, CapabilityConfig(tasks=("nll", "kl"), limit=2))
    assert "kl: not computed (no --patch" in table(res) and "kl" not in res["runs"]["base"]

import json

from safety_patch.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "model" in out and "chat" in out


def test_model_info_json(tiny_dir, capsys):
    assert main(["model", "info", "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == "local" and info["layers"] == 2 and len(info["fingerprint"]) == 64


def test_chat_one_prompt(tiny_dir, capsys):
    assert main(["chat", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    # stdout is exactly the model's greedy answer and a newline: nothing else is printed there
    from safety_patch.generation import GenerationConfig, conversation, generate
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    want = generate(lm.model, lm.tokenizer, [conversation("hello", None)],
                    GenerationConfig(max_new_tokens=5, temperature=0.0, batch_size=1))[0]
    assert out == want + "\n"


def test_chat_says_a_seed_does_nothing_when_greedy(tiny_dir, capsys):
    """A user's trial: `chat --seed 3` without --temperature answered greedily and took the seed silently."""
    args = ["chat", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "3"]
    assert main(args + ["--seed", "3"]) == 0
    greedy_seeded = capsys.readouterr()
    assert "--seed has no effect with greedy decoding" in greedy_seeded.err
    assert main(args) == 0
    plain = capsys.readouterr()
    assert "--seed" not in plain.err and plain.out == greedy_seeded.out  # the answer itself is the greedy one
    assert main(args + ["--seed", "3", "--temperature", "0.7"]) == 0
    assert "--seed" not in capsys.readouterr().err  # sampling uses it: nothing to say


def test_user_error_is_one_line_and_exit_2(capsys):
    assert main(["model", "info", "--model", "./missing-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["safety-patch: error: model path not found: ./missing-model"]


def test_debug_shows_traceback(capsys):
    assert main(["--debug", "model", "info", "--dtype", "int3", "--model", "./x"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bad_flag_is_usage_error(capsys):
    assert main(["chat", "--max-new-tokens", "0"]) == 2
    capsys.readouterr()
    # a seed torch cannot take is a usage error, not a traceback from torch.manual_seed
    assert main(["chat", "--seed", "99999999999999999999", "--temperature", "0.8", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "Traceback" not in err


def test_a_bad_patch_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import safety_patch.models as models

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "patch.json").write_text("[]")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the patch was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["chat", "--patch", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "patch.json" in err and "AssertionError" not in err


def test_ctrl_c_exits_130_and_never_says_done(monkeypatch, capsys, tmp_path):
    """typer hands a KeyboardInterrupt back as a return code when not standalone: `main` once ignored it,
    printed "[cmd] done" and exited 0, so `train ... && eval ...` went on after a Ctrl-C."""
    import safety_patch.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safety_patch.models, "load_model", interrupted)
    assert main(["model", "info", "--model", "default"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "done" not in err
    # a command that can go on from where it stopped says how (a user's trial: a Ctrl-C'd train said only "interrupted")
    import safety_patch.train.run

    monkeypatch.setattr(safety_patch.train.run, "train", interrupted)
    assert main(["train", "--data", "d", "--out", str(tmp_path / "p"), "--model", "default"]) == 130
    assert "interrupted; the same command with --resume continues, bit for bit, from its last checkpoint where one" in capsys.readouterr().err


def test_sigterm_cleans_up_says_terminated_and_exits_143(tmp_path):
    """Found by a user's trial: SIGTERM (a scheduler's stop, `timeout`) ended a command at once and
    silently (exit 143, no line), leaving its unfinished output's temporary folder and claim for the
    next run. Now it interrupts like Ctrl-C: the cleanups run, the command says so, exit 143."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    work, ready = tmp_path / "work", tmp_path / "ready"
    work.mkdir()
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import safety_patch.models
        from safety_patch.atomic import atomic_dir
        from safety_patch.cli import main

        def slow_load(*a, **k):  # a command half-way through writing its output
            with atomic_dir(Path({str(work / "out")!r})) as tmp:
                (tmp / "half.txt").write_text("x")
                Path({str(ready)!r}).write_text("1")
                time.sleep(60)

        safety_patch.models.load_model = slow_load
        sys.exit(main(["model", "info", "--model", "default"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()
    assert any(work.iterdir())  # the temporary folder and the claim exist while it runs
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated" and "done" not in out + err
    assert sorted(p.name for p in work.iterdir()) == []  # no half-written output, temp folder or lock left


def test_chat_refuses_what_it_cannot_answer_faithfully(tiny_dir, capsys, monkeypatch):
    """Found by a user's trial: a prompt past the model's context ran and exited 0 with garbage; bytes
    that are not UTF-8 on the command line and a temperature of 1e-300 were tracebacks (exit 1)."""
    import pytest

    from safety_patch.errors import SafetyPatchError
    from safety_patch.generation import GenerationConfig, generate
    from safety_patch.models import load_model

    cases = [(["--prompt", "word " * 5000], "tokens and max_new_tokens is 5: over the model's context length of 4096"),
             (["--prompt", "caf\udcff"], "--prompt: not valid Unicode text (a lone surrogate at character 3"),
             (["--prompt", "hi", "--system", "\ud800"], "--system: not valid Unicode text"),
             (["--prompt", "hi", "--temperature", "1e-300"], "temperature must be 0 (greedy) or in [0.001, 2]"),
             (["--prompt", "   "], "--prompt is empty; give the text to answer")]
    for flags, says in cases:
        assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "5", *flags]) == 2
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if x.startswith("safety-patch: error:")]
        assert len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
    lm = load_model(str(tiny_dir), device="cpu")
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "word " * 5000}]]
    with pytest.raises(SafetyPatchError, match=r"prompt 2 of 2 \(counted from 1\) has .* tokens"):  # the library refuses it too
        generate(lm.model, lm.tokenizer, convs, GenerationConfig(max_new_tokens=5))
    with pytest.raises(SafetyPatchError, match=r"in \[0.001, 2\], got 3"):
        GenerationConfig(temperature=3)
    assert GenerationConfig(temperature=0.001).temperature == 0.001


def test_an_empty_model_and_a_file_given_as_a_patch_are_named(tmp_path, capsys):
    """Found by a user's trial: `--model ""` (an unset variable) silently loaded the embedded model, and
    `patch info FOLDER/adapter_config.json` said "patch folder not found" for a path that exists."""
    assert main(["model", "info", "--model", ""]) == 2
    assert "--model is empty" in capsys.readouterr().err
    f = tmp_path / "p" / "adapter_config.json"
    f.parent.mkdir()
    f.write_text("{}")
    assert main(["patch", "info", str(f)]) == 2
    assert f"{f} is a file; a patch is the folder that holds patch.json (here: {f.parent})" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # a folder transformers fails on with a multi-line message
    assert main(["model", "info", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"safety-patch: error: cannot load model from {tmp_path / 'm'}: ")


def test_the_gate_refuses_prompts_it_cannot_read(tiny_dir, tmp_path, capsys):
    """Found by a user's trial: `gate eval --harmful` counted a 9,207-token row (context 8,192) as caught,
    and `patch gate --prompt ""` routed the bare chat template."""
    import pytest

    from safety_patch.errors import SafetyPatchError
    from safety_patch.gate.features import check_context
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    check_context(lm.model, [[1, 2, 3]], "f.csv")
    with pytest.raises(SafetyPatchError, match=r"f\.csv: prompt 2 has 4097 tokens, over the model's context length of 4096"):
        check_context(lm.model, [[1], [5] * 4097], "f.csv")
    with pytest.raises(SafetyPatchError, match=r"f\.csv: prompt 1 is empty"):
        check_context(lm.model, [[]], "f.csv")
    assert main(["patch", "gate", str(tmp_path), "--model", str(tiny_dir), "--prompt", " "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_a_run_folder_given_as_a_patch_names_the_patch_inside(tiny_dir, tmp_path, capsys):
    """Found trying `chat --patch runs/demo/02-arms/lora-safety`: a reproduce stage folder holds its
    patch in `patch/`, and the error said only "has no patch.json". It now names the patch inside."""
    from safety_patch.models import load_model
    from safety_patch.testing import make_lora_patch

    lm = load_model(str(tiny_dir), device="cpu")
    make_lora_patch(lm.model, tmp_path / "arm" / "patch", lm.fingerprint)
    assert main(["patch", "info", str(tmp_path / "arm")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'arm'} has no patch.json" in err and f"the patch inside it: {tmp_path / 'arm' / 'patch'}" in err
    assert main(["patch", "info", str(tmp_path)]) == 2  # two levels up: nothing to point at
    assert "inside it" not in capsys.readouterr().err


def test_target_fpr_is_a_rate_strictly_between_0_and_1(capsys):
    """Found by a user's trial: --help showed [0, 1] while 0 and 1 were refused later, and nan was
    refused as "should be less than or equal to 1"."""
    for v in ("0", "1", "nan", "-0.1", "inf"):
        assert main(["gate", "fit", "--data", "d", "--out", "o", "--target-fpr", v]) == 2
        assert "--target-fpr': must be a number in (0, 1)" in capsys.readouterr().err, v


def test_report_on_what_is_not_a_run_is_one_line_naming_it(tmp_path, capsys):
    """Found by a user's trial: `report` on a run.json that is a list, or whose plan or timings are
    not objects, gave a traceback or a report of "Model `None`"; a missing folder was called "not
    a run folder"."""
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"safety-patch: error: {tmp_path / 'nope'} does not exist"
    run = tmp_path / "run"
    run.mkdir()
    for body, says in (("[]", "must be a JSON object (a reproduce run's record), not list"),
                       ('{"plan": 5}', "plan must be an object, not int"),
                       ('{"plan": {}, "timings": []}', "timings must be an object, not list"),
                       ('{"timings": {}}', "has no plan")):
        (run / "run.json").write_text(body)
        assert main(["report", str(run)]) == 2, body
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"safety-patch: error: {run / 'run.json'}: ") and says in err[0], err
        assert not (run / "report.md").exists()

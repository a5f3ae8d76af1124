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


def test_ctrl_c_exits_130_and_never_says_done(monkeypatch, capsys):
    """typer hands a KeyboardInterrupt back as a return code when not standalone: `main` once ignored it,
    printed "[cmd] done" and exited 0, so `train ... && eval ...` went on after a Ctrl-C."""
    import safety_patch.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safety_patch.models, "load_model", interrupted)
    assert main(["model", "info", "--model", "default"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "done" not in err

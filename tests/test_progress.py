"""Progress you can see (issue 24 item 6): bars on a terminal, plain lines in a log, a summary line per command."""

from __future__ import annotations

import io
import time

from safety_patch.progress import bar, duration


class _File(io.StringIO):
    def isatty(self):
        return False


def test_a_log_file_gets_whole_lines_with_rate_and_no_carriage_returns(monkeypatch):
    monkeypatch.setenv("SAFETY_PATCH_PROGRESS_SECONDS", "0.1")
    out = _File()
    with bar(5, "[x] work", unit="item", stream=out) as b:
        for _ in range(5):
            time.sleep(0.12)
            b.update(1)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) >= 3 and all(line.startswith("[x] work") for line in lines)
    assert "5/5" in lines[-1] and "item/s" in lines[-1]  # the last line: done, with a rate


def test_durations_read_like_a_person_would_write_them():
    assert duration(4.25) == "4.2 s" or duration(4.25) == "4.3 s"
    assert duration(185) == "3 min 05 s"
    assert duration(3725) == "1 h 02 min"


def test_every_command_ends_with_one_summary_line_naming_what_it_wrote(tiny_dir, tmp_path, capsys):
    import json

    from safety_patch.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("Hello there.", "How do I bake bread?")))
    out = tmp_path / "res.json"
    assert main(["eval", "overrefusal", "--model", str(tiny_dir), "--prompts", str(prompts), "--judge", "keyword",
                 "--max-new-tokens", "2", "--no-cache", "--out", str(out)]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"[eval overrefusal] wrote {out} in ") and out.is_file()
    assert main(["data", "sources"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("[data sources] done in ")


def test_the_summary_names_the_command_not_an_option_value_that_looks_like_one():
    """`train --data data` once ended with "[train data] ...": the option's value is a group's name."""
    from safety_patch.cli.runner import _command_name

    assert _command_name(["train", "--data", "data", "--out", "p"]) == "train"
    assert _command_name(["--threads", "1", "data", "build", "--out", "eval"]) == "data build"
    assert _command_name(["patch", "--help"]) == "patch"
    assert _command_name(["--version"]) == "safety-patch"

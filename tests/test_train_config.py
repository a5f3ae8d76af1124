"""The grouped training config: its defaults are the default recipe, recipes are data files by
role, YAML files are grouped, and the `train` command's flags, --set and --help come from the
dataclass fields (train/config.py, train/api.py, cli/train.py)."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from safety_patch.cli import main
from safety_patch.config import read_yaml
from safety_patch.errors import SafetyPatchError
from safety_patch.train.api import parse_set, resolve_config
from safety_patch.train.config import (
    FLAGS,
    LEGACY_KEYS,
    RECIPE_DIR,
    TrainConfig,
    check_layer,
    field_docs,
    field_types,
    help_text,
    override,
    recipe_names,
)

ROOT = Path(__file__).resolve().parents[1]

# The flat TrainConfig of before the groups, written down: its class defaults, and the named
# presets the recipe files replace (train/config.py before issue 21). The default recipe was
# `_GATED`: the class defaults with the LoRA, 512 tokens and the gated-v2 gate.
OLD_CLASS = {
    "method": "lora", "objective": "sft", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear",
    "layers": None, "general_ratio": 0.0, "contrast_ratio": 0.0, "borderline_share": None, "anchor_kl": 0.0,
    "anchor_self_instruct": 0, "anchor_batch_size": None, "anchor_max_tokens": 48, "decision_tokens": 4,
    "decision_weight": 1.0, "orthogonal_k": 0, "epochs": 1.0, "lr": None, "batch_size": 8, "grad_accum": 1,
    "max_seq_len": 1024, "max_train_rows": None, "warmup_ratio": 0.05, "scheduler": "cosine", "weight_decay": 0.0,
    "seed": 0, "sampling": "group_by_length", "gradient_checkpointing": False, "dpo_beta": 0.1, "snapshot_steps": None,
    "stop_after": None, "gate_layer": None, "gate_depth": None, "gate_threshold": 1.0, "gate_l2": 1e-2,
    "gate_wrapped_benign": 200, "gate_wrapped_harmful": 0, "gate_self_instruct": 0, "save_steps": 50, "logging_steps": 5,
}
_LORA = {"method": "lora", "rank": 8, "alpha": 16.0, "target_modules": "all-linear", "lr": 2e-4}
OLD_PRESETS = {  # old name -> (role name now, preset)
    "default": ("default", _LORA | {"general_ratio": 0.0, "contrast_ratio": 0.0, "max_train_rows": None,
                                    "max_seq_len": 512, "gate_depth": 0.6, "gate_threshold": 0.5,
                                    "gate_self_instruct": 600, "gate_wrapped_harmful": 400, "gate_wrapped_benign": 600}),
    "paper": ("paper", _LORA | {"general_ratio": 0.0, "contrast_ratio": 0.0}),
    "anchor-v2": ("always-on", _LORA | {"anchor_kl": 8.0, "borderline_share": 0.5, "decision_weight": 8.0,
                                         "decision_tokens": 4, "max_train_rows": None, "max_seq_len": 512,
                                         "stop_after": 0.685}),
    "anchor-v1": ("redteam-round", _LORA | {"anchor_kl": 3.0, "borderline_share": 0.5, "max_train_rows": 400,
                                             "max_seq_len": 512}),
    "full-safety": ("full-safety", {"method": "full", "lr": 1e-5}),
    "full-anchor": ("full-anchor", {"method": "full", "lr": 1e-5, "anchor_kl": 3.0, "borderline_share": 0.5,
                                    "max_train_rows": 400, "max_seq_len": 512}),
}


def _new_value(cfg: TrainConfig, old_key: str):
    if old_key == "method":
        return cfg.method
    if old_key == "lr":
        return cfg.resolved_lr()
    group, field = LEGACY_KEYS[old_key].split(".")
    return getattr(getattr(cfg, group), field)


# 2026-12-02 (session 17): activation recomputation became the default for every recipe (the
# same adapter bit for bit, a fraction of the memory; bench/train_throughput.py); 2026-12-03
# (session 28) it is unset: off on a CPU, where passes of one row (optim.micro_batch_size, new,
# unset = 1 on a CPU) keep memory as low, faster, and on on an accelerator.
RECOMPUTE_CHANGE = {"gradient_checkpointing": None}


def _assert_same_as_old(cfg: TrainConfig, old: dict) -> None:
    old = dict(old) | RECOMPUTE_CHANGE
    old["lr"] = old["lr"] if old["lr"] is not None else (2e-4 if old["method"] == "lora" else 1e-5)
    gated = old["gate_layer"] is not None or old["gate_depth"] is not None
    assert (cfg.gate is not None) == gated
    for key, value in old.items():
        if key.startswith("gate_") and not gated:
            continue  # no gate: its settings were unused
        assert _new_value(cfg, key) == value, key


def test_every_old_flat_key_has_a_new_home():
    assert set(OLD_CLASS) - {"method"} == set(LEGACY_KEYS)
    assert all(k in field_types() for k in LEGACY_KEYS.values())
    assert len(set(LEGACY_KEYS.values())) == len(LEGACY_KEYS)


# 2026-12-01 (docs/lab-notebook.md, session 12): the default gate's threshold became a target
# false-positive rate on validation (gate.target_fpr 0.03; gate.threshold None), it reads final-norm
# features and learns from 600 re-asked prompts per side. Every other default is the old one.
GATE_CHANGE = {"gate_threshold": None}


def test_the_dataclass_defaults_are_the_old_default_recipe():
    cfg = TrainConfig()
    _assert_same_as_old(cfg, OLD_CLASS | OLD_PRESETS["default"][1] | GATE_CHANGE)
    assert (cfg.gate.target_fpr, cfg.gate.features, cfg.gate.rephrased) == (0.03, "final-norm", 600)
    assert cfg == resolve_config("default") == resolve_config()
    # spelled out, the figures docs/recipes.md quotes
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.resolved_lr(), cfg.data.max_seq_len) == (8, 16.0, 2e-4, 512)
    assert cfg.gate is not None and (cfg.gate.depth, cfg.gate.threshold) == (0.6, None)
    assert (cfg.gate.self_instruct, cfg.gate.wrapped_harmful, cfg.gate.wrapped_benign) == (600, 400, 600)
    assert cfg.record()["optim"]["lr"] == 2e-4
    assert cfg.optim.gradient_checkpointing is None and cfg.optim.micro_batch_size is None


@pytest.mark.parametrize("old", sorted(OLD_PRESETS))
def test_each_recipe_file_holds_its_old_preset(old):
    role, preset = OLD_PRESETS[old]
    _assert_same_as_old(resolve_config(role), OLD_CLASS | preset | (GATE_CHANGE if role == "default" else {}))


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_file_opens_with_its_command_and_holds_only_differences(name):
    path = RECIPE_DIR / f"{name}.yaml"
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first.startswith("# safety-patch "), first
    if name != "default" and "redteam" not in first:
        assert f"--recipe {name}" in first
    assert second.startswith("# ") and second.rstrip().endswith(".") and len(second) > 30
    cfg = resolve_config(name)
    cfg.validate()
    assert cfg.recipe == name
    defaults = TrainConfig()
    for key, value in check_layer(read_yaml(path), str(path)).items():
        if isinstance(value, dict):
            for f, v in value.items():
                assert getattr(getattr(defaults, key), f) != v, f"{path}: {key}.{f} is the default"
        else:
            assert getattr(defaults, key) != value, f"{path}: {key} is the default"


def test_the_five_roles_exist_and_ship_in_the_wheel():
    assert {"default", "paper", "always-on", "full-safety", "full-anchor"} <= set(recipe_names())
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["safety_patch"]
    pkg = RECIPE_DIR.parents[1]
    for path in RECIPE_DIR.glob("*.yaml"):
        assert any(path.relative_to(pkg).match(p) for p in patterns), path


@pytest.mark.parametrize("old, says", [
    ("gated", "recipe 'gated' is now called 'default'"),
    ("anchor-v2", "recipe 'anchor-v2' is now called 'always-on'"),
    ("anchor-v1", "recipe 'anchor-v1' is now called 'redteam-round'"),
    ("gated-v1", "recipe 'gated-v1' was retired; its settings are recorded in docs/lab-notebook.md"),
    ("anchor-si", "recipe 'anchor-si' was retired; its settings are recorded in docs/lab-notebook.md"),
    ("nope", "unknown recipe 'nope'; valid: always-on, default"),
])
def test_old_recipe_names_say_what_replaced_them(old, says, tmp_path, capsys):
    with pytest.raises(SafetyPatchError, match=re.escape(says)):
        resolve_config(old)
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--recipe", old])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1


RETIRED_PRESETS = {
    "gated": OLD_PRESETS["default"][1],
    "gated-v1": _LORA | {"general_ratio": 0.0, "contrast_ratio": 0.0, "max_train_rows": None, "max_seq_len": 512,
                         "gate_depth": 0.5, "gate_threshold": 0.0},
    "anchor-v2": OLD_PRESETS["anchor-v2"][1],
    "anchor-si": OLD_PRESETS["anchor-v2"][1] | {"anchor_self_instruct": 600, "anchor_batch_size": 24, "stop_after": 0.822},
    "anchor-v1": OLD_PRESETS["anchor-v1"][1],
}


def test_retired_recipes_are_recorded_in_the_lab_notebook(tmp_path):
    import yaml

    notebook = (ROOT / "docs" / "lab-notebook.md").read_text(encoding="utf-8")
    section = notebook[notebook.index("## 2026-12-01: Recipes retired from the code"):]
    block = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert set(block) == set(RETIRED_PRESETS)
    for name, preset in RETIRED_PRESETS.items():  # each, as a --config file, is its old preset exactly
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(block[name] or {}))
        _assert_same_as_old(resolve_config(None, path), OLD_CLASS | preset)


def _cli_config(tmp_path, capsys, *flags) -> dict:
    """The config `train` resolves for these flags (echoed before the data folder is read: the
    missing folder then stops the run, exit 2)."""
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("[train] config: ")]
    assert code == 2 and lines, err
    return json.loads(lines[0].removeprefix("[train] config: "))


def test_set_reaches_a_long_tail_field(tmp_path, capsys):
    cfg = _cli_config(tmp_path, capsys, "--set", "optim.grad_accum=3", "--set", "lora.dropout=0.1",
                      "--set", "gate.target_fpr=0.02", "--set", "optim.gradient_checkpointing=false",
                      "--set", "gate.phrasings=reask,context")
    assert cfg["gate"]["phrasings"] == ["reask", "context"]
    assert cfg["optim"]["grad_accum"] == 3 and cfg["lora"]["dropout"] == 0.1
    assert cfg["gate"]["target_fpr"] == 0.02 and cfg["optim"]["gradient_checkpointing"] is False
    for word, value in (("1", True), ("0", False), ("yes", True), ("no", False), ("True", True), ("false", False)):
        on = _cli_config(tmp_path, capsys, "--set", f"gate.written_lookalikes={word}")  # one spelling, one meaning
        assert on["gate"]["written_lookalikes"] is value, word
    assert parse_set(["data.max_train_rows=null", "optim.snapshot_steps=10,20"]) == {
        "data.max_train_rows": None, "optim.snapshot_steps": "10,20"}


def test_a_gate_setting_on_a_recipe_without_a_gate_says_it_turns_the_gate_on(tmp_path, capsys, caplog):
    """Found by a user's trial: `--recipe always-on --gate-self-instruct 7` wrote a gated patch
    (as documented: a gate setting turns the default gate on) and said only "lora patch"."""
    warn = "recipe always-on has no gate; your gate setting turns the default gate on"
    assert _cli_config(tmp_path, capsys, "--recipe", "always-on")["gate"] is None
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--recipe", "always-on",
                 "--gate-self-instruct", "7"])
    err = capsys.readouterr().err
    assert code == 2 and warn in caplog.text and "(set in flags;" in caplog.text
    caplog.clear()
    assert json.loads(next(x for x in err.splitlines() if x.startswith("[train] config: "))[16:])["gate"]["self_instruct"] == 7
    # the default recipe is gated: a gate setting changes its gate, nothing to say
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--gate-self-instruct", "7"])
    err = capsys.readouterr().err
    assert code == 2 and "[train] config: " in err and "has no gate" not in caplog.text
    # a config file's `gate: null` under a gate flag: said too, naming the file (the check sits where the layers meet)
    f = tmp_path / "c.yaml"
    f.write_text("gate: null\n")
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--config", str(f),
                 "--gate-self-instruct", "7"])
    assert code == 2 and f"{f} has no gate; your gate setting turns the default gate on" in caplog.text


@pytest.mark.parametrize("item, says", [
    ("bogus.rank=2", "--set: unknown key bogus.rank"),
    ("lora.rnak=2", "--set: unknown key lora.rnak; lora has rank, alpha"),
    ("lora.rank=two", "--set: lora.rank: expected int, got 'two'"),
    ("lora.rank", "--set lora.rank: expected group.field=value"),
    ("=3", "--set =3: expected group.field=value"),
    ("optim.grad_accum=0", "error: --set optim.grad_accum must be >= 1, got 0"),
    # a field that also has a flag is named as the user wrote it, not as the flag they did not use
    ("lora.rank=-3", "error: --set lora.rank must be >= 1, got -3"),
    ("gate.target_fpr=2", "error: --set gate.target_fpr must be in (0, 1), got 2"),
    ("gate.phrasings=reask,bogus", "gate config: phrasings must be a non-empty list of distinct names"),
    ("gate.written_lookalikes=maybe", "--set: gate.written_lookalikes: expected true/false, got 'maybe'"),
    ("gate.written_lookalikes=2", "--set: gate.written_lookalikes: expected true/false, got 2"),
])
def test_a_bad_set_is_named(item, says, tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--set", item])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, says", [
    (["--set", "optim.lr=1e-4", "--lr", "0.001"], "--set optim.lr=1e-4 and --lr 0.001 set the same field; give one"),
    (["--rank", "4", "--set", "lora.rank=4"], "--set lora.rank=4 and --rank 4 set the same field"),
    (["--set", "lora.rank=4", "--set", "lora.rank=8"], "--set lora.rank is given twice (lora.rank=4 and lora.rank=8)"),
    (["--rank", "4", "--rank=8"], "--rank is given twice; it takes one value: give it once"),
])
def test_one_field_set_twice_is_refused(flags, says, tmp_path, capsys):
    """Found by a user's trial: `--set optim.lr=1e-4 --lr 0.001` trained at 1e-4 in either order, saying nothing."""
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_an_option_given_twice_is_refused_for_every_command_and_a_list_option_may_repeat():
    """Found by a user's trial: `train --rank 4 ... --rank 8` trained rank 8 without a word (click keeps the last)."""
    from safety_patch.cli.runner import _repeated_option

    assert _repeated_option(["data", "build", "--out", "a", "--out", "b"]) == \
        "--out is given twice; it takes one value: give it once"
    assert _repeated_option(["--threads", "1", "--threads=2", "train"]).startswith("--threads is given twice")
    assert _repeated_option(["data", "build", "--distill", "--no-distill"]) == \
        "--distill and --no-distill are both given; give one of them"
    for fine in (["chat", "--patch", "a", "--patch", "b"], ["serve", "--stack", "a=b", "--stack", "c=d"],
                 ["chat", "--prompt", "--prompt"],  # the second is the prompt's text
                 ["chat", "--force", "--force"], ["-v", "--verbose", "train"], ["train", "--set", "a=1", "--set", "b=2"],
                 ["chat", "--", "--prompt", "x", "--prompt", "y"], ["patch", "info", "--rank", "--rank"]):
        assert _repeated_option(fine) is None, fine


def test_flags_set_and_yaml_make_the_same_config(tmp_path, capsys):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("lora: {rank: 16, layers: '1-3'}\ndata: {max_train_rows: 10}\nanchor: {kl: 2.0}\n"
                         "gate: {threshold: 0.7, depth: 0.4}\noptim: {grad_accum: 2, seed: 5}\n")
    by_yaml = _cli_config(tmp_path, capsys, "--config", str(yaml_file))
    by_flags = _cli_config(tmp_path, capsys, "--rank", "16", "--layers", "1-3", "--max-train-rows", "10",
                           "--anchor-kl", "2", "--gate-threshold", "0.7", "--gate-depth", "0.4", "--seed", "5",
                           "--set", "optim.grad_accum=2")
    by_set = _cli_config(tmp_path, capsys, *[a for kv in ["lora.rank=16", "lora.layers=1-3", "data.max_train_rows=10",
                                                          "anchor.kl=2", "gate.threshold=0.7", "gate.depth=0.4",
                                                          "optim.seed=5", "optim.grad_accum=2"] for a in ("--set", kv)])
    assert by_yaml == by_flags == by_set
    assert by_yaml["lora"]["rank"] == 16 and by_yaml["gate"]["threshold"] == 0.7 and by_yaml["gate"]["seed"] == 5
    assert by_yaml["gate"]["target_fpr"] is None  # a logit given replaces the default target rate
    # and a target rate given replaces a logit set before it; giving neither is an error
    assert _cli_config(tmp_path, capsys, "--config", str(yaml_file), "--set", "gate.target_fpr=0.05")["gate"] == \
        by_yaml["gate"] | {"threshold": None, "target_fpr": 0.05}
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--set", "gate.target_fpr=null"])
    assert code == 2 and "set exactly one of threshold" in capsys.readouterr().err
    assert by_yaml == resolve_config(None, yaml_file).record()
    # flags override the file, the file overrides the recipe
    assert _cli_config(tmp_path, capsys, "--config", str(yaml_file), "--rank", "4")["lora"]["rank"] == 4
    assert _cli_config(tmp_path, capsys, "--recipe", "paper", "--config", str(yaml_file))["data"]["max_seq_len"] == 1024


def test_no_gate_and_the_old_sentinel(tmp_path, capsys):
    assert _cli_config(tmp_path, capsys, "--no-gate")["gate"] is None
    # a gate setting on a recipe without a gate turns the default gate on
    assert _cli_config(tmp_path, capsys, "--recipe", "paper", "--gate-depth", "0.5")["gate"]["depth"] == 0.5
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--gate-layer", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--gate-layer -1 is deprecated: use --no-gate" in err and '"gate": null' in err
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-gate",
                 "--gate-threshold", "0.3"])
    assert code == 2 and "--no-gate conflicts with --gate-threshold" in capsys.readouterr().err
    # a full-parameter run keeps the default gate (a gated delta); --recipe full-safety is always on
    assert _cli_config(tmp_path, capsys, "--method", "full")["gate"]["depth"] == 0.6
    assert _cli_config(tmp_path, capsys, "--recipe", "full-safety")["gate"] is None


def test_the_gate_draws_its_prompts_with_the_run_seed():
    cfg = resolve_config(None, None, {"optim.seed": 3})
    assert cfg.gate is not None and cfg.gate_for_run().seed == 3 and cfg.record()["gate"]["seed"] == 3
    with pytest.raises(SafetyPatchError, match="gate.seed 4 would be ignored"):
        resolve_config(None, None, {"gate.seed": 4})
    with pytest.raises(SafetyPatchError, match="no gate"):
        resolve_config("paper").gate_for_run()


def test_help_comes_from_the_field_docstrings(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    assert field_docs()["optim.grad_accum"] == "Gradient accumulation steps per optimiser step."
    for key in ("lora.rank", "lora.orthogonal_k", "gate.depth", "data.max_train_rows"):
        assert help_text(key) and help_text(key) in text, key
    old_flags = ("recipe method objective rank alpha target-modules layers general-ratio contrast-ratio borderline-share "
                 "anchor-kl anchor-batch-size anchor-self-instruct decision-weight decision-tokens orthogonal-k epochs lr "
                 "batch-size max-seq-len max-train-rows stop-after snapshot-steps gate-layer gate-depth gate-threshold "
                 "gate-self-instruct gate-wrapped-benign gate-wrapped-harmful seed config resume overwrite device dtype")
    for flag in [*old_flags.split(), *FLAGS.values()]:  # every flag of the hand-written command, still there
        assert re.search(rf"--{flag}\b", text), flag
    for option in ("--set", "--no-gate", "--config", "--recipe", "--data", "--out", "--resume", "--overwrite"):
        assert option in text
    assert "always-on" in text and "(default 8)" in text


@pytest.mark.parametrize("content, says", [
    ("rank: 2\n", "rank is now lora.rank"),
    ("gate_threshold: 0.3\n", "gate_threshold is now gate.threshold"),
    ("anchor_kl: 2.0\n", "anchor_kl is now anchor.kl"),
    ("lora: {rnak: 2}\n", "unknown key lora.rnak"),
    ("lora: {rank: two}\n", "lora.rank: expected int, got 'two'"),
    ("lora: 3\n", "lora must be a mapping"),
    ("zzz: 1\n", "unknown key 'zzz'"),
    ("optim: {lr: .nan}\n", ":1: optim.lr must be a finite number > 0, got nan"),
    ("method: lora\nlora:\n  alpha: 8\n  rank: 0\n", ":4: lora.rank must be >= 1, got 0"),
    ("gate:\n  l2: -1\n", ":2: gate.l2 must be >= 0, got -1.0"),
    ("gate:\n  l2: 0.01\n  features: nope\n", ":3: gate config: features must be one of"),
    # a user's trial: both given in a file, and the error named neither file nor line
    ("gate:\n  l2: 0.01\n  threshold: 0.5\n  target_fpr: 0.02\n", ":3: gate config: set exactly one of threshold"),
    ("optim:\n  scheduler: cosine\n  snapshot_steps: '0'\n", ":3: optim.snapshot_steps must name positive"),
    # a repeated key: YAML would silently read the last one, so it is refused (both lines named)
    ("lora: {rank: 4}\nlora: {rank: 0}\n", ":2: key 'lora' is given twice (also on line 1)"),
    ("lora:\n  rank: 4\n  rank: 8\n", ":3: key 'rank' is given twice (also on line 2)"),
    # a list or mapping where text belongs was made text by str() ("['a']" as a module name)
    ("recipe: default\noptim: {scheduler: [cosine]}\n", "optim.scheduler: expected str, got a list ['cosine']"),
    ("lora: {target_modules: {q_proj: 1}}\n", "lora.target_modules: expected str, got a mapping {'q_proj': 1}"),
])
def test_yaml_errors_name_the_file_and_key(content, says, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(SafetyPatchError, match=re.escape(says)) as e:
        resolve_config(None, path)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}"), "a value the file set is named in the file"


def test_a_yaml_list_is_the_comma_separated_form_of_modules_and_layers(tmp_path):
    """Found by a user's trial: `target_modules: [q_proj, v_proj]` became the one name
    "['q_proj', 'v_proj']", refused after the model loaded as "not in the model"."""
    path = tmp_path / "t.yaml"
    path.write_text("recipe: always-on\nlora:\n  target_modules: [q_proj, v_proj]\n  layers: [4, 8, 12]\n")
    cfg = resolve_config(None, path)
    assert cfg.lora.target_modules == "q_proj,v_proj" and cfg.lora.layers == "4,8,12"
    for bad, why in (("target_modules: [q_proj, [v_proj]]", r"list item \['v_proj'\] is not a module name"),
                     ("target_modules: [q_proj, 3]", "list item 3 is not a module name"),
                     ("layers: [4, true]", "list item True is not a layer number or range")):
        path.write_text(f"recipe: always-on\nlora:\n  {bad}\n")
        with pytest.raises(SafetyPatchError, match=rf"{path}.*lora\.(target_modules|layers): {why}"):
            resolve_config(None, path)


def test_a_range_error_names_the_layer_that_set_the_value(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("lora:\n  rank: 4\n")
    with pytest.raises(SafetyPatchError, match=r"^--rank must be >= 1, got 0$"):
        resolve_config(None, path, {"lora.rank": 0})  # the flag overrides the file: the flag is named
    path.write_text("lora:\n  rank: 0\n")
    assert resolve_config(None, path, {"lora.rank": 2}).lora.rank == 2  # the file's value never used: no error
    path.write_text("optim:\n  batch_size: 8\n")
    with pytest.raises(SafetyPatchError, match=r"^--rank must be >= 1"):
        resolve_config(None, path, {"lora.rank": 0})  # the file sets another key: no file or line claimed


def test_override_is_checked_by_validate():
    cfg = override(TrainConfig(), {"lora.rank": 0})
    with pytest.raises(SafetyPatchError, match="--rank must be >= 1, got 0"):
        cfg.validate()
    with pytest.raises(SafetyPatchError, match="unknown config key 'lora.rnak'"):
        override(TrainConfig(), {"lora.rnak": 1})
    assert override(TrainConfig(), {"gate": None}).gate is None
    assert TrainConfig().gate is not None  # the default is untouched


def test_a_gate_logit_replaces_the_target_rate_and_its_out_of_family_raise():
    d = TrainConfig().gate
    assert (d.target_fpr, d.family_fpr, d.extra_layers, d.extra_depths, d.extra_weight) == (0.03, 0.05, None, [0.7], 1.0)
    assert (d.written_harmful, d.written_harmful_more, d.written_lookalikes) == (True, True, True)
    g = override(TrainConfig(), {"gate.threshold": 0.5}).gate
    assert (g.threshold, g.target_fpr, g.family_fpr) == (0.5, None, None)
    override(TrainConfig(), {"gate.threshold": 0.5}).validate()
    with pytest.raises(SafetyPatchError, match="family_fpr raises a target_fpr threshold"):  # both asked for: refused
        override(TrainConfig(), {"gate.threshold": 0.5, "gate.family_fpr": 0.05}).validate()
    with pytest.raises(SafetyPatchError, match="wrapped_benign 0, wrapped_harmful 400: both must be > 0"):
        override(TrainConfig(), {"gate.wrapped_benign": 0}).validate()
    override(TrainConfig(), {"gate.wrapped_benign": 0, "gate.family_fpr": None}).validate()


def test_every_generated_flag_sets_its_field(tmp_path, capsys):
    strings = {"method": "lora", "loss.objective": "sft", "lora.target_modules": "q_proj", "lora.layers": "1-2",
               "optim.snapshot_steps": "5"}
    want = {}
    argv = []
    for key, flag in FLAGS.items():
        typ = [a for a in getattr(field_types()[key], "__args__", (field_types()[key],)) if a is not type(None)][0]
        value = strings[key] if typ is str else {int: 3, float: 0.25}[typ]
        want[key] = value
        argv += [f"--{flag}", str(value)]
    cfg = _cli_config(tmp_path, capsys, *argv)
    for key, value in want.items():
        got = cfg[key] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]
        assert got == value, key


@pytest.mark.parametrize("batch,micro,device,objective,want", [
    (8, None, "cpu", "sft", 1),      # unset on a CPU: passes of one row
    (8, None, "cuda", "sft", 8),     # unset on an accelerator: the whole batch
    (8, 4, "cpu", "sft", 4),
    (6, 4, "cpu", "sft", 3),         # the largest divisor of the batch not above the setting
    (7, 4, "cuda", "sft", 1),
    (4, 16, "cpu", "sft", 4),        # never more than the batch
    (8, 1, "cpu", "dpo", 8),         # DPO passes its whole batch
])
def test_pass_size(batch, micro, device, objective, want):
    import torch

    from safety_patch.train.run import pass_size

    cfg = override(TrainConfig(), {"optim.batch_size": batch, "optim.micro_batch_size": micro, "loss.objective": objective})
    assert pass_size(cfg, torch.device(device)) == want


@pytest.mark.parametrize("setting,device,want", [(None, "cpu", False), (None, "cuda", True),
                                                 (True, "cpu", True), (False, "cuda", False)])
def test_recomputation_resolved_by_device(setting, device, want):
    import torch

    from safety_patch.train.run import recomputes

    cfg = override(TrainConfig(), {"optim.gradient_checkpointing": setting})
    assert recomputes(cfg, torch.device(device)) is want


def test_micro_batch_size_must_be_positive():
    with pytest.raises(SafetyPatchError, match="optim.micro_batch_size"):
        override(TrainConfig(), {"optim.micro_batch_size": 0}).validate()


def test_lora_settings_with_the_full_method_are_refused_not_ignored(tmp_path):
    """Found by a user's trial: `train --method full --rank 4` trained every weight and dropped the rank."""
    from safety_patch.errors import SafetyPatchError
    from safety_patch.train.api import resolve_config

    with pytest.raises(SafetyPatchError, match="--rank sets the LoRA adapter, but the method is full"):
        resolve_config("paper", overrides={"method": "full", "lora.rank": 4})
    y = tmp_path / "t.yaml"
    y.write_text("method: full\nlora:\n  alpha: 8\n")
    with pytest.raises(SafetyPatchError, match="--alpha sets the LoRA adapter"):
        resolve_config("paper", y)
    assert resolve_config("full-safety").method == "full"  # a recipe's own layer is not the user's
    # the same for DPO's beta under the sft objective (a user's trial: accepted and unused)
    with pytest.raises(SafetyPatchError, match=r"loss\.dpo_beta sets DPO's beta, but the objective is sft"):
        resolve_config("paper", overrides={"loss.dpo_beta": 0.3})
    assert resolve_config("paper", overrides={"loss.objective": "dpo", "loss.dpo_beta": 0.3}).loss.dpo_beta == 0.3

import json

import pytest
import torch

from safety_patch.errors import SafetyPatchError
from safety_patch.fingerprint import fingerprint
from safety_patch.patches import attached, finalize_patch, merged_state_dict, read_patch, verify
from safety_patch.testing import make_delta_patch, make_lora_patch, tiny_llama


@pytest.fixture()
def base():
    model, tok = tiny_llama()
    ids = tok("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    return model, tok, fingerprint(model, tok), ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_detached_logits_are_bit_identical(base, tmp_path):
    model, tok, fp, ids = base
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = make_lora_patch(model, tmp_path / "l", fp)
    delta = make_delta_patch(model, tmp_path / "d", fp)
    with attached(model, [delta, lora], fp) as m:
        patched = logits(m, ids)
    assert not torch.allclose(patched, before)
    assert torch.equal(logits(model, ids), before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all("lora" not in n for n, _ in model.named_modules())


def test_attaching_a_lora_patch_in_python_prints_no_library_deprecation(base, tmp_path):
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model:
    every attach in Python use printed a FutureWarning about a call the user never made."""
    import warnings

    model, _, fp, ids = base
    two = [make_lora_patch(model, tmp_path / f"l{i}", fp, seed=i) for i in range(2)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with attached(model, two, fp) as m:
            logits(m, ids)
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []


def test_restored_even_after_an_exception(base, tmp_path):
    model, tok, fp, ids = base
    before = logits(model, ids)
    delta = make_delta_patch(model, tmp_path / "d", fp)
    with pytest.raises(RuntimeError), attached(model, [delta], fp):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)


def test_merged_equals_attached(base, tmp_path):
    model, tok, fp, ids = base
    patches = [make_delta_patch(model, tmp_path / "d", fp), make_lora_patch(model, tmp_path / "l", fp)]
    with attached(model, patches, fp) as m:
        want = logits(m, ids)
    merged_sd = merged_state_dict(model, [read_patch(p) for p in patches], fp)
    merged, _ = tiny_llama()
    merged.load_state_dict(merged_sd)
    assert torch.allclose(logits(merged, ids), want, atol=1e-5)


def test_merging_two_loras_equals_attaching_both_and_order_does_not_matter(base, tmp_path):
    model, tok, fp, ids = base
    a = make_lora_patch(model, tmp_path / "a", fp, seed=1)
    b = make_lora_patch(model, tmp_path / "b", fp, seed=2, targets=["up_proj", "down_proj"])
    with attached(model, [a, b], fp) as m:
        ab = logits(m, ids)
    with attached(model, [b, a], fp) as m:
        ba = logits(m, ids)
    with attached(model, [a], fp) as m:
        only_a = logits(m, ids)
    assert torch.allclose(ab, ba, atol=1e-5)
    assert not torch.allclose(ab, only_a, atol=1e-4)  # both adapters are active, not just the first
    merged, _ = tiny_llama()
    merged.load_state_dict(merged_state_dict(model, [read_patch(a), read_patch(b)], fp))
    assert torch.allclose(logits(merged, ids), ab, atol=1e-5)


def test_stacked_patch_requires_its_prerequisite_first(base, tmp_path):
    model, tok, fp, ids = base
    first = make_lora_patch(model, tmp_path / "r1", fp, seed=1)
    pid = read_patch(first).id
    second = make_lora_patch(model, tmp_path / "r2", fp, seed=2, stack=[pid])
    with pytest.raises(SafetyPatchError, match="trained on top of"):
        with attached(model, [second], fp):
            pass
    with pytest.raises(SafetyPatchError, match="trained on top of"):
        with attached(model, [second, first], fp):
            pass
    with attached(model, [first, second], fp):
        pass


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_a_patch_given_twice_is_refused_even_from_a_copy_and_forced(base, tmp_path, kind):
    """Attached twice, a patch's update would apply twice (a model no one trained); the base stays untouched."""
    import shutil

    model, tok, fp, ids = base
    before = logits(model, ids)
    make = make_lora_patch if kind == "lora" else make_delta_patch
    p = make(model, tmp_path / "p", fp)
    shutil.copytree(p, tmp_path / "copy")
    other = make(model, tmp_path / "o", fp, seed=5)
    for stack in ([p, p], [p, other, tmp_path / "copy"]):
        for force in (False, True):
            with pytest.raises(SafetyPatchError, match=f"patch {read_patch(p).id} is given twice"):
                with attached(model, stack, fp, force=force):
                    pass
    assert torch.equal(logits(model, ids), before)
    with attached(model, [p, other], fp):  # two different patches still stack
        pass


def test_wrong_base_is_refused_unless_forced(base, tmp_path):
    model, tok, fp, ids = base
    p = make_lora_patch(model, tmp_path / "l", "0" * 64)
    with pytest.raises(SafetyPatchError, match="was made for base 000000000000") as e:
        with attached(model, [p], fp):
            pass
    assert "(the patch's base: test; loaded: " in str(e.value)  # names both sides (it said "vs this model")
    with attached(model, [p], fp, force=True) as m:
        assert not torch.allclose(logits(m, ids), logits(model.__class__(model.config), ids))
    # a user's trial: a patch for a model of another width was refused for its shapes, not for its base
    wide, _ = tiny_llama(hidden=48)
    q = make_lora_patch(wide, tmp_path / "wide", "1" * 64)
    with pytest.raises(SafetyPatchError, match="was made for base 111111111111"):
        verify(read_patch(q), model, fp)
    with pytest.raises(SafetyPatchError, match="has shape"):  # forced: the shapes still refuse it
        verify(read_patch(q), model, fp, force=True)


def test_adapter_naming_missing_modules_is_rejected(base, tmp_path):
    model, tok, fp, ids = base
    p = make_lora_patch(model, tmp_path / "l", fp)
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    finalize_patch(p, "lora", {"name": "test", "fingerprint": fp})  # a consistent patch made for another model
    with pytest.raises(SafetyPatchError, match="targets modules the model lacks: c_attn"):
        with attached(model, [p], fp):
            pass


def test_corrupt_truncated_missing_and_pickled_patches(base, tmp_path):
    model, tok, fp, ids = base
    p = make_lora_patch(model, tmp_path / "l", fp)
    w = p / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetyPatchError, match="corrupt or truncated safetensors"):
        read_patch(p)
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SafetyPatchError, match="sha256 differs"):
        read_patch(p)
    w.write_bytes(data)
    read_patch(p)
    (p / "evil.bin").write_bytes(b"pickle")
    with pytest.raises(SafetyPatchError, match="pickle"):
        read_patch(p)
    (p / "evil.bin").unlink()
    (p / "patch.json").unlink()
    with pytest.raises(SafetyPatchError, match="has no patch.json"):
        read_patch(p)
    with pytest.raises(SafetyPatchError, match="patch folder not found"):
        read_patch(tmp_path / "nope")


def test_delta_shape_mismatch(base, tmp_path):
    model, tok, fp, ids = base
    other, _ = tiny_llama(hidden=16)
    p = make_delta_patch(other, tmp_path / "d", fp)
    with pytest.raises(SafetyPatchError, match="has shape"):
        with attached(model, [p], fp):
            pass


def test_lora_patch_loads_in_plain_peft(base, tmp_path):
    from peft import PeftModel

    model, tok, fp, ids = base
    p = make_lora_patch(model, tmp_path / "l", fp)
    with attached(model, [p], fp) as m:
        ours = logits(m, ids)
    fresh, _ = tiny_llama()
    theirs = logits(PeftModel.from_pretrained(fresh, str(p)), ids)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_cli_info_verify_merge(tiny_dir, tmp_path, capsys):
    from safety_patch.cli import main
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    p = make_lora_patch(lm.model, tmp_path / "p", lm.fingerprint)
    assert main(["patch", "info", str(p)]) == 0
    assert "format" in capsys.readouterr().out
    assert main(["patch", "verify", str(p), "--model", str(tiny_dir)]) == 0
    assert main(["patch", "merge", "--model", str(tiny_dir), "--patch", str(p), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(str(tmp_path / "merged"), device="cpu")
    ids = lm.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with attached(lm.model, [p], lm.fingerprint) as m:
        want = logits(m, ids)
    assert torch.allclose(logits(merged.model, ids), want, atol=1e-5)
    # a user's trial: `patch info` on a merged checkpoint said only "not a safety-patch patch"
    capsys.readouterr()
    for cmd in (["patch", "info", str(tmp_path / "merged")], ["patch", "verify", str(tmp_path / "merged")]):
        assert main(cmd) == 2
        assert "is a merged checkpoint" in capsys.readouterr().err
    assert main(["model", "info", "--model", str(tmp_path / "merged"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    pid = json.loads((tmp_path / "merged" / "merged_from.json").read_text())["patches"][0]["id"]
    assert shown["merged_patches"] == [f"{pid} ({p})"] and shown["merged_base"].startswith(f"{tiny_dir} (")
    assert main(["model", "info", "--model", str(tiny_dir), "--json"]) == 0
    assert "merged_patches" not in json.loads(capsys.readouterr().out)
    # a user's trial: `eval ... --model MERGED` tabled the merged model as "base" with nothing saying otherwise
    from safety_patch.evaluation import capability, safety

    prov = safety.provenance(merged, [])
    assert prov["merged_patches"] == [{"id": pid, "path": str(p)}] and "merged_patches" not in safety.provenance(lm, [])
    res = {"provenance": prov, "config": {}, "runs": {"base": {"nll": {"value": 1.5, "ci95": [1.4, 1.6], "n": 3}}}}
    head = capability.table(res).splitlines()[0]
    assert head == f"base = {merged.name}, which has 1 patch merged into its weights (merged_from.json): {pid}"
    assert safety.merged_note(res) == [head] and safety.merged_note({"provenance": safety.provenance(lm, [])}) == []
    assert main(["patch", "merge", "--model", str(tiny_dir), "--patch", str(p), "--out", str(tmp_path / "merged")]) == 2
    assert "exists" in capsys.readouterr().err
    # --overwrite replaces a merged checkpoint in one swap, and never a folder safety-patch did not merge
    q = make_lora_patch(lm.model, tmp_path / "q", lm.fingerprint, seed=7)
    assert main(["patch", "merge", "--model", str(tiny_dir), "--patch", str(q), "--out", str(tmp_path / "merged"),
                 "--overwrite"]) == 0
    assert json.loads((tmp_path / "merged" / "merged_from.json").read_text())["patches"][0]["path"] == str(q)
    with attached(lm.model, [q], lm.fingerprint) as m:
        assert torch.allclose(logits(load_model(str(tmp_path / "merged"), device="cpu").model, ids), logits(m, ids),
                              atol=1e-5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["patch", "merge", "--model", str(tiny_dir), "--patch", str(p), "--out", str(tmp_path / "mine"),
                 "--overwrite"]) == 2
    assert "not a merged folder" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    other = make_lora_patch(lm.model, tmp_path / "o", "f" * 64)
    assert main(["patch", "verify", str(other), "--model", str(tiny_dir)]) == 2
    assert "was made for base" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_dir), "--patch", str(p), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    # found by a user's trial: `patch merge --force` folded a patch into a checkpoint it was merged into already,
    # and the new record named only that checkpoint (the chain back to the base lost)
    merged = tmp_path / "merged"  # q folded into the tiny base
    assert main(["patch", "merge", "--model", str(merged), "--patch", str(q), "--force", "--out",
                 str(tmp_path / "twice")]) == 2
    assert "is already merged into" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    # ...and attaching it to the merged checkpoint (chat, eval, serve: every attach) is refused the same way
    assert main(["chat", "--prompt", "hi", "--max-new-tokens", "2", "--patch", str(q), "--model", str(merged),
                 "--force"]) == 2
    assert "is already merged into this model" in capsys.readouterr().err
    mlm = load_model(str(merged), device="cpu")
    with pytest.raises(SafetyPatchError, match="is already merged into this model"):
        with attached(mlm.model, [q], mlm.fingerprint, force=True):
            pass
    assert main(["patch", "merge", "--model", str(merged), "--patch", str(p), "--force", "--out",
                 str(tmp_path / "both")]) == 0
    rec = json.loads((tmp_path / "both" / "merged_from.json").read_text())
    assert rec["base"]["fingerprint"] == lm.fingerprint and rec["merged_into"]["name"] == str(merged)
    assert [x["path"] for x in rec["patches"]] == [str(q), str(p)]
    assert {"code", "versions", "created"} <= set(rec)
    # the record names the checkpoint's own fingerprint (what a patch trained on it binds to) ...
    both = load_model(str(tmp_path / "both"), device="cpu")
    assert rec["fingerprint"] == both.fingerprint != mlm.fingerprint and rec["dtype"] == "float32"
    # ... so weights edited after the merge are refused: its list of merged patches is not theirs
    from safetensors.torch import load_file, save_file

    (w,) = (tmp_path / "both").glob("*.safetensors")
    sd = load_file(str(w))
    k = next(iter(sd))
    sd[k] = sd[k] + 1e-3
    save_file(sd, str(w), metadata={"format": "pt"})
    with pytest.raises(SafetyPatchError, match=r"these weights are not the ones `patch merge` wrote \(merged_from.json "
                                               r"records fingerprint " + rec["fingerprint"][:12]):
        load_model(str(tmp_path / "both"), device="cpu")


def test_vllm_lora_module_format(base, tmp_path):
    """vLLM's LoRA loader reads adapter_config.json (r, lora_alpha, target_modules) and adapter_model.safetensors
    with PEFT key names; this checks that format without vLLM installed."""
    from safetensors import safe_open

    model, tok, fp, ids = base
    p = make_lora_patch(model, tmp_path / "l", fp)
    cfg = json.loads((p / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and isinstance(cfg["r"], int) and "lora_alpha" in cfg and cfg["target_modules"]
    with safe_open(str(p / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)


@pytest.mark.parametrize("inner", ["lora", "delta"])
def test_a_second_stack_on_an_attached_model_is_refused_naming_the_cause(base, tmp_path, inner):
    """Found by a user's trial: nesting attached() failed with "targets modules the model lacks" (the
    wrapped modules), which sent the user after the wrong problem. The base is restored either way."""
    model, tok, fp, ids = base
    before = logits(model, ids)
    outer = make_lora_patch(model, tmp_path / "o", fp)
    second = (make_lora_patch(model, tmp_path / "i", fp, seed=5) if inner == "lora"
              else make_delta_patch(model, tmp_path / "i", fp))
    with attached(model, [outer], fp):
        with pytest.raises(SafetyPatchError, match="a patch stack is already attached to this model"):
            with attached(model, [second], fp):
                pass
    assert torch.equal(logits(model, ids), before)
    with attached(model, [second], fp) as m:  # after the first block, the next stack attaches
        assert not torch.equal(logits(m, ids), before)
    assert torch.equal(logits(model, ids), before)


def test_patch_info_says_what_each_kind_of_patch_is(base, tmp_path):
    """Found by a user's trial: `patch info` on a full-parameter delta showed `rank 8` and
    `target_modules all-linear` (the config's unused LoRA defaults). A delta names the tensors it changes."""
    from safetensors import safe_open

    from safety_patch.patches import DELTA_FILE, info

    model, tok, fp, ids = base
    d = make_delta_patch(model, tmp_path / "d", fp)
    shown = info(read_patch(d))
    with safe_open(str(d / DELTA_FILE), framework="pt") as f:
        assert shown["changed_tensors"] == len(list(f.keys())) > 0
    assert "rank" not in shown and "target_modules" not in shown
    lora = info(read_patch(make_lora_patch(model, tmp_path / "l", fp, rank=4)))
    assert "rank" in lora and "target_modules" in lora and "changed_tensors" not in lora
    assert lora["layers"] == "all" and "layers" not in shown  # a --layers patch: test_train.py


def test_verify_checks_a_stacked_patch_on_top_of_its_stack(tiny_dir, tmp_path, capsys):
    """A user's trial: a red-team round's patch could not be verified at all (`patch verify` said
    "attach those first (or --force)", and it has no --force nor a way to give the stack)."""
    from safety_patch.cli import main
    from safety_patch.models import load_model
    from safety_patch.patches import probe_effect, read_patch

    lm = load_model(str(tiny_dir), device="cpu")
    first = make_lora_patch(lm.model, tmp_path / "r1", lm.fingerprint, seed=1)
    first_id = read_patch(first).id
    second = make_lora_patch(lm.model, tmp_path / "r2", lm.fingerprint, seed=2, stack=[first_id])
    capsys.readouterr()
    assert main(["patch", "verify", str(second), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "pass --stack FOLDER for each" in err and first_id in err and "--force" not in err
    assert main(["patch", "verify", str(second), "--model", str(tiny_dir), "--stack", str(first)]) == 0
    assert "on top of 1 patch;" in capsys.readouterr().out
    # the effect is what the patch adds to its stack, not the stack's own
    below, top = read_patch(first), read_patch(second)
    alone = probe_effect(lm.model, lm.tokenizer, [below, top], lm.fingerprint)
    added = probe_effect(lm.model, lm.tokenizer, [top], lm.fingerprint, below=[below])
    assert 0 < added != alone
    # a stack patch that does not verify fails the command (each is checked)
    other = make_lora_patch(lm.model, tmp_path / "o", "f" * 64)
    assert main(["patch", "verify", str(second), "--model", str(tiny_dir), "--stack", str(other), "--stack", str(first)]) == 2
    assert "was made for base" in capsys.readouterr().err


def test_one_adapter_is_one_patch_and_one_update_whatever_order_peft_wrote_its_targets(tiny_dir, tmp_path, monkeypatch,
                                                                                       capsys):
    """A user's trial: PEFT writes target_modules in the process's set order, so the same training run
    written twice gave two patch ids and two update keys, and the second copy attached (with --force)
    to a checkpoint that already held the first: the update applied twice."""
    import shutil

    from safety_patch.cli import main
    from safety_patch.models import load_model
    from safety_patch.patches import folder

    lm = load_model(str(tiny_dir), device="cpu")
    a = make_lora_patch(lm.model, tmp_path / "a", lm.fingerprint)
    targets = json.loads((a / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 1 and targets == sorted(targets)  # written in one order
    # the same adapter with its targets in another order, as another process's PEFT writes it
    def copy_reversed(dst, canonical):
        shutil.copytree(a, dst)
        (dst / "patch.json").unlink()
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": targets[::-1]}))
        if not canonical:  # a patch written before canonical configs
            monkeypatch.setattr(folder, "canonical_adapter_config", lambda c: c)
        finalize_patch(dst, "lora", {"name": "test", "fingerprint": lm.fingerprint}, method="lora")
        monkeypatch.undo()
        return read_patch(dst)

    assert copy_reversed(tmp_path / "b", canonical=True).id == read_patch(a).id  # one id now
    old = copy_reversed(tmp_path / "old", canonical=False)
    assert old.id != read_patch(a).id  # two ids, as before ...
    from safety_patch.patches.attach import _update_key

    assert _update_key(old) == _update_key(read_patch(a))  # ... but one update
    with pytest.raises(SafetyPatchError, match="hold the same update"):
        with attached(lm.model, [a, old], lm.fingerprint, force=True):
            pass
    assert main(["patch", "merge", "--model", str(tiny_dir), "--patch", str(a), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "m"), "--patch", str(old.path), "--force", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 2
    assert "holds the same update" in capsys.readouterr().err
    # `patch verify` of a merged patch says so, not "made for another base" (a user's trial)
    assert main(["patch", "verify", str(a), "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "is already merged into this model" in err and "was made for base" not in err

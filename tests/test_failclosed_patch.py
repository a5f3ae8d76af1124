"""Patch and gate integrity fails closed: schema, computed identity, finite weights, full loads, honest merges.

Every edit below is made *consistently* where it matters (file hashes and id recomputed), so
the test reaches the check it names instead of stopping at a hash mismatch.
"""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from safety_patch.atomic import sha256_file
from safety_patch.errors import SafetyPatchError
from safety_patch.fingerprint import fingerprint
from safety_patch.gate.probe import GATE_FILE, Gate
from safety_patch.models import LoadedModel
from safety_patch.patch_schema import binding_digest, patch_id, record_digest
from safety_patch.patches import (
    DELTA_FILE,
    attached,
    finalize_patch,
    merge_to_checkpoint,
    merged_state_dict,
    probe_effect,
    read_patch,
    stack_key,
    verify,
)
from safety_patch.testing import make_delta_patch, make_lora_patch, tiny_llama

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base():
    model, tok = tiny_llama()
    return model, tok, fingerprint(model, tok)


def meta_of(p: Path) -> dict:
    return json.loads((p / "patch.json").read_text())


def write_meta(p: Path, meta) -> None:
    (p / "patch.json").write_text(json.dumps(meta))


def reseal(p: Path) -> None:
    """Recompute files' sha256 and id in patch.json, as a careful (or malicious) editor would."""
    m = meta_of(p)
    m["files"] = {f: sha256_file(p / f) for f in m["files"]}
    m["id"] = patch_id(m["files"])
    m["binding"] = binding_digest(m["format"], m["base"]["fingerprint"], m["stack"], "gate" in m, m["files"])
    if "record_sha256" in m:
        m["record_sha256"] = record_digest(m)
    write_meta(p, m)


def edit_tensors(p: Path, name: str, fn) -> None:
    t = dict(load_file(str(p / name)))
    t = fn(t) or t
    save_file(t, str(p / name), metadata={"format": "pt"})
    reseal(p)


def gated_patch(model, path: Path, fp: str, **gate_kw) -> Path:
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    kw = dict(layer=1, threshold=0.0, weight=torch.randn(hidden, generator=g), bias=0.0,
              mean=torch.zeros(hidden), std=torch.ones(hidden)) | gate_kw
    make_lora_patch(model, path, fp)
    Gate(**kw).save(path)
    finalize_patch(path, "lora", {"name": "test", "fingerprint": fp}, method="lora",
                   gate={"layer": kw["layer"], "threshold": kw["threshold"]})
    return path


# ----------------------------------------------------------------------------- patch.json schema


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["config"]["lora"].__setitem__("rank", 8), "field 'record_sha256' does not match"),
    (lambda m: m.__setitem__("method", "full"), "field 'record_sha256' does not match"),
    (lambda m: m["base"].__setitem__("name", "HuggingFaceTB/SmolLM2-1.7B"), "field 'record_sha256' does not match"),
    (lambda m: m["gate"]["validation"]["fired"]["harmful_direct"].__setitem__("value", 1.0),
     "field 'record_sha256' does not match"),
])
def test_a_descriptive_field_edited_by_hand_is_refused(base, tmp_path, edit, says, capsys):
    """Found by a user's trial: a rank, a method, a base name or a gate validation rate edited in
    patch.json passed `patch verify` and `patch info` showed the false value. The record is sealed
    (record_sha256); a patch from before the seal still reads, and `patch info` says it is not sealed,
    while its method and LoRA rank and alpha are still checked against the bound files."""
    from safety_patch.cli import main

    model, tok, fp = base
    p = gated_patch(model, tmp_path / "p", fp)
    m = meta_of(p)
    m["config"] = {"lora": {"rank": 4, "alpha": 8.0}}  # make_lora_patch's adapter
    m["gate"]["validation"] = {"fired": {"harmful_direct": {"value": 0.9, "k": 9, "n": 10}}}
    m["base"]["name"] = "tiny"
    m["record_sha256"] = record_digest(m)  # as `train` writes them
    write_meta(p, m)
    assert read_patch(p).sealed
    assert main(["patch", "info", str(p)]) == 0 and "record                sealed" in capsys.readouterr().out
    edit(m)
    write_meta(p, m)
    with pytest.raises(SafetyPatchError, match=says):
        read_patch(p)
    m.pop("record_sha256")  # an older patch: read, and said to be unsealed
    write_meta(p, m)
    if m["method"] == "full":
        with pytest.raises(SafetyPatchError, match="field 'method' is 'full', but the patch's format is 'lora'"):
            read_patch(p)
    elif m["config"]["lora"]["rank"] == 8:
        with pytest.raises(SafetyPatchError, match=r"field 'config.lora.rank' is 8, but adapter_config.json holds 4"):
            read_patch(p)
    else:
        assert not read_patch(p).sealed
        assert main(["patch", "info", str(p)]) == 0 and "not sealed (written before" in capsys.readouterr().out


SCHEMA_EDITS = {
    "base_str": (lambda m: m.__setitem__("base", "tinyA"), "field 'base'"),
    "fp_int": (lambda m: m["base"].__setitem__("fingerprint", 12345), "field 'base.fingerprint'"),
    "fp_empty": (lambda m: m["base"].__setitem__("fingerprint", ""), "field 'base.fingerprint'"),
    "no_fp": (lambda m: m["base"].pop("fingerprint"), "missing required field 'base.fingerprint'"),
    "no_base": (lambda m: m.pop("base"), "missing required field 'base'"),
    "files_list": (lambda m: m.__setitem__("files", [ADAPTER]), "field 'files'"),
    "no_files": (lambda m: m.pop("files"), "missing required field 'files'"),
    "files_short": (lambda m: m["files"].pop(ADAPTER), f"'{ADAPTER}' is missing"),
    "id_int": (lambda m: m.__setitem__("id", 5), "field 'id'"),
    "no_id": (lambda m: m.pop("id"), "missing required field 'id'"),
    "stack_str": (lambda m: m.__setitem__("stack", "abc"), "field 'stack'"),
    "stack_not_ids": (lambda m: m.__setitem__("stack", ["a", "b"]), r"field 'stack\[0\]'"),
    "no_stack": (lambda m: m.pop("stack"), "missing required field 'stack'"),
    "kind": (lambda m: m.__setitem__("kind", "other"), "field 'kind'"),
    "format": (lambda m: m.__setitem__("format", "full"), "field 'format'"),
    "training_list": (lambda m: m.__setitem__("training", [1]), "field 'training'"),
    "no_binding": (lambda m: m.pop("binding"), "missing required field 'binding'"),
    "stack_emptied": (lambda m: m.__setitem__("stack", []), "field 'binding' does not match"),
    "other_fp": (lambda m: m["base"].__setitem__("fingerprint", "f" * 64), "field 'binding' does not match"),
}


@pytest.mark.parametrize("edit", sorted(SCHEMA_EDITS))
def test_patch_json_schema_violations_are_one_error_naming_the_field(base, tmp_path, edit):
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp, stack=["0" * 16])
    read_patch(p)
    fn, message = SCHEMA_EDITS[edit]
    m = meta_of(p)
    fn(m)
    write_meta(p, m)
    with pytest.raises(SafetyPatchError, match=message.replace("(", r"\(")):
        read_patch(p)


@pytest.mark.parametrize("key", ["\n", "", "a.b\tc", "x'y"])
def test_a_field_named_by_an_odd_key_is_one_line_that_names_it(base, tmp_path, key):
    """A key with a newline, tab, quote or nothing in it is shown JSON-quoted: the error stays one
    line (hypothesis found files {"\\n": null} printing a newline inside the field's name)."""
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp)
    m = meta_of(p)
    m["files"] = {key: None}
    write_meta(p, m)
    with pytest.raises(SafetyPatchError) as e:
        read_patch(p)
    assert "\n" not in str(e.value) and f"field 'files[{json.dumps(key)}]' is invalid" in str(e.value)


@given(st.lists(st.one_of(st.text(max_size=8), st.integers(0, 99)), max_size=5))
def test_field_path_is_one_printable_line_and_plain_names_stay_plain(loc):
    from safety_patch.errors import field_path

    out = field_path(loc)
    assert out.isprintable()
    if all(isinstance(x, str) and x.isidentifier() for x in loc):
        assert out == ".".join(loc)


def test_patch_json_not_an_object_or_not_json(base, tmp_path):
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp)
    (p / "patch.json").write_text("[1, 2, 3]")
    with pytest.raises(SafetyPatchError, match="must hold a JSON object, not a list"):
        read_patch(p)
    (p / "patch.json").write_text('{"kind": ')
    with pytest.raises(SafetyPatchError, match="invalid JSON at line 1"):
        read_patch(p)


def test_gate_file_without_gate_field_is_refused_not_ignored(base, tmp_path):
    model, tok, fp = base
    p = gated_patch(model, tmp_path / "g", fp)
    assert read_patch(p).gated
    m = meta_of(p)
    m.pop("gate")
    m["files"].pop(GATE_FILE)
    m["id"] = patch_id(m["files"])  # everything else consistent: a gated patch passed off as always-on
    m["binding"] = binding_digest("lora", fp, [], False, m["files"])
    write_meta(p, m)
    with pytest.raises(SafetyPatchError, match="holds gate.safetensors but patch.json has no 'gate'"):
        read_patch(p)
    with pytest.raises(SafetyPatchError):
        merged_state_dict(model, [p], fp)


def test_gate_field_must_agree_with_the_gate_file(base, tmp_path):
    model, tok, fp = base
    p = gated_patch(model, tmp_path / "g", fp)
    m = meta_of(p)
    m["gate"]["layer"] = 0
    write_meta(p, m)
    with pytest.raises(SafetyPatchError, match="field 'gate' says layer 0"):
        read_patch(p)


# ----------------------------------------------------------------------------- identity


def test_patch_id_is_computed_from_the_files_never_read_from_patch_json(base, tmp_path):
    model, tok, fp = base
    a = make_lora_patch(model, tmp_path / "a", fp)
    pa = read_patch(a)
    assert pa.id == meta_of(a)["id"] == patch_id({f: sha256_file(a / f) for f in meta_of(a)["files"]})
    # SEC_cache_stale_patch_id: changed weights under a copied patch.json never get the original's id
    b = tmp_path / "b"
    shutil.copytree(a, b)
    edit_tensors(b, ADAPTER, lambda t: {k: v + 1.0 for k, v in t.items()})
    pb = read_patch(b)
    assert pb.id != pa.id and stack_key([pb]) != stack_key([pa])
    shutil.copy(a / "patch.json", b / "patch.json")  # the original's metadata on the changed weights
    with pytest.raises(SafetyPatchError, match="sha256 differs"):
        read_patch(b)
    # a recorded id that disagrees with the files is an error, even when it is another valid id
    m = meta_of(a)
    m["id"] = pb.id
    write_meta(a, m)
    with pytest.raises(SafetyPatchError, match=f"field 'id' is {pb.id}, but the patch's files hash to id {pa.id}"):
        read_patch(a)


def test_stack_refers_to_computed_ids(base, tmp_path):
    model, tok, fp = base
    first = read_patch(make_lora_patch(model, tmp_path / "r1", fp, seed=1))
    second = read_patch(make_lora_patch(model, tmp_path / "r2", fp, seed=2, stack=[first.id]))
    with attached(model, [first, second], fp):
        pass
    with pytest.raises(SafetyPatchError, match="trained on top of"):
        with attached(model, [second], fp):
            pass


# ----------------------------------------------------------------------------- non-finite and degenerate weights


def test_non_finite_or_all_zero_weights_are_refused_at_write_and_at_read(base, tmp_path):
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "nan", fp)
    edit_tensors(p, ADAPTER, lambda t: {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in t.items()})
    with pytest.raises(SafetyPatchError, match="lora_B.weight holds non-finite values"):
        read_patch(p)
    with pytest.raises(SafetyPatchError, match="non-finite"):  # write time
        finalize_patch(p, "lora", {"name": "test", "fingerprint": fp})
    assert not (p / "patch.json").exists()  # the refused folder is not left looking like a patch
    z = make_lora_patch(model, tmp_path / "zero", fp)
    edit_tensors(z, ADAPTER, lambda t: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in t.items()})
    with pytest.raises(SafetyPatchError, match="every lora_B tensor is zero"):
        read_patch(z)
    d = make_delta_patch(model, tmp_path / "d", fp)
    edit_tensors(d, DELTA_FILE, lambda t: {k: torch.zeros_like(v) for k, v in t.items()})
    with pytest.raises(SafetyPatchError, match="every tensor is zero"):
        read_patch(d)
    edit_tensors(d, DELTA_FILE, lambda t: {k: torch.full_like(v, float("inf")) for k, v in t.items()})
    with pytest.raises(SafetyPatchError, match="non-finite"):
        read_patch(d)


@pytest.mark.parametrize("bad,message", [
    ({"threshold": float("nan")}, "threshold is nan"),
    ({"bias": float("inf")}, "bias is inf"),
    ({"weight": torch.full((32,), float("nan"))}, "weight holds non-finite"),
    ({"std": torch.zeros(32)}, "std has entries <= 0"),
    ({"mean": torch.full((32,), float("nan"))}, "mean holds non-finite"),
    ({"weight": torch.zeros(32)}, "weight is all zeros"),
    ({"weight": torch.ones(16)}, "vectors of one length"),
])
def test_a_gate_that_cannot_decide_is_refused_at_save_and_at_load(base, tmp_path, bad, message):
    model, tok, fp = base
    with pytest.raises(SafetyPatchError, match=message):
        gated_patch(model, tmp_path / "w", fp, **bad)  # write time: Gate.save
    p = gated_patch(model, tmp_path / "g", fp)
    good = dict(load_file(str(p / GATE_FILE)))
    edit_tensors(p, GATE_FILE, lambda t: t | {k: (torch.tensor([v]) if isinstance(v, float) else v) for k, v in bad.items()})
    with pytest.raises(SafetyPatchError, match=message):
        read_patch(p)  # load time
    edit_tensors(p, GATE_FILE, lambda t: good)
    read_patch(p)


def test_gate_file_shape_problems_are_one_line(base, tmp_path):
    model, tok, fp = base
    p = gated_patch(model, tmp_path / "g", fp)
    edit_tensors(p, GATE_FILE, lambda t: t | {"layer": torch.zeros(0, dtype=torch.int64)})  # G_gate_empty_layer
    with pytest.raises(SafetyPatchError, match="tensor 'layer' must be a vector of one or more layers"):
        read_patch(p)
    edit_tensors(p, GATE_FILE, lambda t: t | {"layer": torch.tensor([1.0])})
    with pytest.raises(SafetyPatchError, match="tensor 'layer' must be an integer"):
        read_patch(p)
    edit_tensors(p, GATE_FILE, lambda t: {k: v for k, v in t.items() if k != "std"})
    with pytest.raises(SafetyPatchError, match="missing tensor 'std'"):
        read_patch(p)


def test_gate_of_another_hidden_size_is_refused_at_verify(base, tmp_path):
    model, tok, fp = base
    p = gated_patch(model, tmp_path / "g", fp)  # G_gate_wrong_len, with a usable (nonzero) weight
    good = dict(load_file(str(p / GATE_FILE)))
    edit_tensors(p, GATE_FILE, lambda t: t | {"weight": torch.ones(16), "mean": torch.zeros(16), "std": torch.ones(16)})
    m = meta_of(p)
    with pytest.raises(SafetyPatchError, match="vectors have length 16, the model's hidden size is 32"):
        verify(read_patch(p), model, fp)
    m["gate"]["layer"] = 5
    write_meta(p, m)
    edit_tensors(p, GATE_FILE, lambda t: good | {"layer": torch.tensor([5])})
    with pytest.raises(SafetyPatchError, match="layer 5 out of range"):
        verify(read_patch(p), model, fp)


def test_gate_scores_fail_closed_on_non_finite_states():
    g = Gate(0, 0.0, torch.ones(4), 0.0, torch.zeros(4), torch.ones(4))
    h = torch.zeros(3, 4)
    assert g.fires(h).tolist() == [False, False, False]
    h[1, 2] = float("nan")
    with pytest.raises(SafetyPatchError, match="probe score of prompt 1 is nan"):
        g.fires(h)
    with pytest.raises(SafetyPatchError, match="gate's vectors have length 4"):
        g.fires(torch.zeros(2, 8))


# ----------------------------------------------------------------------------- every tensor loads


def test_adapter_whose_tensors_match_no_module_is_refused(base, tmp_path):
    """cases/02: tensors under model.decoder.layers.* load nowhere; PEFT only warns."""
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp)
    edit_tensors(p, ADAPTER, lambda t: {k.replace("model.layers.", "model.decoder.layers."): v for k, v in t.items()})
    patch = read_patch(p)  # internally consistent
    with pytest.raises(SafetyPatchError, match=r"tensor base_model\.model\.model\.decoder\.layers\..* matches no module"):
        verify(patch, model, fp)
    with pytest.raises(SafetyPatchError, match="matches no module"):
        with attached(model, [patch], fp):
            pass
    assert all("lora" not in n for n, _ in model.named_modules())


def test_adapter_missing_tensors_for_targeted_modules_is_refused_at_attach(base, tmp_path):
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp)  # all-linear
    edit_tensors(p, ADAPTER, lambda t: {k: v for k, v in t.items() if ".layers.1." not in k})
    patch = read_patch(p)
    verify(patch, model, fp)  # every tensor present fits a module
    with pytest.raises(SafetyPatchError, match=r"inject base_model\.model\.model\.layers\.1\..*which the file does not hold"):
        with attached(model, [patch], fp):
            pass
    with pytest.raises(SafetyPatchError, match="does not hold"):
        probe_effect(model, tok, [patch], fp)
    assert all("lora" not in n for n, _ in model.named_modules())
    full = read_patch(make_lora_patch(model, tmp_path / "full", fp))
    assert probe_effect(model, tok, [full], fp) > 0


def test_adapter_config_invalid_or_rank_mismatch(base, tmp_path):
    model, tok, fp = base
    p = make_lora_patch(model, tmp_path / "p", fp)
    good = (p / "adapter_config.json").read_text()
    (p / "adapter_config.json").write_text("{bad")
    reseal(p)
    with pytest.raises(SafetyPatchError, match=r"adapter_config.json: invalid JSON at line 1"):
        read_patch(p)
    cfg = json.loads(good)
    for field, value, message in [("r", 2, "gives rank 2"), ("r", "4", "field 'r'"), ("r", 0, "positive rank"),
                                  ("peft_type", "IA3", "field 'peft_type'"), ("target_modules", 5, "field 'target_modules'"),
                                  ("use_dora", True, "DoRA")]:
        (p / "adapter_config.json").write_text(json.dumps(cfg | {field: value}))
        reseal(p)
        with pytest.raises(SafetyPatchError, match=message):
            read_patch(p)


def test_force_waives_the_fingerprint_never_the_shapes(base, tmp_path):
    """X04/X06: a LoRA made for another hidden size is refused for its base (unforced) and, forced, gets
    one shape error: --force waives the fingerprint, never the shapes."""
    model, tok, fp = base
    other, otok = tiny_llama(hidden=64)
    p = read_patch(make_lora_patch(other, tmp_path / "h64", fingerprint(other, otok)))
    for force, says in ((False, r"was made for base .*; pass --force to attach anyway"),
                        (True, r"has shape \(4, 128\), the model needs \(4, 64\)")):
        with pytest.raises(SafetyPatchError, match=says):
            with attached(model, [p], fp, force=force):
                pass
    assert all("lora" not in n for n, _ in model.named_modules())


# ----------------------------------------------------------------------------- honest merges


def test_merge_refuses_a_lora_on_a_tied_lm_head(tmp_path):
    """cases/01: folding an lm_head LoRA into a tied weight would change the input embeddings too."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama(tie=True)
    lm = LoadedModel.from_objects(model, tok)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with torch.no_grad():
        for n, prm in peft_model.named_parameters():
            if "lora_" in n:
                prm.normal_(0, 0.5)
    p = tmp_path / "p"
    peft_model.save_pretrained(str(p), save_embedding_layers=False)  # LoRA factors only
    finalize_patch(p, "lora", {"name": "test", "fingerprint": lm.fingerprint})
    with attached(model, [p], lm.fingerprint):  # attaching is fine: the LoRA sits on lm_head only
        pass
    from safety_patch.patches import tied_targets

    # what `patch verify` notes beside its OK (the patch attaches; merge will refuse it)
    assert [(n, s) for _, n, s in tied_targets(model, [read_patch(p)])] == [("lm_head", "model.embed_tokens.weight")]
    untied = make_lora_patch(model, tmp_path / "plain", lm.fingerprint)
    assert tied_targets(model, [read_patch(untied)]) == []
    with pytest.raises(SafetyPatchError, match="shared with model.embed_tokens.weight"):
        merged_state_dict(model, [read_patch(p)], lm.fingerprint)
    with pytest.raises(SafetyPatchError, match="tied"):
        merge_to_checkpoint(lm, [p], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # the same patch saved the PEFT default way carries a full lm_head copy: refused at write time
    q = tmp_path / "q"
    peft_model.save_pretrained(str(q))
    with pytest.raises(SafetyPatchError, match="full copy of a base weight"):
        finalize_patch(q, "lora", {"name": "test", "fingerprint": lm.fingerprint})


def test_merge_checks_merged_against_attached_before_writing(base, tmp_path, monkeypatch):
    import safety_patch.patches.merge as patches  # merge_to_checkpoint calls merged_state_dict there

    model, tok, fp = base
    lm = LoadedModel.from_objects(model, tok)
    p = make_lora_patch(model, tmp_path / "p", lm.fingerprint)
    real = patches.merged_state_dict

    def wrong(*a, **k):  # a merge that folds in only half of the update
        sd = real(*a, **k)
        base_sd = model.state_dict()
        return {n: (v + base_sd[n]) / 2 for n, v in sd.items()}

    monkeypatch.setattr(patches, "merged_state_dict", wrong)
    with pytest.raises(SafetyPatchError, match="merged weights do not reproduce the attached"):
        merge_to_checkpoint(lm, [p], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    monkeypatch.setattr(patches, "merged_state_dict", real)
    merge_to_checkpoint(lm, [p], tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


def test_cli_verify_reports_the_effect_and_refuses_a_no_op(tiny_dir, tmp_path, capsys):
    from safety_patch.cli import main
    from safety_patch.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    p = make_lora_patch(lm.model, tmp_path / "p", lm.fingerprint)
    assert main(["patch", "verify", str(p), "--model", str(tiny_dir)]) == 0
    assert "all adapter tensors loaded; changes logits by up to" in capsys.readouterr().out
    edit_tensors(p, ADAPTER, lambda t: {k.replace("model.layers.", "model.decoder.layers."): v for k, v in t.items()})
    assert main(["patch", "verify", str(p), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "matches no module" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- property: random edits of patch.json


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=4)
                        | st.sampled_from(["", "lora", "delta", "0" * 16, "0" * 64]),
                        lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                        max_leaves=4)


def _paths(meta, prefix=()):
    yield prefix
    if isinstance(meta, dict):
        for k, v in meta.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(meta, list):
        for i, v in enumerate(meta):
            yield from _paths(v, prefix + (i,))


def _apply(meta, path, op, value):
    if not path:
        return value if op == "set" else meta
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return meta


@pytest.fixture(scope="module")
def originals(base, tmp_path_factory):
    model, tok, fp = base
    root = tmp_path_factory.mktemp("orig")
    lora = make_lora_patch(model, root / "lora", fp)
    stacked = make_lora_patch(model, root / "stacked", fp, seed=3, stack=[read_patch(lora).id])
    gated = gated_patch(model, root / "gated", fp)
    delta = make_delta_patch(model, root / "delta", fp, every=5)
    return {k: (p, read_patch(p)) for k, p in
            {"lora": lora, "stacked": stacked, "gated": gated, "delta": delta}.items()}


def _meaning(p):
    return p.format, p.gated, p.id, p.base_fingerprint, tuple(p.stack)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_patch_json_edits_fail_closed(base, originals, data):
    model, tok, fp = base
    kind = data.draw(st.sampled_from(sorted(originals)))
    src, orig = originals[kind]
    meta = meta_of(src)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(meta))))
        op = data.draw(st.sampled_from(["delete", "set"] if path else ["set"]))
        meta = _apply(meta, path, op, data.draw(_json_values()))
    work = Path(tempfile.mkdtemp(prefix="fc-"))
    try:
        shutil.copytree(src, work / "p")
        (work / "p" / "patch.json").write_text(json.dumps(meta))
        try:
            p = read_patch(work / "p")
        except SafetyPatchError as e:
            assert "\n" not in str(e)
            return
        # accepted: what the tooling acts on (format, gating, identity, base binding, prerequisites) is unchanged
        assert _meaning(p) == _meaning(orig)
        verify(p, model, fp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_cli_verify_against_another_base_suggests_no_flag_it_lacks(tiny_dir, tmp_path, capsys):
    """Found by a user's trial: `patch verify P --model B` said "pass --force to attach anyway", and
    `patch verify --force` is "No such option"."""
    from safety_patch.cli import main
    from safety_patch.models import load_model
    from safety_patch.testing import save_tiny_model

    lm = load_model(str(tiny_dir), device="cpu")
    p = make_lora_patch(lm.model, tmp_path / "p", lm.fingerprint)
    other = save_tiny_model(tmp_path / "other", seed=5)
    assert main(["patch", "verify", str(p), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was made for base" in err and "`patch verify` has no --force" in err and "pass --force" not in err, err

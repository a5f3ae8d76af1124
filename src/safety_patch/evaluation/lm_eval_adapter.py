"""lm-evaluation-harness on the already-patched model object (``HFLM(pretrained=model)``).

For users with hub access: lm-eval downloads each task's dataset. Offline, the error names
the dataset that could not be fetched.
"""

from __future__ import annotations

from ..errors import SafetyPatchError


def _run(model, tokenizer, tasks, limit, batch_size) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SafetyPatchError("lm-eval is not installed: pip install 'safety-patch[lm-eval]'") from None
    hflm = _exact_boundary(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=hflm, tasks=tasks, limit=limit)
    except Exception as e:  # datasets raises ConnectionError / DatasetNotFoundError / OSError offline
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SafetyPatchError(f"lm-eval could not run {', '.join(tasks)}: could not fetch a dataset ({msg[:200]})") from None
    return out["results"]


def _exact_boundary(hflm_class):
    """HFLM whose context/continuation split scores exactly the continuation's tokens.

    lm-eval's own ``_encode_pair`` tokenizes context + continuation together and cuts at the
    length of the context's ids without checking that those ids are a prefix: when the boundary
    merges, a context token is scored as part of the answer (or an answer token dropped).
    ``continuation_ids`` checks the prefix and tokenizes the continuation alone otherwise."""
    from .capability import continuation_ids

    class ExactBoundaryHFLM(hflm_class):
        def _encode_pair(self, context, continuation):
            return continuation_ids(self.tok_encode, context, continuation, move_space=True)

    return ExactBoundaryHFLM


def evaluate_lm_eval(model: str, patches: list, tasks: list[str], limit, batch_size, device="auto", dtype="auto", force=False) -> dict:
    from ..models import load_model
    from ..patches import attached, read_patch
    from .safety import provenance

    ps = [read_patch(p) for p in patches]
    gated = [str(p.path) for p in ps if p.gated]
    if gated:
        # lm-eval batches context + continuation without telling the model where the prompt
        # ends, so the gate cannot be read where it was trained; scoring ungated would report
        # the raw adapter as if it were the patch.
        raise SafetyPatchError(f"{gated[0]} is a gated patch; lm-eval cannot apply its gate per prompt. "
                               "Use `eval capability`, which applies the gate")
    lm = load_model(model, device=device, dtype=dtype)
    runs = {"base": _run(lm.model, lm.tokenizer, tasks, limit, batch_size)}
    if ps:
        # Ungated stacks only (refused above): the PEFT module is the patched model for every prompt.
        with attached(lm.model, ps, lm.fingerprint, force) as pm:
            runs["patched"] = _run(pm.module, lm.tokenizer, tasks, limit, batch_size)
    return {"kind": "safety-patch/eval-lm-eval", "schema": 1, "tasks": tasks, "provenance": provenance(lm, ps), "runs": runs}


def table(res: dict) -> str:
    lines = []
    for name, results in res["runs"].items():
        for task, metrics in results.items():
            vals = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            lines.append(f"[{name}] {task}: {vals}")
    return "\n".join(lines)

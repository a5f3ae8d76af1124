"""Continuous batching (``decoding.greedy_queue``): waiting prompts join a running batch as rows
leave it, and every answer is still ``generate``'s, token for token, on tiny models."""

from __future__ import annotations

import pytest
import torch

from safety_patch import prompt_pass
from safety_patch.decoding import CROP_MIN, greedy_queue
from safety_patch.patches import attached
from safety_patch.prompt_pass import left_padded
from test_patched import _gated_patch, _hf_greedy, _ids, _lively, _mixed_lengths, _stop_token


class _Forwards:
    """Every forward of ``module``: (rows, positions read, attention mask width), in order."""

    def __init__(self, module):
        self.calls: list[tuple[int, int, int]] = []
        self._h = module.register_forward_pre_hook(
            lambda _m, _a, kw: self.calls.append((*kw["input_ids"].shape, kw["attention_mask"].shape[1])),
            with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(rows, mask width) of each decode step (one position read)."""
        return [(r, w) for r, p, w in self.calls if p == 1]


def _reference(model, prompts, pad, steps, **extra):
    """(generate's answers to all prompts in one padded batch, an EOS id some rows emit early)."""
    ids, mask = left_padded(prompts, pad)
    with torch.no_grad():
        free = _hf_greedy(model, ids, mask, steps, [10**6], **extra)  # an id never emitted: every row runs on
        eos = _stop_token(free)
        return _hf_greedy(model, ids, mask, steps, [eos], **extra), eos


@pytest.mark.parametrize("refill", [1, 2])
def test_waiting_prompts_join_a_running_batch_and_every_answer_is_generates(refill, monkeypatch):
    model, tok = _lively()
    prompts = _mixed_lengths(tok) + _ids(tok)
    ref, eos = _reference(model, prompts, tok.pad_token_id, 12)
    joins: list[tuple[int, int]] = []  # (rows running, rows joining)
    join = prompt_pass.join
    monkeypatch.setattr(prompt_pass, "join", lambda c, m, c2, m2, room: joins.append((len(m), len(m2))) or
                        join(c, m, c2, m2, room))
    done: list[int] = []
    with _Forwards(model) as f:
        ours = greedy_queue(model, prompts, tok.pad_token_id, 3, 12, {eos}, on_done=done.append, refill=refill)
    assert ours == ref
    assert sorted(done) == list(range(len(prompts)))  # each prompt reported once, when it finished
    assert max(r for r, _ in f.steps) <= 3  # never more rows than asked
    assert joins and all(a > 0 and b >= refill and a + b <= 3 for a, b in joins)  # joined rows still running
    assert sum(r for r, _ in f.steps) == sum(len(a) for a in ours) - len(ours)  # each row costs its own length


def test_columns_no_running_row_reads_are_dropped_and_answers_unchanged():
    """Long prompts that leave after one token take the columns only they read with them: the
    decode steps attend over the short prompts' width (plus the tokens decoded)."""
    model, tok = _lively()
    prompts = _mixed_lengths(tok, n_long=2, n_short=3)
    ref, eos = _reference(model, prompts, tok.pad_token_id, 8)
    budgets = [1, 1, 8, 8, 8]
    with _Forwards(model) as f:
        ours = greedy_queue(model, prompts, tok.pad_token_id, 5, budgets, {eos})
    assert ours == [r[:b] for r, b in zip(ref, budgets, strict=True)]
    long_w, short_w = max(map(len, prompts[:2])), max(map(len, prompts[2:]))
    assert long_w - short_w >= CROP_MIN  # the case under test
    # the long rows left with their first token, before any decode step: the steps attend over the
    # short rows' columns (a step without the crop: long_w + 1)
    assert [w for _, w in f.steps][:2] == [short_w + 1, short_w + 2]


@pytest.mark.parametrize("share", [False, True])
def test_joined_rows_keep_their_adapter_in_a_mixed_batch(tmp_path, monkeypatch, share):
    """Rows routed to the adapter and to the base join a running mixed batch and keep their
    adapter: each answer is generate's for the whole batch with the same per-row adapters."""
    if not share:
        monkeypatch.setattr(prompt_pass, "SHARED_PREFIX_MIN", 1 << 30)
    model, tok = _lively()
    p, _ = _gated_patch(model, tok, tmp_path / "g")
    prompts = _mixed_lengths(tok) + _ids(tok)
    with attached(model, [p], "fp") as pm:
        names = pm.adapter_names(pm.routes(tok, prompts))
        names[0], names[-1] = "patch0", "__base__"  # both routes among the long and the short prompts
        assert "__base__" in names and "patch0" in names
        with pm.mixed() as m:
            ref, eos = _reference(m, prompts, tok.pad_token_id, 10, adapter_names=names)
            passes: list[list[str]] = []
            h = m.register_forward_pre_hook(
                lambda _m, _a, kw: passes.append(list(kw.get("adapter_names") or [])), with_kwargs=True)
            try:
                ours = greedy_queue(m, prompts, tok.pad_token_id, 4, 10, {eos}, names, refill=1)
            finally:
                h.remove()
    assert ours == ref
    assert all(passes)  # every forward, prompt pass or decode step, named each row's adapter


def test_a_cache_that_cannot_be_joined_runs_fixed_batches(monkeypatch):
    """A model whose KV cache is not a grown-in-place full-attention cache (sliding windows) takes
    the next prompts only once the running batch is empty; the answers are the same."""
    model, tok = _lively()
    prompts = _mixed_lengths(tok) + _ids(tok)
    ref, eos = _reference(model, prompts, tok.pad_token_id, 10)
    monkeypatch.setattr(prompt_pass, "joinable", lambda cache: False)
    monkeypatch.setattr(prompt_pass, "join", lambda *a: pytest.fail("joined a cache that cannot be joined"))
    with _Forwards(model) as f:
        ours = greedy_queue(model, prompts, tok.pad_token_id, 3, 10, {eos}, refill=1)
    assert ours == ref
    assert max(r for r, _ in f.steps) <= 3


def test_bad_arguments_are_one_clear_error():
    model, tok = _lively()
    prompts = _ids(tok)
    with pytest.raises(ValueError, match="budgets"):
        greedy_queue(model, prompts, 0, 2, [3], {1})
    with pytest.raises(ValueError, match="adapter names"):
        greedy_queue(model, prompts, 0, 2, 3, {1}, ["a"])
    with pytest.raises(ValueError, match="max_rows"):
        greedy_queue(model, prompts, 0, 0, 3, {1})

"""The prompt pass of a left-padded batch and the KV cache it leaves for decoding: rows in
groups of similar length (:func:`length_groups`), tokens that rows share read once
(:func:`shared_prefix_length`, :func:`prefill`), a cache that grows in place
(``GrowingLayer``, :func:`growing_cache`), and the batch's padding (:func:`left_padded`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

PREFILL_PASS_COST = 64
"""What one more forward pass costs, in prompt positions, when :func:`length_groups` weighs
splitting a batch (the fixed per-pass work: kernel launches, Python, the layers' small ops). A
chosen round figure, not a tuned one: where prompt lengths differ by hundreds of tokens, as
jailbreak templates beside direct requests do, the cuts hardly depend on it."""


def length_groups(lengths: Sequence[int], max_rows: int, pass_cost: int = PREFILL_PASS_COST) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches for left-padded forward passes, longest first:
    [[i, ...], ...], every index once, at most ``max_rows`` per batch.

    A padded batch computes (rows x its longest length) positions; an evaluation batch that mixes
    550-token jailbreak prompts with 40-token direct requests computes three times the positions it
    needs (bench/generation_speed.py). The cut points minimise the total positions plus
    ``pass_cost`` per pass, by dynamic programming over the sorted lengths (O(n x max_rows)).
    Raises ValueError for ``max_rows`` < 1."""
    if max_rows < 1:
        raise ValueError(f"length_groups: max_rows must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: cost of the j longest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):  # rows i..j-1 share a pass padded to the longest, lengths[order[i]]
            c = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


SHARED_PREFIX_MIN = 16
"""The fewest tokens every prompt of a batch must start with before :func:`prefill` reads them
once for the batch: below that a pass of its own costs about what it saves (``PREFILL_PASS_COST``)."""


def shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many tokens every row of a left-padded batch (``ids``/``mask`` [n, width]) starts with,
    leaving each row at least one token of its own (the prompt pass needs each row's last logits).
    The chat template's system turn (24 tokens on the embedded model) is such a prefix in every
    batch; prompts in one jailbreak template share the template's opening too."""
    lengths = mask.sum(-1).tolist()
    width = ids.shape[1]
    rows = [ids[r, width - n:] for r, n in enumerate(lengths)]
    most = min(lengths) - 1
    if most <= 0 or len(rows) < 2:
        return 0
    same = torch.stack([r[:most] for r in rows]).eq(rows[0][:most]).all(0)
    return int(most if bool(same.all()) else int(same.long().argmin()))


def prefill(module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, adapter_names: Sequence[str] | None = None,
            room: int = 0):
    """The prompt pass of :func:`greedy`: (a ``DynamicCache`` holding every layer's keys and values
    [n, kv heads, width, head dim], the last position's logits [n, vocab]).

    Rows of a left-padded batch whose lengths differ widely are passed in groups
    (:func:`length_groups`), each only as wide as its longest prompt, and their keys and values are
    padded back to the batch's width on the left, where the attention mask hides them. Tokens that
    several rows share are read once, in a pass of one row per adapter the batch routes to (an
    adapter changes the keys and values): the batch's common start where every row has the same
    ``SHARED_PREFIX_MIN`` or more tokens (:func:`shared_prefix_length`: the chat template's system
    turn), then an opening of that many or more tokens that several rows share after it (a
    jailbreak or rule template around different requests); each row's own tokens are passed on
    top of its shared ones, and the keys and values are put back in the batch's left-padded
    layout, so ``mask`` still describes the cache. Either way
    the decode steps see the keys and values one padded pass would have left, up to float rounding
    (bench/generation_speed.py compares the answers with the unshared pass's: ``--decoders
    pruned,unshared``). Models whose cache has other than plain full-attention layers (sliding
    windows, linear attention) take one pass. Raises SafetyPatchError where the model did not fill
    the cache it was handed (a transformers that names the argument otherwise: decoding on would
    ignore the prompt)."""
    from transformers import DynamicCache

    from .errors import SafetyPatchError

    kv = cache_argument(module)
    n, width = ids.shape
    cache = DynamicCache(config=module.config)
    plain = _plain(cache)

    def one_pass(rows, cols, into, inputs=None, names=None):
        """Rows ``rows`` of the batch (or of ``inputs``: ids, mask, positions) from column ``cols`` on
        into the cache ``into``; ``names``: their adapters where not the rows' own."""
        ids_, mask_, pos_ = inputs if inputs is not None else (ids[:, cols:], mask[:, cols:], pos[:, cols:])
        if names is None and adapter_names is not None:
            names = [adapter_names[r] for r in rows]
        extra = {"adapter_names": names} if names is not None else {}
        k = torch.tensor(rows, device=ids.device)
        before = into.get_seq_length()
        out = module(input_ids=ids_[k], attention_mask=mask_[k], position_ids=pos_[k], use_cache=True,
                     logits_to_keep=1, **{kv: into}, **extra)
        if into.get_seq_length() != before + ids_.shape[1]:  # a transformers that ignored `cache=` would decode without context
            raise SafetyPatchError(f"generation: the model did not fill the KV cache it was given ({into.get_seq_length()} "
                                   f"of {before + ids_.shape[1]} positions, passed as `{kv}=`); "
                                   "this model's forward names it differently")
        return out.logits[:, -1, :]

    if not plain:
        return cache, one_pass(list(range(n)), 0, cache)
    if (done := _prefill_shared(module, ids, mask, adapter_names, room, one_pass)) is not None:
        return done
    lengths = mask.sum(-1).tolist()
    groups = length_groups(lengths, n)
    if len(groups) == 1:
        logits = one_pass(list(range(n)), 0, cache)
        for li, layer in enumerate(cache.layers):
            cache.layers[li] = _growing_layer()(layer.keys, layer.values, room)
        return cache, logits
    keys: list[list] = [[None] * n for _ in cache.layers]
    values: list[list] = [[None] * n for _ in cache.layers]
    logits = [None] * n
    for rows in groups:
        wide = max(lengths[r] for r in rows)
        sub = DynamicCache(config=module.config)
        got = one_pass(rows, width - wide, sub)
        for li, layer in enumerate(sub.layers):
            k_, v_ = (torch.nn.functional.pad(t, (0, 0, width - wide, 0)) for t in (layer.keys, layer.values))
            for j, r in enumerate(rows):
                keys[li][r], values[li][r] = k_[j], v_[j]
        for j, r in enumerate(rows):
            logits[r] = got[j]
    for li in range(len(cache.layers)):
        cache.layers[li] = _growing_layer()(torch.stack(keys[li]), torch.stack(values[li]), room)
    return cache, torch.stack(logits)


def _prefill_shared(module, ids, mask, adapter_names, room, one_pass):
    """:func:`prefill` where tokens are shared, or None where nothing is (the caller's passes).

    Each row's context (tokens read once for several rows) is the batch's common start where it
    has ``SHARED_PREFIX_MIN`` or more tokens, read once per adapter, then, for rows that share
    their next ``SHARED_PREFIX_MIN`` or more tokens with other rows under the same adapter (one
    jailbreak or rule template around different requests), those rows' common run, read once
    after it. Each row's remaining tokens are then passed in length groups on top of its
    context. The cache returned is in the batch's own left-padded layout (each row's context and
    own tokens side by side), so the decode steps attend over the width and mask they would
    without sharing (a layout with the contexts in a column block of their own widened every
    decode step's attention where long contexts sat beside long own tokens)."""
    from transformers import DynamicCache

    n, width = ids.shape
    dev = ids.device
    lengths = mask.sum(-1).tolist()
    tokens = [ids[r, width - lengths[r]:] for r in range(n)]
    names = list(adapter_names) if adapter_names is not None else [None] * n
    shared = shared_prefix_length(ids, mask)
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    by_run: dict = {}  # rows whose next SHARED_PREFIX_MIN tokens agree, under one adapter
    for r in range(n):
        if lengths[r] - shared > SHARED_PREFIX_MIN:
            by_run.setdefault((names[r], tuple(tokens[r][shared: shared + SHARED_PREFIX_MIN].tolist())), []).append(r)
    by_run = {key: rows for key, rows in by_run.items() if len(rows) > 1}
    if not shared and not by_run:
        return None

    def read(run: torch.Tensor, start: int, under, name):
        """Keys and values per layer [1, kv heads, start + len(run), head dim] of ``run`` read after
        ``under`` (the same for its first ``start`` positions), under adapter ``name``."""
        head = DynamicCache(config=module.config)
        if under is not None:
            for li, layer in enumerate(head.layers):
                layer.update(*under[li])
        c = len(run)
        one_pass([0], 0, head, (run[None], mask.new_ones(1, start + c), torch.arange(start, start + c, device=dev)[None]),
                 names=None if adapter_names is None else [name])
        return [(layer.keys, layer.values) for layer in head.layers]

    first = {name: read(tokens[0][:shared], 0, None, name) if shared else None for name in dict.fromkeys(names)}
    context, used = [first[names[r]] for r in range(n)], [shared] * n
    for (name, _), rows in by_run.items():
        more = shared + shared_prefix_length(*left_padded([tokens[r][shared:].tolist() for r in rows], 0))
        kv = read(tokens[rows[0]][shared:more], shared, first[name], name)
        for r in rows:
            context[r], used[r] = kv, more
    some = next(c for c in context if c is not None)
    empty = [tuple(t[:, :, :0] for t in kv) for kv in some]  # the context of a row that shares nothing
    context = [c if c is not None else empty for c in context]
    own = [lengths[r] - used[r] for r in range(n)]
    keys: list[list] = [[None] * n for _ in some]
    values: list[list] = [[None] * n for _ in some]
    logits = [None] * n
    for rows in length_groups(own, n):
        c, w = max(used[r] for r in rows), max(own[r] for r in rows)
        sub = DynamicCache(config=module.config)
        for li, layer in enumerate(sub.layers):  # each row's context, left-padded to the group's widest
            layer.update(*(torch.cat([torch.nn.functional.pad(context[r][li][k], (0, 0, c - used[r], 0)) for r in rows])
                           for k in (0, 1)))
        tail = ids.new_zeros(len(rows), w)  # a padding slot's id is never attended to
        for j, r in enumerate(rows):
            tail[j, w - own[r]:] = tokens[r][used[r]:]
        seen = mask.new_zeros(len(rows), c + w)  # [padding][context] [padding][row's own tokens]
        for j, r in enumerate(rows):
            seen[j, c - used[r]: c] = 1
            seen[j, c + w - own[r]:] = 1
        at = torch.stack([torch.arange(used[r] - w + own[r], used[r] + own[r], device=dev) for r in rows])
        at = at.masked_fill(seen[:, c:] == 0, 1)  # positions as generate's for padding
        got = one_pass(list(range(len(rows))), 0, sub, (tail, seen, at), names=None if adapter_names is None
                       else [names[r] for r in rows])
        for li, layer in enumerate(sub.layers):  # each row's context and own tokens, back in the batch's layout
            for j, r in enumerate(rows):
                keys[li][r], values[li][r] = (
                    torch.nn.functional.pad(torch.cat([t[j, :, c - used[r]: c], t[j, :, c + w - own[r]:]], dim=-2),
                                            (0, 0, width - lengths[r], 0)) for t in (layer.keys, layer.values))
        for j, r in enumerate(rows):
            logits[r] = got[j]
    cache = DynamicCache(config=module.config)
    for li in range(len(cache.layers)):
        cache.layers[li] = _growing_layer()(torch.stack(keys[li]), torch.stack(values[li]), room)
    return cache, torch.stack(logits)


def _plain(cache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention ``DynamicLayer``: the only kind a
    :class:`GrowingLayer` stands in for (a sliding-window layer drops old positions)."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@functools.cache
def _growing_layer() -> type:
    """The :class:`GrowingLayer` class, built on first use: it subclasses transformers'
    ``DynamicLayer``, and importing transformers here would add ~0.4 s to every command that
    imports this module (the CLI's start)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values sit in a buffer with ``room`` free positions: a
        decode step copies its one new position in and hands attention a view, where
        ``DynamicLayer.update`` concatenates, i.e. copies the whole cache, at every step (41% of a
        32-row evaluation batch's decode time on the embedded model, torch.profiler). The views hold
        exactly the values a ``DynamicLayer`` would; the buffer doubles when full."""

        def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, room: int):
            super().__init__()
            self.room, self.length = max(room, 1), 0
            if keys is not None:  # else empty: the first update (transformers' own prompt pass) sizes it
                self._allocate(keys, values)

        def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            n, heads, length, dim = keys.shape
            self._k = keys.new_empty(n, heads, length + self.room, dim)
            self._v = values.new_empty(n, values.shape[1], length + self.room, values.shape[-1])
            self._k[:, :, :length] = keys
            self._v[:, :, :length] = values
            self.length = length
            self.device = keys.device
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self._allocate(key_states, value_states)
                return self.keys, self.values
            t = key_states.shape[-2]
            if self.length + t > self._k.shape[-2]:
                grow = max(self._k.shape[-2], t)
                self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[-1])], dim=-2)
                self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[-1])], dim=-2)
            self._k[:, :, self.length : self.length + t] = key_states
            self._v[:, :, self.length : self.length + t] = value_states
            self.length += t
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]
                self._views()

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            if self.is_initialized:
                self.batch_select_indices(beam_idx.to(self.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self._views()

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._views()

        def crop(self, max_length: int) -> None:
            self.length = self.length - abs(max_length) if max_length < 0 else min(self.length, max_length)
            if self.is_initialized:
                self._views()

    return GrowingLayer


def growing_cache(module, room: int):
    """An empty ``DynamicCache`` for ``module`` whose layers are :class:`GrowingLayer` s, each sized
    by its first update (the prompt pass) with ``room`` free positions, for transformers' own
    ``generate`` (the sampler, and greedy search under a generation config that asks for more than
    argmax): the same keys and values its default cache holds, without copying the whole cache at
    every step. None where the model's cache has other than plain full-attention layers (sliding
    windows, linear attention) or its generation config names a cache of its own
    (``cache_implementation``, which ``generate`` refuses beside a given cache): ``generate`` then
    builds its own."""
    from transformers import DynamicCache

    if getattr(getattr(module, "generation_config", None), "cache_implementation", None) is not None:
        return None
    cache = DynamicCache(config=module.config)
    if not _plain(cache):
        return None
    grow = _growing_layer()
    for li in range(len(cache.layers)):
        cache.layers[li] = grow(None, None, room)
    return cache


def __getattr__(name: str):
    if name == "GrowingLayer":  # PEP 562: the class without importing transformers at module import
        return _growing_layer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def forward_parameters(module) -> frozenset[str]:
    """The keyword names a causal LM's ``forward`` takes. ``module`` may be a PEFT wrapper (its
    ``forward`` takes ``**kwargs``): the base model's signature decides."""
    import inspect

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return frozenset(inspect.signature(base.forward).parameters)


def cache_argument(module) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache by: ``cache`` (transformers ≥ 5.24,
    where ``past_key_values`` is deprecated, to be removed in 5.40) or ``past_key_values`` (before)."""
    return "cache" if "cache" in forward_parameters(module) else "past_key_values"


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, width] and attention mask [n, width], left-padded: every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p))
        mask[row, width - len(p) :] = 1
    return ids, mask

"""Hidden states at each prompt's last token, reading every shared beginning once.

The gate's pools are highly redundant at the front: every prompt opens with the chat
template's system header, and every prompt wrapped in a jailbreak template opens with that
template's text up to the request. On the default folder 4,533 prompts hold 531k tokens of
which 31.5% are distinct prefixes of a token tree. A causal model's state at position t
depends on tokens 0..t only, so a beginning shared by many prompts can be read once, its
key/value cache kept, and each prompt's remainder read on top of it.

:func:`plan` builds a compressed prefix tree (a radix tree) over token ids and keeps a node
only where it saves at least ``min_saving`` token reads; :func:`last_token_states` walks it
depth first. At each node it reads all the children's edges in one batch on top of the node's
cache, then the prompts below those children in shared batches, each row on the node's cache
plus its own child's edge. Rows are right-padded (under the causal mask a real token never
sees a pad after it); the gap after an edge shorter than the batch's widest is masked. Batching
across siblings matters: most nodes are small, and a forward call of under 256 rows runs the
fp32 matmuls at half the rate of one of thousands. The states equal a plain forward pass's to
float rounding: the same arithmetic split into differently shaped matmuls, so the last bits
differ (tests/test_shared_prefix.py bounds it).

Prefix sharing as a serving technique: RadixAttention (SGLang; Zheng et al. 2024,
arXiv 2312.07104); here it serves a one-layer, last-token read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import SafetyPatchError

MIN_SAVING = 64
"""A tree node is kept only when reading its edge once instead of once per prompt below it
saves at least this many token reads: a node costs a cache and a masked gap in its siblings'
rows. On the default pool 16 / 64 / 256 leave 32.6 / 33.2 / 35.6% of the tokens; 64 was the
fastest of the three on the validation prompts (noisy 2-core runs, 2026-12-02)."""


@dataclass
class Node:
    """A node of the prefix tree: tokens ``[0, depth)`` are read into its cache.

    ``edge``: the tokens ``[parent.depth, depth)`` it adds to its parent's cache. ``leaves``:
    indices of the prompts read from this node (their tokens ``[depth:]``, at least one each).
    """

    depth: int
    edge: list[int]
    leaves: list[int] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    def walk(self):
        """This node and every node below it, depth first."""
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))


def _lcp(a: Sequence[int], b: Sequence[int], start: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, known to share ``[0, start)``."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan(prompts: Sequence[Sequence[int]], min_saving: int = MIN_SAVING) -> Node:
    """The prefix tree the pass reads ``prompts`` through: a root at depth 0 with no edge.

    Every prompt is a leaf of exactly one node, whose depth is below the prompt's length (so its
    last token is read in that leaf's batch). Deterministic for given prompts. Raises
    SafetyPatchError for an empty prompt or ``min_saving`` < 1.
    """
    if min_saving < 1:
        raise SafetyPatchError(f"min_saving must be >= 1, got {min_saving}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SafetyPatchError(f"prompt {i} has no tokens")
    root = Node(0, [])
    if not prompts:
        return root
    # Sorted lexicographically, a set sharing [0, d) splits into contiguous runs by the token at
    # d, and the set's common prefix is that of its first and last members.
    order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i]), i))
    stack: list[tuple[list[int], int, Node]] = [(order, 0, root)]
    while stack:
        group, d, node = stack.pop()
        if len(group) == 1:
            node.leaves.append(group[0])
            continue
        # Depth at which the group branches, capped so that every member keeps a token to read.
        cap = min(len(prompts[i]) for i in group) - 1
        e = min(_lcp(prompts[group[0]], prompts[group[-1]], d), cap)
        if e > node.depth and (len(group) - 1) * (e - node.depth) >= min_saving:
            child = Node(e, list(prompts[group[0]][node.depth:e]))
            node.children.append(child)
            stack.append((group, e, child))
            continue
        ends = [i for i in group if len(prompts[i]) <= e + 1]  # last token at e: cannot go deeper
        node.leaves.extend(ends)
        rest = [i for i in group if len(prompts[i]) > e + 1]
        runs: list[list[int]] = []
        for i in rest:
            if runs and prompts[runs[-1][0]][e] == prompts[i][e]:
                runs[-1].append(i)
            else:
                runs.append([i])
        stack.extend((r, e + 1, node) for r in reversed(runs))
    return root


def plan_cost(root: Node, prompts: Sequence[Sequence[int]]) -> dict:
    """What reading through ``root`` costs: ``tokens`` read (edges + leaf remainders, before
    padding), ``plain_tokens`` (every prompt read whole), ``nodes`` (kept prefixes)."""
    tokens = nodes = 0
    for n in root.walk():
        tokens += len(n.edge) + sum(len(prompts[i]) - n.depth for i in n.leaves)
        nodes += n is not root
    return {"tokens": tokens, "plain_tokens": sum(len(p) for p in prompts), "nodes": nodes}


KV = list  # per decoder layer 0..L: (keys, values), each [heads, tokens, head_dim] or [1, heads, tokens, head_dim]


@dataclass
class _Job:
    """One row of a batch: ``tokens`` read on top of the shared prefix and then ``middle``
    (this row's own cached tokens, e.g. its node's edge; None: none)."""

    tokens: Sequence[int]
    middle: KV | None = None

    @property
    def m(self) -> int:
        return 0 if self.middle is None else self.middle[0][0].shape[-2]


def _batches(jobs: Sequence[_Job], prefix: int, token_budget: int, kv_budget: int, max_batch: int) -> list[list[int]]:
    """Indices into ``jobs`` in batches of similar width: at most ``max_batch`` rows, rows x
    widest read within ``token_budget``, rows x (prefix + widest middle + widest read) cached
    tokens within ``kv_budget``; at least one row each."""
    order = sorted(range(len(jobs)), key=lambda i: (len(jobs[i].tokens), jobs[i].m))
    out: list[list[int]] = []
    cur: list[int] = []
    s_max = m_max = 0
    for i in order:
        s, m = max(s_max, len(jobs[i].tokens)), max(m_max, jobs[i].m)
        b = len(cur) + 1
        if cur and (b > max_batch or b * s > token_budget or b * (prefix + m + s) > kv_budget):
            out.append(cur)
            cur, s, m = [], len(jobs[i].tokens), jobs[i].m
        cur.append(i)
        s_max, m_max = s, m
    if cur:
        out.append(cur)
    return out


class _Stop(Exception):
    pass


def last_token_states(model, prompts: Sequence[Sequence[int]], layer: int, token_budget: int = 2048,
                      kv_budget: int = 16384, max_batch: int = 64, min_saving: int = MIN_SAVING,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Hidden state after decoder layer ``layer`` at each prompt's last token: [n, hidden] fp32
    (:func:`last_token_states_at` for one layer; see there)."""
    return last_token_states_at(model, prompts, [layer], token_budget, kv_budget, max_batch, min_saving, progress)[layer]


def last_token_states_at(model, prompts: Sequence[Sequence[int]], layers: Sequence[int], token_budget: int = 2048,
                         kv_budget: int = 16384, max_batch: int = 64, min_saving: int = MIN_SAVING,
                         progress: Callable[[int], None] | None = None) -> dict[int, torch.Tensor]:
    """Hidden states after each decoder layer of ``layers`` at each prompt's last token, read in
    one pass that stops after the deepest: {layer: [n, hidden] fp32} (a multi-layer gate's
    features cost the deepest layer's pass, not one pass per layer).

    ``prompts``: token ids (chat template applied). Reads shared beginnings once through
    :func:`plan`'s tree; the pass stops after the deepest layer. At each node, the children's edges are
    read in one batch on top of the node's cache, then the prompts below all those children
    together, each row on top of the node's cache and its own child's edge (rows of different
    children differ in edge length: the gap is masked, positions are each prompt's own). Budgets,
    in tokens: ``token_budget`` read per batch (rows x width), ``kv_budget`` cached per batch
    (rows x cached width, which also bounds the edges held at once); ``max_batch`` rows.
    Equal to a plain pass (``gate.layer_states``) to float rounding. Needs a decoder that takes
    a KV cache (a transformers ``DynamicCache``, by ``prompt_pass.cache_argument``), a 2-D
    ``attention_mask`` over cached + new tokens and ``position_ids``. ``progress(n)``: n more
    prompts read. Raises SafetyPatchError for a layer the model lacks or an empty prompt.
    """
    from transformers import DynamicCache

    from .gate.probe import decoder_layers
    from .prompt_pass import cache_argument

    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    if not wanted:
        raise SafetyPatchError("last_token_states_at: no layer asked for")
    for li in wanted:
        if not 0 <= li < len(blocks):
            raise SafetyPatchError(f"gate layer {li} out of range: the model has layers 0-{len(blocks) - 1}")
    layer = wanted[-1]  # the pass, its KV cache and its stop: the deepest layer's
    root = plan(prompts, min_saving)
    kv = cache_argument(model)
    device = next(model.parameters()).device
    outs = {li: torch.zeros(len(prompts), getattr(model.config, "hidden_size", 0)) for li in wanted}
    captured: dict[int, torch.Tensor] = {}

    def hook_for(li: int):
        def hook(_mod, _inp, output):
            captured[li] = output[0] if isinstance(output, tuple) else output
            if li == layer:
                raise _Stop
        return hook

    def read(prefix: KV | None, jobs: Sequence[_Job], keep_kv: bool) -> tuple[list[torch.Tensor], list[KV]]:
        """Each job's states at its last token ({layer: [hidden]}) and (``keep_kv``) its tokens' cache, [heads, s, d] per layer."""
        p = 0 if prefix is None else prefix[0][0].shape[-2]
        states: list = [None] * len(jobs)
        kvs: list = [None] * len(jobs)
        for idx in _batches(jobs, p, token_budget, kv_budget, max_batch):
            rows = [jobs[i] for i in idx]
            b, s, m = len(rows), max(len(j.tokens) for j in rows), max(j.m for j in rows)
            ids = torch.zeros((b, s), dtype=torch.long)
            for r, j in enumerate(rows):
                ids[r, : len(j.tokens)] = torch.as_tensor(list(j.tokens), dtype=torch.long)
            cache = DynamicCache() if (p or m or keep_kv) else None
            for li in range(layer + 1 if cache is not None and (p or m) else 0):
                parts_k, parts_v = [], []
                if p:
                    parts_k.append(prefix[li][0].expand(b, -1, -1, -1))
                    parts_v.append(prefix[li][1].expand(b, -1, -1, -1))
                if m:
                    k0 = prefix[li][0] if p else next(j.middle for j in rows if j.middle is not None)[li][0]
                    mk = torch.zeros((b, k0.shape[-3], m, k0.shape[-1]), dtype=k0.dtype, device=k0.device)
                    mv = torch.zeros_like(mk)
                    for r, j in enumerate(rows):
                        if j.middle is not None:
                            mk[r, :, : j.m], mv[r, :, : j.m] = j.middle[li]
                    parts_k.append(mk)
                    parts_v.append(mv)
                cache.update(torch.cat(parts_k, -2), torch.cat(parts_v, -2), li)
            mask = None
            if m and any(j.m < m for j in rows):  # the gap after a shorter middle is masked
                mask = torch.ones((b, p + m + s), dtype=torch.long, device=device)
                for r, j in enumerate(rows):
                    mask[r, p + j.m : p + m] = 0
            pos = torch.stack([torch.arange(p + j.m, p + j.m + s) for j in rows]).to(device)
            captured.clear()
            kwargs = {"attention_mask": mask} if mask is not None else {}
            try:
                model(input_ids=ids.to(device), position_ids=pos, use_cache=cache is not None, **{kv: cache}, **kwargs)
            except _Stop:
                pass
            if len(captured) != len(wanted):
                raise SafetyPatchError(f"the forward pass did not reach decoder layer {layer}")
            got = {}
            for li, h in captured.items():
                last = torch.tensor([len(j.tokens) - 1 for j in rows], device=h.device)
                got[li] = h[torch.arange(b, device=h.device), last].float().cpu()
            for r, i in enumerate(idx):
                states[i] = {li: g[r] for li, g in got.items()}
                if keep_kv:  # this row's own tokens (right padding dropped), copied out of the batch
                    n = len(rows[r].tokens)
                    kvs[i] = [(lay.keys[r, :, p + m : p + m + n].clone(), lay.values[r, :, p + m : p + m + n].clone())
                              for lay in cache.layers[: layer + 1]]
        return states, kvs

    def extend(prefix: KV | None, edge: KV) -> KV:
        if prefix is None:
            return [(k[None], v[None]) for k, v in edge]
        return [(torch.cat([pk, k[None]], -2), torch.cat([pv, v[None]], -2)) for (pk, pv), (k, v) in zip(prefix, edge, strict=True)]

    handles = [blocks[li].register_forward_hook(hook_for(li)) for li in wanted]
    try:
        with torch.inference_mode():
            if root.leaves:
                got, _ = read(None, [_Job(prompts[i]) for i in root.leaves], False)
                for i, x in zip(root.leaves, got, strict=True):
                    for li in wanted:
                        outs[li][i] = x[li]
                if progress is not None:
                    progress(len(root.leaves))
            # Each entry: a node whose children are still to read, its parent's cache and its edge's
            # (the node's own cache is put together when it is reached; None: the root's, empty).
            # A node's own prompts are read by its parent, beside its siblings'.
            stack: list[tuple[Node, KV | None, KV | None]] = [(root, None, None)]
            while stack:
                node, parent, edge = stack.pop()
                prefix = parent if edge is None else extend(parent, edge)
                chunks, cur, width = [], [], 0  # children in chunks whose edges fit kv_budget
                for c in node.children:
                    if cur and width + len(c.edge) > kv_budget:
                        chunks.append(cur)
                        cur, width = [], 0
                    cur.append(c)
                    width += len(c.edge)
                if cur:
                    chunks.append(cur)
                for chunk in chunks:
                    _, edges = read(prefix, [_Job(c.edge) for c in chunk], True)
                    jobs = [(i, _Job(prompts[i][c.depth:], e)) for c, e in zip(chunk, edges, strict=True) for i in c.leaves]
                    got, _ = read(prefix, [j for _, j in jobs], False)
                    for (i, _), x in zip(jobs, got, strict=True):
                        for li in wanted:
                            outs[li][i] = x[li]
                    if progress is not None:
                        progress(len(jobs))
                    stack.extend((c, prefix, e) for c, e in zip(chunk, edges, strict=True) if c.children)
    finally:
        for h in handles:
            h.remove()
    return outs

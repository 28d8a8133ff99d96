"""Scoring rows of several contexts in one forward without padding ("packed"), for the CPU.

Scoring in buckets (`logprobs.score_in_buckets`) runs each bucket of similar-length rows as
its own forward after a pass of its context. On a CPU a forward's matmuls are slow at few
positions (MKL reaches ~120 GFLOP/s at 64 rows against ~190 at 512), so an answer-free
teacher's small buckets cost about twice their matmul floor. Here every position of a pack
(each context once, then each row's completion inputs, back to back) goes through the
projections, the MLP and the head as one `[T, H]` matrix; only attention is done per context,
on the rows laid out padded (`PackedLayout.attend`). The blocks are mlx-lm's own modules: the
tokens enter as a batch of `T` sequences of one position (so that RoPE takes each token's
position as its batch offset), and the layout stands in for the KV cache.

For llama/qwen2/qwen3 backbones (`supported`). The teacher's scoring (`packed_logprobs`,
numpy's passes, no gradient) and the update's micro-batches (`row_packs`, `rows_logprobs`:
from the rollout's kept states, MLX's ops, gradients flow) with what must score the update's
rows as it does (`score_rows`). Why and what they measured: docs/speed.md, "Packed scoring"
and "Packed updates"."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cast_mlx.engine import fastmath, hostmath, logprobs

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")  # blocks: norm, attention(x, mask, cache), norm, MLP
enabled = True  # False: the buckets on the CPU too (the memory plan's measurements: what a Mac runs)


def supported(model: nn.Module) -> bool:
    """Whether `packed_hidden` can run this model: an mlx-lm llama/qwen2/qwen3 whose layers
    all use full attention, on the CPU (where `fastmath.attention` serves its layers), unless
    `enabled` is off."""
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    return (
        enabled
        and fastmath.on_cpu()
        and inner is not None
        and getattr(args, "model_type", None) in SUPPORTED_TYPES
        and getattr(inner, "swa_idx", None) is None  # no sliding-window layer
    )


@dataclass
class Group:
    """One context's part of a pack: its positions `[start, start + context)`, then its rows'
    inputs (completion tokens 0..len-2 of each row with two or more tokens)."""

    start: int
    context: int
    pad: mx.array | None  # int32 [n, Lg]: the packed index of row r's input j (padding: any)
    valid: mx.array | None  # int32 [K]: which of the n * Lg padded slots are real inputs


class PackedLayout:
    """The layout of one pack, handed to every block where a KV cache would go: `offset` is
    each token's position (RoPE), `update_and_fetch` passes the keys through, and `attend`
    (called by `fastmath.attention`) does each context's attention."""

    def __init__(self, positions: mx.array, groups: list[Group]):
        self.offset, self.groups = positions, groups

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """`[T, Hq, 1, D]` queries and `[T, Hk, 1, D]` keys/values of the pack -> `[T, Hq, 1,
        D]`: a context's positions attend causally within it; a row's inputs attend to their
        context and causally to the row's earlier inputs."""
        q, k, v = queries[:, :, 0], keys[:, :, 0], values[:, :, 0]  # [T, heads, D]
        pieces = []
        for g in self.groups:
            span = slice(g.start, g.start + g.context)
            qc, kc, vc = (x[span].transpose(1, 0, 2)[None] for x in (q, k, v))  # [1, heads, C, D]
            ctx = fastmath.attention(qc, kc, vc, None, scale, "causal" if g.context > 1 else None)
            pieces.append(ctx[0].transpose(1, 0, 2))  # [C, Hq, D]
            if g.pad is None or g.valid is None:
                continue
            n, width = g.pad.shape
            qr, kr, vr = (x[g.pad.reshape(-1)].reshape(n, width, *x.shape[1:]).transpose(0, 2, 1, 3) for x in (q, k, v))
            kr = mx.concatenate([mx.broadcast_to(kc, (n, *kc.shape[1:])), kr], axis=2)
            vr = mx.concatenate([mx.broadcast_to(vc, (n, *vc.shape[1:])), vr], axis=2)
            rows = fastmath.attention(qr, kr, vr, None, scale, "causal")  # [n, Hq, Lg, D]
            pieces.append(rows.transpose(0, 2, 1, 3).reshape(n * width, rows.shape[1], rows.shape[3])[g.valid])
        return mx.concatenate(pieces)[:, :, None, :]


@dataclass
class Pack:
    """The inputs of one packed forward and where each row's tokens are predicted."""

    inputs: mx.array  # int32 [T]
    layout: PackedLayout
    predicting: list[np.ndarray]  # per row of the pack: the packed index predicting each of its tokens
    # where each packed position's state lies in `pack_states`' table: the contexts' states
    # (each context once, taken from its first row), then every row's completion states
    sources: np.ndarray
    context_rows: list[int]  # per context of the pack: the row whose context states it takes


def build_pack(contexts: list[list[int]], tokens: np.ndarray, lengths: list[int]) -> Pack:
    """A pack of rows (`tokens[i, :lengths[i]]` after `contexts[i]`); rows sharing a context
    (the same list, consecutive or not) share its positions."""
    ids: list[int] = []
    positions: list[int] = []
    groups: list[Group] = []
    predicting: list[np.ndarray] = [np.empty(0, np.int64)] * len(contexts)
    sources: list[np.ndarray] = []
    width_all = tokens.shape[1]
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    order: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        order.setdefault(tuple(context), []).append(i)
    context_states = sum(len(key) for key in order)  # the table's rows before the completions'
    table_at = 0  # where this context's states start in the table
    for key, rows in order.items():
        start, c = len(ids), len(key)
        sources.append(np.arange(table_at, table_at + c))
        table_at += c
        ids += key
        positions += range(c)
        inputs = [max(lengths[i] - 1, 0) for i in rows]
        width = max(inputs)
        pad = np.zeros((len(rows), max(width, 1)), np.int32)
        valid: list[int] = []
        for r, (i, m) in enumerate(zip(rows, inputs)):
            first = len(ids)
            ids += tokens[i, :m].tolist()
            positions += range(c, c + m)
            sources.append(context_states + i * width_all + np.arange(m))
            pad[r, :m] = np.arange(first, first + m)
            pad[r, m:] = first if m else start  # padding reads any real position
            valid += range(r * width, r * width + m)
            predicting[i] = np.concatenate([[start + c - 1], np.arange(first, first + m)]).astype(np.int64)
        groups.append(
            Group(start, c, mx.array(pad) if width else None, mx.array(np.array(valid, np.int32)) if width else None)
        )
    layout = PackedLayout(mx.array(np.array(positions, np.int32)), groups)
    context_rows = [rows[0] for rows in order.values()]
    return Pack(mx.array(np.array(ids, np.int32)), layout, predicting, np.concatenate(sources), context_rows)


def pack_states(pack: Pack, states: logprobs.BatchStates) -> mx.array:
    """`[T, H]`: the kept states entering block `states.split` at every position of `pack`
    (built from the same rows: `states.contexts[i]` and `states.tokens[i]` are row i's)."""
    tokens = states.tokens.reshape(-1, states.tokens.shape[-1])
    table = mx.concatenate([states.contexts[i] for i in pack.context_rows] + [tokens])
    return table[mx.array(pack.sources.astype(np.int32))]


def packed_hidden(model: nn.Module, pack: Pack, states: logprobs.BatchStates | None = None) -> mx.array:
    """The backbone's output `[T, H]` (final norm included) at every position of `pack`; with
    `states` (the rows' kept states), from them through the blocks above `states.split`."""
    fastmath.use_fast_attention()  # its `attention` hands the layout's attention to `attend`
    inner = model.model
    if states is None:
        h, layers = inner.embed_tokens(pack.inputs), inner.layers
    else:
        h, layers = pack_states(pack, states), inner.layers[states.split :]
    h = h[:, None, :]  # T sequences of one position
    for layer in layers:
        h = layer(h, None, cache=pack.layout)
    return inner.norm(h)[:, 0, :]


def row_lengths(mask: np.ndarray) -> list[int]:
    """Each row's extent: through its last unmasked token (masked ones inside are scored,
    then zeroed); 0 for a row without one."""
    return [int(np.flatnonzero(m)[-1]) + 1 if m.any() else 0 for m in mask > 0]


def packed_token_logprobs(
    model: nn.Module,
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    temperature: float = 1.0,
    *,
    states: logprobs.BatchStates | None = None,
    with_entropy: bool = False,
    chunk: int = 512,
):
    """`logprobs.token_logprobs` of these rows as one pack: `[N, L]` log-probs (and with
    `with_entropy`, entropies), 0 where masked, with MLX's ops only, so that gradients flow
    (the update) and a scoring pass of the same rows is the same computation (a `same`
    teacher's gaps, read against the update's log-probs). `states`: the rows' kept states
    (`FrozenStates.of_rows`): the blocks above the split only. Every row needs a context."""
    n, length = tokens.shape
    host_mask = np.array(mask)
    lengths = row_lengths(host_mask)
    scored = [i for i in range(n) if lengths[i] > 0]
    if not scored:
        zeros = mx.zeros((n, length))
        return (zeros, zeros) if with_entropy else zeros
    host_ids = np.array(tokens)
    pack = build_pack([contexts[i] for i in scored], host_ids[scored], [lengths[i] for i in scored])
    if states is not None and len(scored) < n:
        picked = mx.array(scored)
        states = logprobs.BatchStates(states.split, [states.contexts[i] for i in scored], states.tokens[picked])
    hidden = packed_hidden(model, pack, states)
    where = mx.array(np.concatenate(pack.predicting).astype(np.int32))
    wanted = mx.array(np.concatenate([host_ids[i, : lengths[i]] for i in scored]).astype(np.int32))
    head = logprobs.backbone_and_head(model)[1]
    lp, ent = logprobs.head_logprobs(head, hidden[where], wanted, 1.0 / temperature, with_entropy, False, chunk)
    # back to [N, L]: each row's values in order, a zero slot for every other position
    slot = np.full((n, length), int(wanted.shape[0]), np.int32)
    at = 0
    for i in scored:
        slot[i, : lengths[i]] = np.arange(at, at + lengths[i])
        at += lengths[i]
    index, weight = mx.array(slot), mask.astype(mx.float32)
    zero = mx.zeros((1,))

    def spread(values):
        return mx.concatenate([values, zero])[index] * weight

    return (spread(lp), spread(ent)) if with_entropy else spread(lp)


def split_rows(contexts: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in packs: each context once per pack plus its rows' tokens make at most
    `budget` positions, and so do a context's rows padded to the longest (its attention's
    size, as a bucket's). Rows go by context, longest first; a row that alone exceeds the
    budget gets a pack of its own."""
    first: dict[tuple[int, ...], int] = {}
    for i, c in enumerate(contexts):
        first.setdefault(tuple(c), i)
    order = sorted(range(len(contexts)), key=lambda i: (first[tuple(contexts[i])], -lengths[i], i))
    packs: list[list[int]] = []
    rows: list[int] = []
    groups: dict[tuple[int, ...], list[int]] = {}  # per context in the pack: rows, width
    used = 0
    for i in order:
        key, n = tuple(contexts[i]), lengths[i]
        count, width = groups.get(key, [0, 0])
        cost = n + (0 if count else len(key))
        if rows and (used + cost > budget or (count + 1) * max(width, n) > budget):
            packs.append(rows)
            rows, groups, used = [], {}, 0
            count, width, cost = 0, 0, n + len(key)
        rows.append(i)
        groups[key] = [count + 1, max(width, n)]
        used += cost
    return packs + [rows] if rows else packs


def packed_logprobs(
    model: nn.Module,
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    temperature: float,
    budget: int,
    numpy_passes: bool = True,
    chunk: int = 512,
) -> mx.array:
    """`log_softmax(logits / T)[token]` `[N, L]` of every row's completion tokens (0 where
    masked), scored in packs of at most `budget` positions (`split_rows`), no gradient.
    `numpy_passes`: as `logprobs.token_logprobs`'; the head runs on `chunk` positions at a
    time."""
    n, length = tokens.shape
    host_mask = np.array(mask) > 0
    lengths = row_lengths(host_mask)
    host_ids = np.array(tokens)
    head = logprobs.backbone_and_head(model)[1]
    host = logprobs.host_passes(numpy_passes)
    out = np.zeros((n, length), np.float32)
    with hostmath.scoring(host):
        for rows in split_rows(contexts, lengths, budget):
            scored = [i for i in rows if lengths[i] > 0]
            if not scored:
                continue
            pack = build_pack([contexts[i] for i in scored], host_ids[scored], [lengths[i] for i in scored])
            hidden = mx.stop_gradient(packed_hidden(model, pack))
            where = np.concatenate(pack.predicting)
            wanted = mx.array(np.concatenate([host_ids[i, : lengths[i]] for i in scored]).astype(np.int32))
            lp, _ = logprobs.head_logprobs(head, hidden[mx.array(where)], wanted, 1.0 / temperature, False, host, chunk)
            mx.eval(lp)
            values, at = np.array(lp), 0
            for i in scored:
                out[i, : lengths[i]] = values[at : at + lengths[i]]
                at += lengths[i]
    return mx.array(out * host_mask)


# --------------------------------------------------------------------------- the update's packs


def packs_update(model: nn.Module, share_prefix: bool) -> bool:
    """Whether the update (and what must score its rows the same way: a `same` teacher with
    deferred gaps, their old policy) runs packs of rows instead of padded buckets: on the CPU
    for the `supported` backbones, with `system.share_prefix` (a pack runs each context once)."""
    return share_prefix and supported(model)


def row_packs(contexts: list[list[int]], mask: mx.array, rows: list[int], micro_batch: int) -> list[list[int]]:
    """`rows` in packs (`split_rows`) of at most what one padded micro-batch of the longest
    completions holds: `micro_batch` rows of `L` = `mask.shape[1]` positions plus a context,
    so the update's memory stays within what the plan counts for a micro-batch."""
    if not rows:
        return []
    lengths = row_lengths(np.array(mask[mx.array(rows)]))
    budget = micro_batch * mask.shape[1] + max(len(contexts[i]) for i in rows)
    return [[rows[j] for j in pack] for pack in split_rows([contexts[i] for i in rows], lengths, budget)]


def rows_logprobs(
    model: nn.Module,
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    rows: list[int],
    temperature: float,
    frozen: logprobs.FrozenStates | None = None,
    with_entropy: bool = False,
):
    """`packed_token_logprobs` of `rows` as one pack, cut to their longest extent: `[len(rows),
    l]` (with `frozen`, the rollout's states: the blocks above its split only)."""
    idx = mx.array(rows)
    length = max(max(row_lengths(np.array(mask[idx]))), 1)
    states = None if frozen is None else frozen.of_rows(rows, length)
    return packed_token_logprobs(
        model, [contexts[i] for i in rows], tokens[idx, :length], mask[idx, :length], temperature,
        states=states, with_entropy=with_entropy,
    )  # fmt: skip


def score_rows(
    model: nn.Module,
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    rows: list[int] | None,
    temperature: float,
    micro_batch: int,
    frozen: logprobs.FrozenStates | None = None,
) -> mx.array:
    """Log-probs `[N, L]` of `rows` (None: every row with tokens; the others 0), no gradient,
    in the packs an update of those rows runs (`row_packs`, `rows_logprobs`), so that the
    same weights give exactly the update's values."""
    n, length = mask.shape
    if rows is None:
        rows = [i for i, m in enumerate(np.array(mask).sum(axis=1).tolist()) if m > 0]
    pieces, order = [], []
    for pack in row_packs(contexts, mask, rows, micro_batch):
        lp = mx.stop_gradient(rows_logprobs(model, contexts, tokens, mask, pack, temperature, frozen))
        mx.eval(lp)
        pieces.append(mx.pad(lp, [(0, 0), (0, length - lp.shape[1])]))
        order += pack
    scored = mx.concatenate(pieces + [mx.zeros((1, length))], axis=0)
    where = {i: k for k, i in enumerate(order)}
    return scored[mx.array([where.get(i, len(order)) for i in range(n)])]

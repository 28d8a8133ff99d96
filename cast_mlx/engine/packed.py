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

For llama/qwen2/qwen3 backbones (`supported`), without gradient. Why and what it measured:
docs/speed.md, "Packed scoring"."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cast_mlx.engine import fastmath, hostmath, logprobs
from cast_mlx.engine.head import head_logprobs

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


def build_pack(contexts: list[list[int]], tokens: np.ndarray, lengths: list[int]) -> Pack:
    """A pack of rows (`tokens[i, :lengths[i]]` after `contexts[i]`); rows sharing a context
    (the same list, consecutive or not) share its positions."""
    ids: list[int] = []
    positions: list[int] = []
    groups: list[Group] = []
    predicting: list[np.ndarray] = [np.empty(0, np.int64)] * len(contexts)
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    order: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        order.setdefault(tuple(context), []).append(i)
    for key, rows in order.items():
        start, c = len(ids), len(key)
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
            pad[r, :m] = np.arange(first, first + m)
            pad[r, m:] = first if m else start  # padding reads any real position
            valid += range(r * width, r * width + m)
            predicting[i] = np.concatenate([[start + c - 1], np.arange(first, first + m)]).astype(np.int64)
        groups.append(
            Group(start, c, mx.array(pad) if width else None, mx.array(np.array(valid, np.int32)) if width else None)
        )
    layout = PackedLayout(mx.array(np.array(positions, np.int32)), groups)
    return Pack(mx.array(np.array(ids, np.int32)), layout, predicting)


def packed_hidden(model: nn.Module, pack: Pack) -> mx.array:
    """The backbone's output `[T, H]` (final norm included) at every position of `pack`."""
    fastmath.use_fast_attention()  # its `attention` hands the layout's attention to `attend`
    inner = model.model
    h = inner.embed_tokens(pack.inputs)[:, None, :]  # T sequences of one position
    for layer in inner.layers:
        h = layer(h, None, cache=pack.layout)
    return inner.norm(h)[:, 0, :]


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
    # a row's extent: through its last unmasked token (masked ones inside are scored, then zeroed)
    lengths = [int(np.flatnonzero(m)[-1]) + 1 if m.any() else 0 for m in host_mask]
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
            lp, _ = head_logprobs(head, hidden[mx.array(where)], wanted, 1.0 / temperature, False, host, chunk)
            mx.eval(lp)
            values, at = np.array(lp), 0
            for i in scored:
                out[i, : lengths[i]] = values[at : at + lengths[i]]
                at += lengths[i]
    return mx.array(out * host_mask)

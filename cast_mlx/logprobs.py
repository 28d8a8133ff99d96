"""Per-token log-probs of given completion tokens after given contexts, chunked over positions.

Used for the policy (with gradients), the old policy, the teacher and the KL reference (under
`mx.stop_gradient`). Only the sampled token's log-prob (and optionally the entropy) is kept
per position: the `[rows, length, vocab]` float32 logits exist one chunk at a time, and each
chunk is wrapped in `mx.checkpoint` so the backward pass recomputes it instead of holding it.

Layout: row `i` is `context_i + tokens_i`, right-padded to a common length (right padding
never changes a causal model's earlier positions). Completion token `j` of row `i` sits at
position `len(context_i) + j` and is predicted from the hidden state one position earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Batch:
    """Inputs of one scoring forward, built once per rows/contexts (see `make_batch`)."""

    inputs: mx.array  # int32 [N, S]: context + completion, right-padded
    positions: mx.array  # int32 [N, L]: index of the hidden state that predicts token j
    tokens: mx.array  # int32 [N, L]: completion tokens
    mask: mx.array  # float32 [N, L]


def make_batch(contexts: list[list[int]], tokens: mx.array, mask: mx.array) -> Batch:
    """Assemble right-padded `context + completion` rows for scoring."""
    n, length = tokens.shape
    if len(contexts) != n:
        raise ValueError(f"{len(contexts)} contexts for {n} completion rows")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    width = max(len(c) for c in contexts) + length
    rows = [c + t + [0] * (width - len(c) - length) for c, t in zip(contexts, cast("list[list[int]]", tokens.tolist()))]
    ctx_len = mx.array([len(c) for c in contexts], dtype=mx.int32)
    positions = ctx_len[:, None] - 1 + mx.arange(length, dtype=mx.int32)[None, :]
    inputs = mx.array(rows, dtype=mx.int32)
    return Batch(inputs=inputs, positions=positions, tokens=tokens.astype(mx.int32), mask=mask.astype(mx.float32))


def _backbone_and_head(model: nn.Module):
    """(hidden-states function, output head) for mlx-lm decoder models."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None, None
    if getattr(model, "lm_head", None) is not None and not getattr(
        getattr(model, "args", None), "tie_word_embeddings", False
    ):
        head = model.lm_head
    else:
        head = inner.embed_tokens.as_linear
    return inner, head


def _chunk_logprobs(head, hidden, tokens, inv_temp, with_entropy: bool):
    logits = head(hidden).astype(mx.float32) * inv_temp
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    lp = picked - lse
    if not with_entropy:
        return lp, mx.zeros_like(lp)
    probs = mx.exp(logits - lse[..., None])
    entropy = lse - (probs * logits).sum(axis=-1)
    return lp, entropy


def token_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, *, chunk: int = 64, with_entropy: bool = False
):
    """`log_softmax(logits / T)[token]` in float32 for every completion position: `[N, L]`
    (0 where masked). With `with_entropy`, also the entropy of that distribution `[N, L]`."""
    inv_temp = 1.0 / temperature
    backbone, head = _backbone_and_head(model)
    if backbone is None:  # unknown layout: full logits (fine for small vocabularies)
        hidden_all = None
        logits_fn = model
    else:
        hidden_all = backbone(batch.inputs)
    n, length = batch.tokens.shape
    lps, ents = [], []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        pos = batch.positions[:, start:stop]
        tok = batch.tokens[:, start:stop]
        if hidden_all is None:
            full = logits_fn(batch.inputs)
            h = mx.take_along_axis(full, pos[..., None], axis=1)
            lp, ent = _chunk_logprobs(lambda x: x, h, tok, inv_temp, with_entropy)
        else:
            h = mx.take_along_axis(hidden_all, pos[..., None], axis=1)
            # tokens enter by closure: checkpoint differentiates every argument it is given
            fn = mx.checkpoint(lambda hh, tt=tok: _chunk_logprobs(head, hh, tt, inv_temp, with_entropy))
            lp, ent = fn(h)
        lps.append(lp)
        ents.append(ent)
    mask = batch.mask
    lp = mx.concatenate(lps, axis=1) * mask
    ent = mx.concatenate(ents, axis=1) * mask
    return (lp, ent) if with_entropy else lp


def length_buckets(mask: mx.array, size: int) -> list[list[int]]:
    """Row indices in groups of `size` rows of similar completion length, longest first.

    Scoring a group pads only to its own longest row, so sorted groups waste far less work
    on padding than one batch padded to the longest completion of the step."""
    lengths = cast("list[float]", mask.sum(axis=1).tolist())
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def trimmed_batch(contexts: list[list[int]], tokens: mx.array, mask: mx.array, rows: list[int]) -> Batch:
    """The batch of `rows`, cut to their longest completion (at least one position)."""
    idx = mx.array(rows)
    length = max(int(cast(float, mask[idx].sum(axis=1).max().item())), 1)
    return make_batch([contexts[i] for i in rows], tokens[idx, :length], mask[idx, :length])


def score_in_buckets(score, contexts: list[list[int]], tokens: mx.array, mask: mx.array, size: int) -> mx.array:
    """`score(batch) -> [n, l]` applied to length buckets of `size` rows, reassembled `[N, L]`."""
    n, length = tokens.shape
    buckets = length_buckets(mask, size)
    pieces = []
    for rows in buckets:
        lp = score(trimmed_batch(contexts, tokens, mask, rows))
        pieces.append(mx.pad(lp, [(0, 0), (0, length - lp.shape[1])]))
    order = [i for rows in buckets for i in rows]
    inverse = mx.argsort(mx.array(order))
    return mx.concatenate(pieces, axis=0)[inverse]

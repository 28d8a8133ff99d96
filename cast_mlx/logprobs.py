"""Per-token log-probs of given completion tokens after given contexts, chunked over positions.

Used for the policy (with gradients), the old policy, the teacher and the KL reference (under
`mx.stop_gradient`). Only the sampled token's log-prob (and optionally the entropy) is kept
per position: the `[rows, length, vocab]` float32 logits exist one chunk at a time, and each
chunk is wrapped in `mx.checkpoint` so the backward pass recomputes it instead of holding it.

Layout: row `i` is `context_i + tokens_i`, right-padded to a common length (right padding
never changes a causal model's earlier positions). Completion token `j` of row `i` sits at
position `len(context_i) + j` and is predicted from the hidden state one position earlier.

Shared prefix: the G completions of a group share their context (the prompt, or the teacher's
context). When every row of a batch has the same context, it runs through the model once,
into a KV cache that the rows then extend (`Batch.prefix`): P + G*L token positions instead of
G*(P+L), with the same log-probs and gradients (to float rounding; the trainer's default,
`system.share_prefix`). Models whose cache is not a plain `KVCache` per layer take the
per-row path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache


@dataclass
class Batch:
    """Inputs of one scoring forward, built once per rows/contexts (see `make_batch`)."""

    inputs: mx.array  # int32 [N, S]: context + completion, right-padded
    positions: mx.array  # int32 [N, L]: index of the hidden state that predicts token j
    tokens: mx.array  # int32 [N, L]: completion tokens
    mask: mx.array  # float32 [N, L]
    prefix: list[int] | None = None  # the one context of every row, run once (None: per row)


def make_batch(contexts: list[list[int]], tokens: mx.array, mask: mx.array, share_prefix: bool = True) -> Batch:
    """Assemble right-padded `context + completion` rows for scoring; with `share_prefix`
    and one context for all rows, the batch is scored after a single pass of that context."""
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
    shared = share_prefix and all(c == contexts[0] for c in contexts)
    return Batch(
        inputs=inputs,
        positions=positions,
        tokens=tokens.astype(mx.int32),
        mask=mask.astype(mx.float32),
        prefix=list(contexts[0]) if shared else None,
    )


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


def plain_cache(model: nn.Module) -> list[KVCache] | None:
    """A fresh cache of the model when every layer's is a plain `KVCache` (what the shared
    prefix extends and the rollout engine decodes with), else None."""
    cache = make_prompt_cache(model)
    return cache if all(type(c) is KVCache for c in cache) else None


def _predicting_states(model: nn.Module, backbone, batch: Batch) -> mx.array:
    """`[N, L, H]`: the hidden state that predicts each completion token.

    Per row: one forward of `context + completion`. Shared prefix: the context once (batch 1),
    its cache repeated to the N rows, then the completions; position 0 is predicted by the
    context's last state, position j by completion position j - 1."""
    cache = None if batch.prefix is None else plain_cache(model)
    if cache is None:
        hidden = backbone(batch.inputs)
        return mx.take_along_axis(hidden, batch.positions[..., None], axis=1)
    n, length = batch.tokens.shape
    last = backbone(mx.array([batch.prefix], dtype=mx.int32), cache=cache)[:, -1:, :]
    last = mx.broadcast_to(last, (n, 1, last.shape[-1]))
    if length == 1:
        return last
    for c in cache:  # gradients flow through the repeat into the context's keys and values
        c.keys = mx.repeat(c.keys[..., : c.offset, :], n, axis=0)
        c.values = mx.repeat(c.values[..., : c.offset, :], n, axis=0)
    rest = backbone(batch.tokens[:, :-1], cache=cache)
    return mx.concatenate([last, rest], axis=1)


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
        states = None
    else:
        states = _predicting_states(model, backbone, batch)
    n, length = batch.tokens.shape
    lps, ents = [], []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        pos = batch.positions[:, start:stop]
        tok = batch.tokens[:, start:stop]
        if states is None:
            full = model(batch.inputs)
            h = mx.take_along_axis(full, pos[..., None], axis=1)
            lp, ent = _chunk_logprobs(lambda x: x, h, tok, inv_temp, with_entropy)
        else:
            h = states[:, start:stop]
            # tokens enter by closure: checkpoint differentiates every argument it is given
            fn = mx.checkpoint(lambda hh, tt=tok: _chunk_logprobs(head, hh, tt, inv_temp, with_entropy))
            lp, ent = fn(h)
        lps.append(lp)
        ents.append(ent)
    mask = batch.mask
    lp = mx.concatenate(lps, axis=1) * mask
    ent = mx.concatenate(ents, axis=1) * mask
    return (lp, ent) if with_entropy else lp


def length_buckets(mask: mx.array, size: int, contexts: list[list[int]] | None = None) -> list[list[int]]:
    """Row indices in groups of `size` rows of similar completion length, longest first.

    Scoring a group pads only to its own longest row, so sorted groups waste far less work
    on padding than one batch padded to the longest completion of the step.

    With `contexts` (one per row), a bucket holds rows of one context only, so that it can
    be scored after one pass of that context (`make_batch`), and a context's rows are cut
    where that costs the fewest positions (`split_by_cost`): one long completion does not
    pad seven short ones to its length when a second pass of the context is cheaper."""
    lengths = cast("list[float]", mask.sum(axis=1).tolist())
    if contexts is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[i : i + size] for i in range(0, len(order), size)]
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(lengths)):
        by_context.setdefault(tuple(contexts[i]), []).append(i)
    buckets = []
    for key, rows in by_context.items():
        order = sorted(rows, key=lambda i: (-lengths[i], i))
        widths = [max(int(lengths[i]), 1) for i in order]
        buckets += [order[a:b] for a, b in split_by_cost(widths, size, len(key) + PASS_OVERHEAD)]
    return buckets


PASS_OVERHEAD = 16  # positions' worth of fixed cost per forward (dispatch, small matmuls)


def split_by_cost(widths: list[int], size: int, setup: int) -> list[tuple[int, int]]:
    """Cut `widths` (sorted longest first) into runs of at most `size` that minimise
    sum(setup + rows * first width): the positions a run computes when padded to its
    longest row after a pass of `setup` positions. Ties go to fewer, larger runs."""
    n = len(widths)
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(max(0, end - size), end):
            cost = best[first] + setup + (end - first) * widths[first]
            if cost < best[end]:
                best[end], start[end] = cost, first
    runs, end = [], n
    while end > 0:
        runs.append((start[end], end))
        end = start[end]
    return runs[::-1]


def trimmed_batch(
    contexts: list[list[int]], tokens: mx.array, mask: mx.array, rows: list[int], share_prefix: bool = True
) -> Batch:
    """The batch of `rows`, cut to their longest completion (at least one position)."""
    idx = mx.array(rows)
    length = max(int(cast(float, mask[idx].sum(axis=1).max().item())), 1)
    return make_batch([contexts[i] for i in rows], tokens[idx, :length], mask[idx, :length], share_prefix)


def score_in_buckets(
    score, contexts: list[list[int]], tokens: mx.array, mask: mx.array, size: int, share_prefix: bool = True
) -> mx.array:
    """`score(batch) -> [n, l]` applied to length buckets of `size` rows, reassembled `[N, L]`
    (with `share_prefix`, buckets of one context each, each scored after one pass of it)."""
    n, length = tokens.shape
    buckets = length_buckets(mask, size, contexts if share_prefix else None)
    pieces = []
    for rows in buckets:
        lp = score(trimmed_batch(contexts, tokens, mask, rows, share_prefix))
        pieces.append(mx.pad(lp, [(0, 0), (0, length - lp.shape[1])]))
    order = [i for rows in buckets for i in rows]
    inverse = mx.argsort(mx.array(order))
    return mx.concatenate(pieces, axis=0)[inverse]

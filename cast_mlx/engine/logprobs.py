"""Per-token log-probs of given completion tokens after given contexts, chunked over positions:
for the policy (with gradients), the old policy, the teacher and the KL reference. Batches can
skip the frozen blocks (`FrozenStates`) and run a shared context once (`Batch.prefix`). How:
docs/design.md, "Log-probs"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from cast_mlx.engine import fastmath, hostmath
from cast_mlx.engine.head import head_logprobs


@dataclass
class BatchStates:
    """A batch's states entering block `split` (from `FrozenStates.of_rows`)."""

    split: int
    contexts: list[mx.array]  # [len(context_i), H] per row
    tokens: mx.array  # [N, L, H]: the state of completion token j at [:, j]


@dataclass
class Batch:
    """Inputs of one scoring forward, built once per rows/contexts (see `make_batch`)."""

    inputs: mx.array  # int32 [N, S]: context + completion, right-padded
    positions: mx.array  # int32 [N, L]: index of the hidden state that predicts token j
    tokens: mx.array  # int32 [N, L]: completion tokens
    mask: mx.array  # float32 [N, L]
    prefix: list[int] | None = None  # the one context of every row, run once (None: per row)
    states: BatchStates | None = None  # kept frozen-block states: run the top blocks only
    # the shared context's pass by context, kept for the next batch of that context; only
    # for scoring without gradients under unchanged weights (`score_in_buckets`)
    prefix_passes: dict | None = None


def make_batch(
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    share_prefix: bool = True,
    states: BatchStates | None = None,
) -> Batch:
    """Assemble right-padded `context + completion` rows for scoring; with `share_prefix`
    and one context for all rows, the batch is scored after a single pass of that context.
    With `states`, scoring runs from them through the blocks above `states.split`."""
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
    if states is not None:
        widths = [int(c.shape[0]) for c in states.contexts]
        if widths != [len(c) for c in contexts] or tuple(states.tokens.shape[:2]) != (n, length):
            raise ValueError("states: they do not match the batch's contexts and completions")
    return Batch(
        inputs=inputs,
        positions=positions,
        tokens=tokens.astype(mx.int32),
        mask=mask.astype(mx.float32),
        prefix=list(contexts[0]) if shared else None,
        states=states,
    )


# --------------------------------------------------------------------------- frozen blocks

SPLIT_MODEL_TYPES = ("llama", "qwen2", "qwen3")  # backbone: embed, full-attention blocks, norm


def run_blocks(inner: nn.Module, h: mx.array, cache, start: int, stop: int | None = None) -> mx.array:
    """Blocks `start:stop` of an mlx-lm decoder backbone on states `h` (as its own loop does)."""
    layers = inner.layers[start:stop]
    caches = [None] * len(layers) if cache is None else cache[start:stop]
    mask = create_attention_mask(h, caches[0])
    for layer, c in zip(layers, caches):
        h = layer(h, mask, cache=c)
    return h


def lower_states(inner: nn.Module, inputs: mx.array, cache, split: int) -> mx.array:
    """The states entering block `split`: embedding, then the blocks below it."""
    return run_blocks(inner, inner.embed_tokens(inputs), cache, 0, split)


def upper_hidden(inner: nn.Module, states: mx.array, cache, split: int) -> mx.array:
    """The backbone's output (final norm included) from the states entering block `split`."""
    return inner.norm(run_blocks(inner, states, cache, split))


def frozen_blocks(model: nn.Module) -> int:
    """How many bottom blocks hold no trainable parameter, when the backbone is one whose
    forward `lower_states` + `upper_hidden` reproduce exactly (checked on a probe); else 0."""
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if inner is None or getattr(args, "model_type", None) not in SPLIT_MODEL_TYPES or plain_cache(model) is None:
        return 0
    if getattr(inner, "swa_idx", None) is not None or tree_flatten(inner.embed_tokens.trainable_parameters()):
        return 0
    split = 0
    for layer in inner.layers:
        if tree_flatten(layer.trainable_parameters()):
            break
        split += 1
    if split in (0, len(inner.layers)):
        return 0
    probe = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
    training = model.training
    model.eval()  # no LoRA dropout: the two forwards must be the same computation
    try:
        same = mx.array_equal(inner(probe), upper_hidden(inner, lower_states(inner, probe, None, split), None, split))
        return split if bool(same.item()) else 0
    finally:
        model.train(training)


@dataclass
class FrozenStates:
    """The states entering block `split` of a rollout's prompts and completions."""

    split: int
    prompts: list[mx.array]  # [len(prompt_p), H] per prompt
    # [N, L, H]: completion token j of row i at [i, j]; past a row's last fed-back token the
    # values are zeros or states of discarded draws: right padding, never read unmasked
    completions: mx.array
    group_size: int

    def of_rows(self, rows: list[int], length: int) -> BatchStates:
        """The states of completion rows `rows` (contexts: their prompts), cut to `length`."""
        idx = mx.array(rows)
        return BatchStates(
            self.split, [self.prompts[i // self.group_size] for i in rows], self.completions[idx, :length]
        )


def backbone_and_head(model: nn.Module):
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
    context's last state, position j by completion position j - 1. With kept states
    (`batch.states`), the same through the blocks above the split only (the caches of the
    blocks below stay empty)."""
    st = batch.states

    def forward(ids, states, cache=None):  # with kept states: the top blocks only
        return backbone(ids, cache=cache) if st is None else upper_hidden(backbone, states, cache, st.split)

    cache = None if batch.prefix is None else plain_cache(model)
    n, length = batch.tokens.shape
    if cache is None:
        full = None
        if st is not None:  # each row's context states, then its completion's, right-padded
            width = batch.inputs.shape[1]
            full = mx.stack(
                [
                    mx.pad(mx.concatenate([c, t]), [(0, width - c.shape[0] - length), (0, 0)])
                    for c, t in zip(st.contexts, st.tokens)
                ]
            )
        hidden = forward(batch.inputs, full)
        return mx.take_along_axis(hidden, batch.positions[..., None], axis=1)
    used = cache[0 if st is None else st.split :]  # the caches of the blocks that run
    key = tuple(batch.prefix or ())
    if batch.prefix_passes is not None and key in batch.prefix_passes:
        last, kv = batch.prefix_passes[key]
    else:
        prefix = None if st is None else st.contexts[0][None]
        last = forward(mx.array([batch.prefix], dtype=mx.int32), prefix, cache)[:, -1:, :]
        kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in used]
        if batch.prefix_passes is not None:
            batch.prefix_passes[key] = (last, kv)
    last = mx.broadcast_to(last, (n, 1, last.shape[-1]))
    if length == 1:
        return last
    for c, (keys, values) in zip(used, kv):  # gradients flow through the repeat
        c.keys, c.values = mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0)
        c.offset = keys.shape[2]
    rest = forward(batch.tokens[:, :-1], None if st is None else st.tokens[:, :-1], cache)
    return mx.concatenate([last, rest], axis=1)


def _identity(x: mx.array) -> mx.array:
    return x


def _masked_positions(mask: mx.array) -> tuple[mx.array, mx.array, int]:
    """(flat indices of the unmasked positions of `[N, L]` `mask`, for each flat position
    its index among them or their count (a zero slot) when masked, their count)."""
    keep = np.flatnonzero(np.array(mask).reshape(-1) > 0)
    slot = np.full(mask.size, keep.size, dtype=np.int32)
    slot[keep] = np.arange(keep.size, dtype=np.int32)
    return mx.array(keep.astype(np.int32)), mx.array(slot), int(keep.size)


def token_logprobs(
    model: nn.Module,
    batch: Batch,
    temperature: float = 1.0,
    *,
    chunk: int = 64,
    with_entropy: bool = False,
    numpy_passes: bool = False,
):
    """`log_softmax(logits / T)[token]` in float32 for every completion position: `[N, L]`
    (0 where masked). With `with_entropy`, also the entropy of that distribution `[N, L]`.

    The head runs on the unmasked positions only, gathered into chunks of `chunk * N` rows
    (no more than `chunk` positions of every row): padding costs no vocabulary work.

    `numpy_passes` (on the CPU; for scoring, which takes no gradient): the log-softmax's
    passes over the vocabulary, and the blocks' attention softmax and SwiGLU
    (`hostmath.scoring`), run in numpy. Not under a gradient: evaluating part-way inside
    `value_and_grad` keeps every intermediate of the forward alive (an update's memory grew
    ~4x), and numpy's results carry no gradient. Not where a result is compared at the 1e-6
    level with the update's log-probs (the `same` teacher's gaps): the two ways round
    differently (up to ~4e-6)."""
    host = host_passes(numpy_passes)
    with hostmath.scoring(host):
        return _token_logprobs(model, batch, temperature, chunk, with_entropy, host)


def host_passes(numpy_passes: bool) -> bool:
    """Whether scoring asked for `numpy_passes` runs them: on the CPU, unless `hostmath` is off."""
    return numpy_passes and hostmath.enabled and fastmath.on_cpu()


def _token_logprobs(model, batch, temperature, chunk, with_entropy, host):
    inv_temp = 1.0 / temperature
    backbone, head = backbone_and_head(model)
    if backbone is None:  # unknown layout: the full logits, an identity head (fine for small vocabularies)
        states = mx.take_along_axis(model(batch.inputs), batch.positions[..., None], axis=1)
        head = _identity
    else:
        states = _predicting_states(model, backbone, batch)
    n, length = batch.tokens.shape
    keep, slot, _ = _masked_positions(batch.mask)
    hidden = states.reshape(n * length, -1)[keep]
    tokens = batch.tokens.reshape(-1)[keep]
    lp, ent = head_logprobs(head, hidden, tokens, inv_temp, with_entropy, host, chunk * n)
    zero = mx.zeros((1,))  # the slot of every masked position

    def spread(values):
        return mx.concatenate([values, zero])[slot].reshape(n, length) * batch.mask

    return (spread(lp), spread(ent)) if with_entropy else spread(lp)


def length_buckets(
    mask: mx.array, size: int, contexts: list[list[int]] | None = None, context_once: bool = False
) -> list[list[int]]:
    """Row indices in groups of `size` rows of similar completion length, longest first.

    Scoring a group pads only to its own longest row, so sorted groups waste far less work
    on padding than one batch padded to the longest completion of the step.

    With `contexts` (one per row), a bucket holds rows of one context only, so that it can
    be scored after one pass of that context (`make_batch`), and a context's rows are cut
    where that costs the fewest positions (`split_by_cost`): one long completion does not
    pad seven short ones to its length when a second pass of the context is cheaper.
    `context_once`: a context's pass is kept for its next bucket (`Batch.prefix_passes`),
    so a cut costs a pass's fixed overhead only."""
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
        setup = PASS_OVERHEAD + (0 if context_once else len(key))
        buckets += [order[a:b] for a, b in split_by_cost(widths, size, setup)]
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
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    rows: list[int],
    share_prefix: bool = True,
    frozen: FrozenStates | None = None,
) -> Batch:
    """The batch of `rows`, cut to their longest completion (at least one position); with
    `frozen` (the rollout's states; `contexts` must be its prompts), scored from them."""
    idx = mx.array(rows)
    length = max(int(cast(float, mask[idx].sum(axis=1).max().item())), 1)
    states = None if frozen is None else frozen.of_rows(rows, length)
    return make_batch([contexts[i] for i in rows], tokens[idx, :length], mask[idx, :length], share_prefix, states)


def score_in_buckets(
    score,
    contexts: list[list[int]],
    tokens: mx.array,
    mask: mx.array,
    size: int,
    share_prefix: bool = True,
    frozen: FrozenStates | None = None,
    rows: list[int] | None = None,
) -> mx.array:
    """`score(batch) -> [n, l]` applied to length buckets of `size` rows, reassembled `[N, L]`
    (with `share_prefix`, buckets of one context each, scored after one pass of that context,
    kept for its other buckets: `score` takes no gradient and the weights do not change
    between its calls).
    `rows`: score only these (the others are 0); None: all."""
    n, length = tokens.shape
    rows = list(range(n)) if rows is None else rows
    if not rows:
        return mx.zeros((n, length))
    picked = [contexts[i] for i in rows] if share_prefix else None
    buckets = [[rows[j] for j in b] for b in length_buckets(mask[mx.array(rows)], size, picked, context_once=True)]
    passes: dict = {}  # each context's pass, run once for all its buckets
    pieces = []
    for bucket in buckets:
        batch = trimmed_batch(contexts, tokens, mask, bucket, share_prefix, frozen)
        batch.prefix_passes = passes
        lp = score(batch)
        pieces.append(mx.pad(lp, [(0, 0), (0, length - lp.shape[1])]))
    scored = mx.concatenate(pieces, axis=0)
    if len(rows) < n:  # zero rows for the others, in one gather
        scored = mx.concatenate([scored, mx.zeros((1, length))], axis=0)
    where = {i: k for k, i in enumerate(i for bucket in buckets for i in bucket)}
    return scored[mx.array([where.get(i, len(rows)) for i in range(n)])]

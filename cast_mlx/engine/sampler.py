"""The sampler: one token per stream from a `[B, V]` block of logits, and its log-prob.

Sampling and log-probs (`sample_tokens`, pure numpy functions over a `[B, V]` logits block):

- `logprobs[i, t]` is `log_softmax(logits / T)` at the sampled id, in float32: the
  temperature-scaled distribution *before* any top-p/top-k/min-p filtering, i.e. what a
  plain scoring forward pass computes at temperature `T`.
- `T = 0` is greedy decoding (argmax); its log-probs are then taken at `T = 1`.
- The filters' order (`sampling.filter_order`, `config.FILTER_ORDERS`):
  - `joint` (the default, as mlx-lm's `make_sampler`): top-k, top-p and min-p each choose a
    set of tokens from the full temperature-scaled distribution; the sample is drawn from
    their intersection (renormalised).
  - `sequential` (Hugging Face transformers' order, hence TRL's; vLLM's too): top-k first,
    then top-p on the renormalised distribution of what top-k kept, then min-p. Top-p then
    keeps fewer tokens wherever top-k's set holds less than all the mass: for a threshold
    `top_p` the kept mass is `top_p` times top-k's. min-p compares a token with the most
    likely one, which renormalising does not change. (vLLM applies min-p before top-k and
    top-p; with `min_p = 0` the two orders are the same.)
- Draws use inverse-CDF sampling with one uniform number per stream and step, taken from a
  `[P*G, max_new_tokens]` table made from the key up front. A stream's randomness therefore
  does not depend on which other streams share its batch: results are deterministic for a
  fixed key and do not change with `max_batch` or with compaction (up to float rounding of
  batched matmuls). The global `mx.random` state is never used. `stream_offset` and
  `total_streams` let a process sample a slice of a larger rollout (data parallelism):
  its streams then take their rows of the larger table and get the same draws as there.

Why numpy for sampling on the CPU: MLX's CPU `exp` is several times slower than numpy's
vectorised one, and the softmax over a 49k vocabulary for 64 streams is ~3M exponentials per
step. On a GPU (Metal, CUDA) copying `[B, V]` logits to the host every token is a sync and a
copy per token instead, so there `sample_tokens_mx` (the same rule in MLX ops, float32 where
numpy sums in float64) draws on the device, and the decode loop queues step t+1
(`mx.async_eval`) before it reads step t's ids on the host (as mlx-lm's `generate_step`
does): only `[B]` ids and log-probs cross, and the host work overlaps the next step.
`generate_groups(on_device=...)` picks the path (default: on a GPU only); tests run both on
the CPU and check they draw the same ids.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

CDF_BLOCK = 256  # vocabulary block size of the two-level inverse-CDF search
TOP_P_CANDIDATES = 256  # most likely tokens top-p looks at before sorting a whole row


def keep_mask(
    logprobs: np.ndarray, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, filter_order: str = "joint"
):
    """Boolean `[B, V]` of the tokens that top-k, top-p and min-p all keep (None: no filter).

    With `filter_order="joint"` each filter looks at the full distribution `logprobs`
    (normalised log-probs): top-k keeps the tokens at least as likely as the k-th most likely
    one; top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the
    most likely token is always kept); min-p keeps tokens with probability >= `min_p` * the
    top probability. Ties at a threshold are kept. `"sequential"`: top-p reads the
    distribution top-k left, renormalised, so its mass target is `top_p` times the mass of
    top-k's set (ties included).

    top-p needs the most likely tokens in order, but only until their mass reaches `top_p`:
    it sorts the `top_k` largest (or the `TOP_P_CANDIDATES` largest) and sorts the whole
    vocabulary only for a row whose mass is not reached there. With top-k the intersection
    of two prefixes of the same order is the shorter one, so such a row keeps its top-k set.
    The result is the full sort's, at a fraction of its cost (docs/speed.md).
    """
    vocab = logprobs.shape[-1]
    keep = np.ones(logprobs.shape, dtype=bool)
    active = False
    with_k = 0 < top_k < vocab
    largest = None
    if with_k:
        largest = k_largest(logprobs, top_k)
        keep &= logprobs >= largest.min(axis=-1, keepdims=True)
        active = True
    if top_p < 1.0:
        m = top_k if with_k else min(vocab, TOP_P_CANDIDATES)
        if largest is None:
            largest = k_largest(logprobs, m)
        target = np.full(len(logprobs), top_p)
        if with_k and filter_order == "sequential":
            target = top_p * _kept_mass(largest, keep)
        threshold, reached = _top_p_threshold(-np.sort(-largest, axis=-1), target)
        if not with_k and not reached.all():
            rest = ~reached  # the mass lies beyond the candidates: sort those rows fully
            threshold[rest] = _top_p_threshold(-np.sort(-logprobs[rest], axis=-1), target[rest])[0]
            reached[:] = True
        keep &= logprobs >= np.where(reached, threshold, -np.inf)[:, None]
        active = True
    if min_p > 0.0:
        keep &= logprobs >= logprobs.max(axis=-1, keepdims=True) + np.log(min_p)
        active = True
    return keep if active else None


def k_largest(x: np.ndarray, k: int) -> np.ndarray:
    """The `k` largest values of each row of `x` `[B, V]`, unordered `[B, k]`.

    The k largest values lie in the k blocks (of `CDF_BLOCK`) with the largest maxima, so
    when those are few the partition runs over k blocks instead of the whole row: ~4x
    faster for top-k 20 over a 49k vocabulary, and exact (ties included)."""
    rows, vocab = x.shape
    n_blocks = -(-vocab // CDF_BLOCK)
    if 4 * k > n_blocks:
        return np.partition(x, vocab - k, axis=-1)[:, vocab - k :]
    pad = n_blocks * CDF_BLOCK - vocab
    blocks = (np.pad(x, ((0, 0), (0, pad)), constant_values=-np.inf) if pad else x).reshape(rows, n_blocks, -1)
    best = np.argpartition(blocks.max(axis=-1), n_blocks - k, axis=-1)[:, n_blocks - k :]
    candidates = np.take_along_axis(blocks, best[:, :, None], axis=1).reshape(rows, -1)
    return np.partition(candidates, candidates.shape[1] - k, axis=-1)[:, candidates.shape[1] - k :]


def _kept_mass(largest: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The probability mass `[B]` (float64) of top-k's set: the k largest log-probs of each
    row (`largest`), plus the tokens tied with the k-th that `keep` also holds."""
    kth = largest.min(axis=-1)
    ties = keep.sum(axis=-1) - largest.shape[1]
    return np.exp(largest.astype(np.float64)).sum(axis=-1) + ties * np.exp(kth.astype(np.float64))


def _top_p_threshold(desc: np.ndarray, top_p) -> tuple[np.ndarray, np.ndarray]:
    """From log-probs sorted most likely first `[B, m]`: the log-prob of the last token that
    top-p keeps, and whether the mass reached `top_p` (a number, or one per row) within these
    `m` (else the kept set may extend past them)."""
    probs = np.exp(desc.astype(np.float64))
    mass_before = np.cumsum(probs, axis=-1) - probs
    inside = (mass_before < np.reshape(top_p, (-1, 1))).sum(axis=-1)
    n_keep = np.maximum(inside, 1)
    return desc[np.arange(len(desc)), n_keep - 1], inside < desc.shape[-1]


def inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """For each row of non-negative `weights` `[B, V]` (each row with a positive weight),
    the first index whose cumulative weight exceeds `uniforms * total`: a draw from the
    normalised weights. The chosen index always has a non-zero weight.

    Two levels (cumulative block sums, then a cumulative sum inside the chosen block) keep
    the prefix sums short and in float64 instead of one float32 cumsum over the vocabulary.
    """
    rows, vocab = weights.shape
    pad = (-vocab) % CDF_BLOCK
    if pad:
        weights = np.pad(weights, ((0, 0), (0, pad)))
    blocks = weights.reshape(rows, -1, CDF_BLOCK)
    cum_blocks = np.cumsum(blocks.sum(axis=-1, dtype=np.float64), axis=-1)
    point = uniforms.astype(np.float64) * cum_blocks[:, -1]  # < total, since uniforms < 1
    block = np.minimum((cum_blocks <= point[:, None]).sum(axis=-1), cum_blocks.shape[1] - 1)
    r = np.arange(rows)
    before = np.where(block > 0, cum_blocks[r, block - 1], 0.0)
    inner = blocks[r, block]
    cum_inner = before[:, None] + np.cumsum(inner, axis=-1, dtype=np.float64)
    offset = (cum_inner <= point[:, None]).sum(axis=-1)
    # Rounding can put the search past the block's last non-zero weight: step back to it.
    last = CDF_BLOCK - 1 - np.argmax(inner[:, ::-1] > 0, axis=-1)
    return block * CDF_BLOCK + np.minimum(offset, last)


def sample_tokens(
    logits: np.ndarray,
    uniforms: np.ndarray,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    filter_order: str = "joint",
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one id per row of `logits` `[B, V]`; returns `(ids int32 [B], logprobs f32 [B])`.

    `uniforms` `[B]` are numbers in [0, 1), one per row: the draw is the inverse CDF of the
    (filtered) distribution at that point, so each row's result depends only on its own
    logits and number. `logprobs` are `log_softmax(logits / T)` at the ids, before
    filtering. `temperature == 0`: argmax, with log-probs at `T = 1`.
    """
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 0 and temperature != 1:
        z = z / np.float32(temperature)
    rows = np.arange(z.shape[0])
    top = z.max(axis=-1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError(f"logits: row {int(np.argmin(np.isfinite(top[:, 0])))} has no finite maximum (NaN/inf)")
    weights = np.exp(z - top)
    lse = top[:, 0] + np.log(weights.sum(axis=-1, dtype=np.float64)).astype(np.float32)
    if temperature == 0:
        ids = np.argmax(z, axis=-1)
    else:
        keep = keep_mask(z - lse[:, None], top_p, top_k, min_p, filter_order)
        if keep is not None:
            weights = np.where(keep, weights, np.float32(0))
        ids = inverse_cdf(weights, np.asarray(uniforms))
    return ids.astype(np.int32), (z[rows, ids] - lse).astype(np.float32)


def keep_mask_mx(
    lp: mx.array, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, filter_order: str = "joint"
) -> mx.array | None:
    """`keep_mask` in MLX ops (float32 prefix sums)."""
    vocab = lp.shape[-1]
    keep = None
    if 0 < top_k < vocab:
        kth = mx.partition(lp, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
        keep = lp >= kth
    if top_p < 1.0:
        desc = -mx.sort(-lp, axis=-1)
        probs = mx.exp(desc)
        cum = blocked_cumsum(probs)
        target: float | mx.array = top_p
        if keep is not None and filter_order == "sequential":  # top-p over top-k's set, renormalised
            target = top_p * mx.take_along_axis(cum, keep.sum(axis=-1, keepdims=True) - 1, axis=-1)
        mass_before = cum - probs
        n_keep = mx.maximum((mass_before < target).sum(axis=-1), 1)
        threshold = mx.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
        keep = lp >= threshold if keep is None else keep & (lp >= threshold)
    if min_p > 0.0:
        floor = lp >= lp.max(axis=-1, keepdims=True) + float(np.log(min_p))
        keep = floor if keep is None else keep & floor
    return keep


def blocked_sum(x: mx.array) -> mx.array:
    """Row sums `[B]` of `[B, V]` as sums of `CDF_BLOCK`-wide blocks (closer to float64 than
    one float32 pass over the vocabulary)."""
    pad = (-x.shape[-1]) % CDF_BLOCK
    return mx.pad(x, [(0, 0), (0, pad)]).reshape(x.shape[0], -1, CDF_BLOCK).sum(axis=-1).sum(axis=-1)


def blocked_cumsum(x: mx.array) -> mx.array:
    """Row prefix sums `[B, V]` in two levels: block totals, then inside each block."""
    rows, vocab = x.shape
    pad = (-vocab) % CDF_BLOCK
    blocks = mx.pad(x, [(0, 0), (0, pad)]).reshape(rows, -1, CDF_BLOCK)
    totals = mx.cumsum(blocks.sum(axis=-1), axis=-1)
    before = mx.concatenate([mx.zeros((rows, 1)), totals[:, :-1]], axis=1)
    return (before[..., None] + mx.cumsum(blocks, axis=-1)).reshape(rows, -1)[:, :vocab]


def inverse_cdf_mx(weights: mx.array, uniforms: mx.array) -> mx.array:
    """`inverse_cdf` in MLX ops (float32 prefix sums: GPUs have no float64)."""
    rows, vocab = weights.shape
    pad = (-vocab) % CDF_BLOCK
    if pad:
        weights = mx.pad(weights, [(0, 0), (0, pad)])
    blocks = weights.reshape(rows, -1, CDF_BLOCK)
    cum_blocks = mx.cumsum(blocks.sum(axis=-1), axis=-1)
    point = uniforms * cum_blocks[:, -1]
    block = mx.minimum((cum_blocks <= point[:, None]).sum(axis=-1), cum_blocks.shape[1] - 1)
    r = mx.arange(rows)
    before = mx.where(block > 0, cum_blocks[r, mx.maximum(block - 1, 0)], 0.0)
    inner = blocks[r, block]
    cum_inner = before[:, None] + mx.cumsum(inner, axis=-1)
    offset = (cum_inner <= point[:, None]).sum(axis=-1)
    last = CDF_BLOCK - 1 - mx.argmax(inner[:, ::-1] > 0, axis=-1)
    return block * CDF_BLOCK + mx.minimum(offset, last)


def sample_tokens_mx(
    logits: mx.array,
    uniforms: mx.array,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    filter_order: str = "joint",
) -> tuple[mx.array, mx.array]:
    """`sample_tokens` on the device: `(ids int32 [B], logprobs float32 [B])`, lazy.
    Non-finite logits are not checked here (that would sync); the host path raises."""
    z = logits.astype(mx.float32)
    if temperature != 0 and temperature != 1:
        z = z / temperature
    top = z.max(axis=-1, keepdims=True)
    weights = mx.exp(z - top)
    lse = top[:, 0] + mx.log(blocked_sum(weights))
    if temperature == 0:
        ids = mx.argmax(z, axis=-1)
    else:
        keep = keep_mask_mx(z - lse[:, None], top_p, top_k, min_p, filter_order)
        if keep is not None:
            weights = mx.where(keep, weights, 0.0)
        ids = inverse_cdf_mx(weights, uniforms)
    ids = ids.astype(mx.int32)
    return ids, mx.take_along_axis(z, ids[:, None], axis=-1)[:, 0] - lse


def uniform_table(key, rows: int, steps: int) -> np.ndarray:
    """`[rows, steps]` float32 uniforms in [0, 1) from `key` (an `mx.random` key or an int
    seed): the random numbers of every stream and step of one rollout."""
    if not isinstance(key, mx.array):
        key = mx.random.key(int(key))
    return np.array(mx.random.uniform(shape=(rows, steps), key=key), dtype=np.float32)

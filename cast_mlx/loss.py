"""The clipped policy loss (spec section 5) and the per-step diagnostics (section 7).

`policy_loss` is a pure function of per-token log-probs, advantages and masks; it knows
nothing of models. Shapes: `[N, L]` for every per-token input, `[N]` for `truncated`.

Rows without a loss-bearing token (all padding, or truncated with `mask_truncated`)
count as absent for every aggregation: they add nothing to the numerator and are not
counted among the completions. So padding rows or columns never change the loss.

Gradient accumulation: the normaliser of each aggregation is passed in as a `LossNorm`
computed once over the *whole* accumulated batch (`loss_norm(full_mask, ...)` or
`merge_norms` of the micro-batches' norms). Each micro-batch loss is then a partial sum
and the micro-batch losses add up to the full-batch loss. The token metrics are divided
by the same global token count, so they add up across micro-batches too. The same
mechanism lets the trainer skip zero-advantage rows (zero-variance groups under GRPO /
RLSD) and still get the full-batch loss, as long as `beta = 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cast_mlx import blas  # noqa: F401  (loads a fast BLAS before mlx.core)

import mlx.core as mx

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNorm:
    """Normalisers of the loss over the whole (accumulated) batch.

    num_tokens: loss-bearing tokens (divides `token-mean` and the token metrics).
    num_seqs:   completions with at least one loss-bearing token (divides the two
                `seq-mean-*` aggregations).
    max_len:    the "max completion length" of Dr. GRPO (`seq-mean-token-sum-norm`); pass
                the generation limit (`max_tokens`) for the paper's constant normaliser.
    Fields are floats or scalar `mx.array`s.
    """

    num_tokens: float | mx.array
    num_seqs: float | mx.array
    max_len: float | mx.array


def loss_mask(mask: mx.array, truncated: mx.array | None = None, mask_truncated: bool = True) -> mx.array:
    """`[N, L]` float32 mask of the tokens that carry loss: `mask`, minus the rows of
    truncated completions when `mask_truncated`."""
    m = (mask != 0).astype(mx.float32)
    if truncated is not None and mask_truncated:
        if truncated.shape != (mask.shape[0],):
            raise ValueError(f"truncated: expected shape [{mask.shape[0]}], got {tuple(truncated.shape)}")
        m = m * (truncated == 0).astype(mx.float32)[:, None]
    return m


def loss_norm(
    mask: mx.array,
    truncated: mx.array | None = None,
    *,
    mask_truncated: bool = True,
    max_len: float | None = None,
) -> LossNorm:
    """The `LossNorm` of a batch; call it on the full batch before splitting into
    micro-batches. `max_len=None` uses the longest loss-bearing completion."""
    m = loss_mask(mask, truncated, mask_truncated)
    lengths = mx.sum(m, axis=1)
    longest = mx.max(lengths) if max_len is None else mx.array(float(max_len))
    return LossNorm(num_tokens=mx.sum(lengths), num_seqs=mx.sum(lengths > 0).astype(mx.float32), max_len=longest)


def merge_norms(norms) -> LossNorm:
    """The `LossNorm` of a batch made of micro-batches with these norms (sums and a max)."""
    norms = list(norms)
    if not norms:
        raise ValueError("merge_norms: need at least one LossNorm")
    tokens = sum(mx.array(n.num_tokens) for n in norms)
    seqs = sum(mx.array(n.num_seqs) for n in norms)
    longest = norms[0].max_len
    for n in norms[1:]:
        longest = mx.maximum(longest, n.max_len)
    return LossNorm(num_tokens=tokens, num_seqs=seqs, max_len=mx.array(longest))


def _check_shapes(logp, old_logp, advantages, mask, ref_logp) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape [N, L], got {tuple(mask.shape)}")
    for field, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if x is not None and x.shape != mask.shape:
            raise ValueError(f"{field}: shape {tuple(x.shape)} differs from mask {tuple(mask.shape)}")


def policy_loss(
    logp: mx.array,
    old_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg: str = "seq-mean-token-mean",
    truncated: mx.array | None = None,
    mask_truncated: bool = True,
    beta: float = 0.0,
    ref_logp: mx.array | None = None,
    norm: LossNorm | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped-surrogate loss (scalar) and metrics (dict of scalar arrays).

    Per token: `ratio = exp(logp - old_logp)`, `L = -min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A)`, plus `beta * k3` with `k3 = exp(ref - logp) - (ref - logp) - 1` when
    `beta > 0`. `old_logp`, `advantages` and `ref_logp` are constants (stop-gradient).
    Aggregations (`loss_agg`), with the normalisers from `norm` (default: this batch's):
    - "seq-mean-token-mean": mean over each completion's tokens, summed and divided by
      `num_seqs`;
    - "token-mean": token sum / `num_tokens`;
    - "seq-mean-token-sum-norm" (Dr. GRPO): token sum / (`num_seqs * max_len`).
    Metrics: `clip_frac_low` (ratio < 1-eps_low and A < 0), `clip_frac_high` (ratio >
    1+eps_high and A > 0), `ratio_mean`, and `kl_mean` when `ref_logp` is given; all are
    sums over loss-bearing tokens divided by `norm.num_tokens`.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg: {loss_agg!r} is not one of {list(LOSS_AGGS)}")
    if beta < 0:
        raise ValueError(f"beta: must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when beta > 0 (k3 KL to the reference model)")
    _check_shapes(logp, old_logp, advantages, mask, ref_logp)

    m = loss_mask(mask, truncated, mask_truncated)
    on = m > 0
    if norm is None:
        norm = loss_norm(mask, truncated, mask_truncated=mask_truncated)
    tokens = mx.maximum(mx.array(norm.num_tokens, dtype=mx.float32), 1.0)
    seqs = mx.maximum(mx.array(norm.num_seqs, dtype=mx.float32), 1.0)

    adv = mx.stop_gradient(advantages.astype(mx.float32))
    # Padding positions get ratio 1 (log-ratio 0) so garbage there cannot leak NaN/inf.
    log_ratio = mx.where(on, logp - mx.stop_gradient(old_logp), 0.0)
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -mx.minimum(ratio * adv, clipped * adv)

    metrics = {}
    if ref_logp is not None:
        delta = mx.where(on, mx.stop_gradient(ref_logp) - logp, 0.0)
        kl = mx.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl_mean"] = mx.stop_gradient(mx.sum(kl * m) / tokens)

    per_token = per_token * m
    if loss_agg == "token-mean":
        loss = mx.sum(per_token) / tokens
    elif loss_agg == "seq-mean-token-mean":
        lengths = mx.maximum(mx.sum(m, axis=1), 1.0)
        loss = mx.sum(mx.sum(per_token, axis=1) / lengths) / seqs
    else:
        max_len = mx.maximum(mx.array(norm.max_len, dtype=mx.float32), 1.0)
        loss = mx.sum(per_token) / (seqs * max_len)

    r = mx.stop_gradient(ratio)
    metrics["clip_frac_low"] = mx.sum(((r < 1.0 - eps_low) & (adv < 0)) * m) / tokens
    metrics["clip_frac_high"] = mx.sum(((r > 1.0 + eps_high) & (adv > 0)) * m) / tokens
    metrics["ratio_mean"] = mx.sum(r * m) / tokens
    return loss, metrics


# --------------------------------------------------------------------------- section 7


def _share(count: mx.array, total: mx.array) -> mx.array:
    return count / mx.maximum(total, 1.0)


def cast_diagnostics(
    rewards: mx.array,
    base_adv: mx.array,
    gaps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    a_max: float,
    group_size: int,
) -> dict[str, mx.array]:
    """Section-7 diagnostics of one batch (dict of scalar arrays; entropy is elsewhere).

    - `groups/all_correct`, `groups/all_wrong`, `groups/mixed`: fractions of groups
      (a completion is correct when its reward is > 0).
    - the 2x2 gap table, for `traj` in {correct, wrong} and `side` in {pos (g > 0), neg
      (g < 0)}: `gap/{traj}_{side}/share` (of all completion tokens), `/abs_mean` (mean
      |g| in the cell), `/flipped` (share of the cell's tokens whose advantage has the
      sign opposite to their base advantage). `gap/zero_share`: tokens with g = 0.
    - `flip/down_share`, `flip/up_share`: shares of all tokens flipped down (B > 0, A < 0)
      and up (B < 0, A > 0).
    - `adv/mean`, `adv/min`, `adv/max` over completion tokens, and `adv/at_a_max_share`:
      tokens with |A| >= a_max.
    """
    m = (mask != 0).astype(mx.float32)
    total = mx.sum(m)
    grouped = rewards.reshape(-1, group_size)
    flat = mx.max(grouped, axis=1) == mx.min(grouped, axis=1)
    first_correct = grouped[:, 0] > 0
    out = {
        "groups/all_correct": mx.mean(flat & first_correct),
        "groups/all_wrong": mx.mean(flat & ~first_correct),
        "groups/mixed": mx.mean(~flat),
    }

    b = base_adv[:, None]
    flipped = (advantages * b < 0).astype(mx.float32) * m
    correct = (rewards > 0)[:, None]
    for traj, rows in (("correct", correct), ("wrong", ~correct)):
        for side, toks in (("pos", gaps > 0), ("neg", gaps < 0)):
            cell = (rows & toks).astype(mx.float32) * m
            n = mx.sum(cell)
            out[f"gap/{traj}_{side}/share"] = _share(n, total)
            out[f"gap/{traj}_{side}/abs_mean"] = _share(mx.sum(mx.abs(gaps) * cell), n)
            out[f"gap/{traj}_{side}/flipped"] = _share(mx.sum(flipped * cell), n)
    out["gap/zero_share"] = _share(mx.sum((gaps == 0) * m), total)

    out["flip/down_share"] = _share(mx.sum(flipped * (b > 0)), total)
    out["flip/up_share"] = _share(mx.sum(flipped * (b < 0)), total)

    on = m > 0
    has = total > 0
    out["adv/mean"] = _share(mx.sum(advantages * m), total)
    out["adv/min"] = mx.where(has, mx.min(mx.where(on, advantages, mx.inf)), 0.0)
    out["adv/max"] = mx.where(has, mx.max(mx.where(on, advantages, -mx.inf)), 0.0)
    out["adv/at_a_max_share"] = _share(mx.sum((mx.abs(advantages) >= a_max) * m), total)
    return out

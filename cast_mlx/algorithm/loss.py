"""The clipped policy loss (spec section 5), its aggregations (registered by name) and their
normalisers (`LossNorm`), computed over the whole batch so that micro-batch losses add up to
the full-batch loss. Why: docs/design.md, "The loss and gradient accumulation"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import mlx.core as mx


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


# --------------------------------------------------------------------------- aggregations

# How per-token losses become one number, by name (after verl's `agg_loss` modes). Each
# takes the masked per-token losses `[N, L]`, the loss mask and the batch's `LossNorm`.
_AGGREGATIONS: dict[str, Callable[[mx.array, mx.array, LossNorm], mx.array]] = {}


def register_loss_agg(name: str):
    def decorate(fn):
        _AGGREGATIONS[name] = fn
        return fn

    return decorate


def _count(x) -> mx.array:
    return mx.maximum(mx.array(x, dtype=mx.float32), 1.0)


@register_loss_agg("seq-mean-token-mean")
def _seq_mean_token_mean(per_token, m, norm):
    lengths = mx.maximum(mx.sum(m, axis=1), 1.0)
    return mx.sum(mx.sum(per_token, axis=1) / lengths) / _count(norm.num_seqs)


@register_loss_agg("token-mean")
def _token_mean(per_token, m, norm):
    return mx.sum(per_token) / _count(norm.num_tokens)


@register_loss_agg("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(per_token, m, norm):  # Dr. GRPO
    return mx.sum(per_token) / (_count(norm.num_seqs) * _count(norm.max_len))


LOSS_AGGS = tuple(_AGGREGATIONS)  # the names, in registration order (config lists the same)
IMPORTANCE_LEVELS = ("token", "sequence")  # the ratio per token (PPO/GRPO) or per completion (GSPO)


def check_loss_options(
    *, eps_low: float, eps_high: float, loss_agg: str, beta: float, importance_level: str = "token"
) -> None:
    """The one validation of the loss's static options (eager and compiled)."""
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level: {importance_level!r} is not one of {list(IMPORTANCE_LEVELS)}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg: {loss_agg!r} is not one of {list(LOSS_AGGS)}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"eps_low/eps_high: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if beta < 0:
        raise ValueError(f"beta: must be >= 0, got {beta}")


# --------------------------------------------------------------------------- the loss


def rows_with_loss(
    advantages: mx.array, mask: mx.array, truncated: mx.array, *, beta: float, mask_truncated: bool
) -> list[int]:
    """The rows whose forward/backward can change the loss: a non-zero advantage somewhere
    (any row with tokens when `beta > 0`: the KL term), and not truncated when those are
    masked. The others add nothing to the loss or the gradient, so the trainer skips them;
    the normaliser stays the whole batch's."""
    carries = (mx.abs(advantages) * mask).sum(axis=1) > 0
    if beta > 0:
        carries = mask.sum(axis=1) > 0
    if mask_truncated:
        carries = mx.logical_and(carries, truncated == 0)
    return [i for i, c in enumerate(cast("list[bool]", carries.tolist())) if c]


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
    importance_level: str = "token",
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped-surrogate loss (scalar) and metrics (dict of scalar arrays).

    Per token: `ratio = exp(logp - old_logp)`, `L = -min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A)`, plus `beta * k3` with `k3 = exp(ref - logp) - (ref - logp) - 1` when
    `beta > 0`. `old_logp`, `advantages` and `ref_logp` are constants (stop-gradient).
    `importance_level="sequence"` (GSPO, in its per-token form that keeps token-level
    advantages): every token of a completion takes the completion's length-normalised ratio
    `s = exp(mean_t(logp - old_logp))` as its value, `s * exp(logp - sg(logp))`, so the clip
    acts per completion and each token's gradient is `s * A_t * grad logp_t`.
    Aggregations (`loss_agg`), with the normalisers from `norm` (default: this batch's):
    - "seq-mean-token-mean": mean over each completion's tokens, summed and divided by
      `num_seqs`;
    - "token-mean": token sum / `num_tokens`;
    - "seq-mean-token-sum-norm" (Dr. GRPO): token sum / (`num_seqs * max_len`).
    Metrics: `clip_frac_low` (ratio < 1-eps_low and A < 0), `clip_frac_high` (ratio >
    1+eps_high and A > 0), `ratio_mean`, and `kl_mean` when `ref_logp` is given; all are
    sums over loss-bearing tokens divided by `norm.num_tokens`.
    """
    check_loss_options(
        eps_low=eps_low, eps_high=eps_high, loss_agg=loss_agg, beta=beta, importance_level=importance_level
    )
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when beta > 0 (k3 KL to the reference model)")
    _check_shapes(logp, old_logp, advantages, mask, ref_logp)

    m = loss_mask(mask, truncated, mask_truncated)
    on = m > 0
    if norm is None:
        norm = loss_norm(mask, truncated, mask_truncated=mask_truncated)
    tokens = _count(norm.num_tokens)

    adv = mx.stop_gradient(advantages.astype(mx.float32))
    # Padding positions get ratio 1 (log-ratio 0) so garbage there cannot leak NaN/inf.
    log_ratio = mx.where(on, logp - mx.stop_gradient(old_logp), 0.0)
    if importance_level == "sequence":
        seq = mx.sum(log_ratio, axis=1, keepdims=True) / mx.maximum(mx.sum(m, axis=1, keepdims=True), 1.0)
        log_ratio = mx.where(on, logp - mx.stop_gradient(logp) + mx.stop_gradient(seq), 0.0)
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

    loss = _AGGREGATIONS[loss_agg](per_token * m, m, norm)

    r = mx.stop_gradient(ratio)
    metrics["clip_frac_low"] = mx.sum(((r < 1.0 - eps_low) & (adv < 0)) * m) / tokens
    metrics["clip_frac_high"] = mx.sum(((r > 1.0 + eps_high) & (adv > 0)) * m) / tokens
    metrics["ratio_mean"] = mx.sum(r * m) / tokens
    return loss, metrics

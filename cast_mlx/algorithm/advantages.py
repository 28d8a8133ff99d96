"""The math of the advantage estimators for GRPO, CAST (the paper's and its veRL port's) and
RLSD (spec sections 2, 4 and 4b): base advantages, the token rules and the shaping around
them. Pure MLX functions; `cast_mlx.algorithm.estimators` registers the kernels built from
them by name.

Inputs
- `rewards` `[N]` float32, `N = P * G`; the `G` completions of a prompt are contiguous
  (rows `p*G .. p*G+G-1`).
- `gaps` `[N, L]` float32: teacher log-prob minus old-policy log-prob of each sampled
  token (`g > 0`: teacher-positive). GRPO ignores it.
- `mask` `[N, L]`: 1 for real completion tokens, 0 for padding.

Outputs
- token advantages `[N, L]` float32, exactly 0 where `mask` is 0;
- base advantages `[N]` float32 (one per completion, section 2).

Conventions that the spec leaves open (the PyTorch reference in `tests/reference/`
follows the same ones):
- A group is *zero-variance* when all its rewards are equal (`zero_variance_groups`, the
  one place that decides it). Such a group is "all correct" when the common reward is > 0
  and "all wrong" otherwise (rewards are 0/1). Zero-variance groups are always detected
  per group, whatever `scale_rewards` is.
- `scale_rewards="batch"`: mixed groups get `(r - mean of the group) / (std of all N
  rewards of the batch, ddof=1, + eps)`; the batch std is only a scale, it does not
  decide which groups are zero-variance.
- `flip="down"` / `flip="none"` (and tokens inside the dead-band `|g| <= flip_deadband`):
  a token that would flip but is not allowed to follows the "otherwise" row of the
  section-4 table, i.e. `A = B * max(0, 1 + lam * (clip(exp(s*g), box) - 1))` with `s =
  sign(B)`: its advantage keeps the trajectory's sign and is shrunk (box low edge).
- `a_max` bounds only the estimators whose facts say `clips_at_a_max`; the others have
  no final clip, as in their papers (GRPO: `A = B`; RLSD: `A = B * ((1-lam_t) +
  lam_t*w)`).
- `zero_var_base` applies only where the facts say `zero_var_base`; the others give
  exactly 0 to zero-variance groups (so the trainer can skip those rows, see
  `zero_variance_groups`).
"""

from __future__ import annotations

import mlx.core as mx

from cast_mlx.algorithm.facts import SCALE_REWARDS

FLIP_MODES = ("both", "down", "none")
LAMBDA_SCHEDULES = ("constant", "linear_decay")


# --------------------------------------------------------------------------- checks


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}: {value!r} is not one of {list(choices)}")


def _check_box(field: str, box) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected two numbers (low, high), got {box!r}") from None
    if not 0.0 < lo <= hi:
        raise ValueError(f"{field}: need 0 < low <= high, got ({lo}, {hi})")
    return lo, hi


def check_inputs(rewards: mx.array, gaps: mx.array, mask: mx.array, group_size: int) -> None:
    """Raise a ValueError naming the field if the shapes do not fit together."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected shape [N], got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size: need at least 2 completions per prompt, got {group_size}")
    n = rewards.shape[0]
    if n == 0 or n % group_size:
        raise ValueError(f"rewards: {n} rows is not a positive multiple of group_size={group_size}")
    if mask.ndim != 2 or mask.shape[0] != n:
        raise ValueError(f"mask: expected shape [{n}, L], got {tuple(mask.shape)}")
    if gaps.shape != mask.shape:
        raise ValueError(f"gaps: shape {tuple(gaps.shape)} differs from mask {tuple(mask.shape)}")


# --------------------------------------------------------------------------- section 2


def zero_variance_groups(rewards: mx.array, group_size: int) -> mx.array:
    """`[P]` bool: True for groups whose `group_size` rewards are all equal.

    Under GRPO and RLSD these rows get advantage exactly 0, so the trainer may skip their
    forward/backward (with beta = 0 and an explicit loss `norm`, see `loss.loss_norm`).
    """
    if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: shape {tuple(rewards.shape)} is not [P * group_size] with group_size={group_size}")
    grouped = rewards.reshape(-1, group_size)
    return mx.max(grouped, axis=1) == mx.min(grouped, axis=1)


REWARD_STDS = ("sample", "population")
POPULATION_STD_FLOOR = 1e-6  # the veRL port clamps its population std here instead of adding eps


def check_base_params(*, scale_rewards: str, eps: float, reward_std: str = "sample") -> None:
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    _check_choice("reward_std", reward_std, REWARD_STDS)
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


def base_advantages(
    rewards: mx.array,
    *,
    group_size: int,
    scale_rewards: str,
    zero_var_value: float,
    eps: float = 1e-4,
    reward_std: str = "sample",
) -> mx.array:
    """`[N]` base advantage `B_i` of every completion (spec section 2).

    Mixed groups: reward minus the group mean, divided by the group's std for "group" or
    by the std of all N rewards for "batch", not divided for "none". The std is Bessel's
    plus `eps` (`reward_std="sample"`), or the population std (ddof 0) floored at 1e-6
    (`"population"`, the authors' veRL port). Zero-variance groups: `+zero_var_value` if
    their common reward is > 0, else `-zero_var_value` (pass 0 for GRPO / RLSD: exactly 0).
    """
    check_base_params(scale_rewards=scale_rewards, eps=eps, reward_std=reward_std)
    rewards = rewards.astype(mx.float32)
    grouped = rewards.reshape(-1, group_size)  # [P, G]
    centered = grouped - mx.mean(grouped, axis=1, keepdims=True)
    if scale_rewards != "none":
        values, axis = (grouped, 1) if scale_rewards == "group" else (rewards, None)
        if reward_std == "population":
            std = mx.maximum(mx.sqrt(mx.var(values, axis=axis, keepdims=True, ddof=0)), POPULATION_STD_FLOOR)
        else:
            std = mx.sqrt(mx.var(values, axis=axis, keepdims=True, ddof=1)) + eps
        centered = centered / std

    flat = zero_variance_groups(rewards, group_size)[:, None]  # [P, 1]
    flat_value: mx.array | float
    if zero_var_value:
        # +value for an all-correct group, -value for an all-wrong one.
        flat_value = mx.where(grouped[:, :1] > 0, zero_var_value, -zero_var_value)
    else:
        flat_value = 0.0  # (a plain 0.0, not -0.0)
    base = mx.where(flat, flat_value, centered)
    return base.reshape(-1)


def scheduled_lambda(
    step: int,
    start: float,
    schedule: str,
    decay_steps: int,
    start_field: str = "cast_lambda",
    steps_field: str = "lambda_decay_steps",
) -> float:
    """`start` for "constant"; `start * max(0, 1 - step / decay_steps)` for "linear_decay".
    The two field names are the recipe fields that an error names."""
    _check_choice("lambda_schedule", schedule, LAMBDA_SCHEDULES)
    if start < 0:
        raise ValueError(f"{start_field}: must be >= 0, got {start}")
    if schedule == "constant":
        return float(start)
    if decay_steps <= 0:
        raise ValueError(f"{steps_field}: must be > 0, got {decay_steps}")
    return float(start) * max(0.0, 1.0 - step / decay_steps)


# --------------------------------------------------------------------------- section 4


def check_cast_params(*, correct_box, wrong_box, a_max, flip, flip_deadband):
    """Validate CAST's static token parameters; returns the two boxes as float pairs."""
    _check_choice("flip", flip, FLIP_MODES)
    boxes = _check_box("correct_box", correct_box), _check_box("wrong_box", wrong_box)
    if not a_max > 0:
        raise ValueError(f"a_max: must be > 0, got {a_max}")
    if not flip_deadband >= 0:
        raise ValueError(f"flip_deadband: must be >= 0, got {flip_deadband}")
    return boxes


def cast_token_advantages(
    base: mx.array,
    gaps: mx.array,
    mask: mx.array,
    lam,
    *,
    correct_box: tuple[float, float] = (0.8, 1.05),
    wrong_box: tuple[float, float] = (0.95, 1.2),
    a_max: float = 1.2,
    flip: str = "both",
    flip_deadband: float = 0.0,
) -> mx.array:
    """`[N, L]` CAST token advantages from base advantages `[N]` and gaps (section 4 table).

    `lam` is the (already scheduled) lambda, a float or a scalar array (an array keeps a
    compiled caller from recompiling as lambda decays).

    With `s = sign(B)`, a token whose gap disagrees with its trajectory (`s*g < 0`,
    outside the dead-band, flips allowed) is *flipped*: it is weighted as if it were in the
    opposite trajectory, `A = -B * max(0, 1 + lam*(clip(exp(-s*g), 1, hi') - 1))` where
    `hi'` is the high edge of the opposite trajectory's box (wrong box for a correct
    completion: down-flip; correct box for a wrong one: up-flip). Every other token gets
    `A = B * max(0, 1 + lam*(clip(exp(s*g), box) - 1))` with its own trajectory's box.
    Finally `A` is clipped to `[-a_max, a_max]`, and is 0 where `B = 0` or `mask = 0`.
    """
    (cl, ch), (wl, wh) = check_cast_params(
        correct_box=correct_box, wrong_box=wrong_box, a_max=a_max, flip=flip, flip_deadband=flip_deadband
    )
    gaps = gaps.astype(mx.float32)
    b = base.astype(mx.float32)[:, None]  # [N, 1]
    s = mx.sign(b)
    correct = b > 0
    signed_gap = s * gaps  # > 0: the teacher agrees with the verifier

    keep_w = mx.where(correct, mx.clip(mx.exp(signed_gap), cl, ch), mx.clip(mx.exp(signed_gap), wl, wh))
    keep = b * mx.maximum(0.0, 1.0 + lam * (keep_w - 1.0))

    # Flipped tokens use the opposite trajectory's high edge and the opposite sign.
    flip_hi = mx.where(correct, wh, ch)
    flip_w = mx.minimum(mx.maximum(mx.exp(-signed_gap), 1.0), flip_hi)
    flipped = -b * mx.maximum(0.0, 1.0 + lam * (flip_w - 1.0))

    may_flip = (signed_gap < 0) & (mx.abs(gaps) > flip_deadband)
    if flip == "down":
        may_flip = may_flip & correct
    elif flip == "none":
        may_flip = mx.zeros_like(may_flip)

    adv = mx.clip(mx.where(may_flip, flipped, keep), -a_max, a_max)
    return mx.where((mask != 0) & (b != 0), adv, 0.0)


def check_rlsd_params(*, rlsd_eps_w) -> None:
    if not 0.0 <= rlsd_eps_w < 1.0:
        raise ValueError(f"rlsd_eps_w: must be in [0, 1), got {rlsd_eps_w}")


def rlsd_token_advantages(base: mx.array, gaps: mx.array, mask: mx.array, lam_t, *, eps_w: float = 0.2) -> mx.array:
    """`[N, L]` RLSD token advantages: `B * ((1 - lam_t) + lam_t * clip(exp(s*g), 1-eps_w, 1+eps_w))`.

    No flips and no final clip; 0 where `B = 0` or `mask = 0`.
    """
    check_rlsd_params(rlsd_eps_w=eps_w)
    b = base.astype(mx.float32)[:, None]
    w = mx.clip(mx.exp(mx.sign(b) * gaps.astype(mx.float32)), 1.0 - eps_w, 1.0 + eps_w)
    adv = b * ((1.0 - lam_t) + lam_t * w)
    return mx.where((mask != 0) & (b != 0), adv, 0.0)


# --------------------------------------------------------------------------- shaping


def check_ratio_band(*, ratio_band) -> tuple[float, float]:
    lo, hi = ratio_band
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"ratio_band: need 0 < low <= 1 <= high, got [{lo}, {hi}]")
    return float(lo), float(hi)


def dead_band(gaps: mx.array, ratio_band: tuple[float, float]) -> mx.array:
    """`g = 0` where the teacher/student probability ratio `e^g` lies in `ratio_band`
    (the veRL port's dead-band: near-agreement is noise, not a signal); `[1, 1]` is off."""
    lo, hi = check_ratio_band(ratio_band=ratio_band)
    if lo == hi == 1.0:
        return gaps
    ratio = mx.exp(gaps)
    return mx.where((ratio >= lo) & (ratio <= hi), 0.0, gaps)


def center_gaps(gaps: mx.array, content: mx.array) -> mx.array:
    """`g - mean(g over the row's content tokens)`: removes a row's systematic offset (the
    context shift) before the sign is read. Rows without content tokens are unchanged."""
    n = mx.sum(content, axis=1, keepdims=True)
    mean = mx.sum(gaps * content, axis=1, keepdims=True) / mx.maximum(n, 1.0)
    return gaps - mean


def verifier_special_tokens(
    token: mx.array, base: mx.array, rewards: mx.array, special: mx.array, group_size: int
) -> mx.array:
    """Special tokens take the GRPO advantage of their row: the base in mixed groups, 0 in
    zero-variance groups (spec 4b); the other tokens keep theirs."""
    flat = mx.repeat(zero_variance_groups(rewards, group_size), group_size)
    grpo = mx.where(flat, 0.0, base.astype(mx.float32))[:, None]
    return mx.where(special != 0, grpo, token)

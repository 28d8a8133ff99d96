"""What a step reports: the metrics line (TRL's names where they exist) and the CAST
diagnostics of spec section 7, as pure functions of the batch's per-row arrays.

The trainer gathers the rows of all processes first (`distributed.gather_rows`), so the
line is the global batch's whatever the number of processes.
"""

from __future__ import annotations

import resource
import sys
from typing import cast

import mlx.core as mx

from cast_mlx.algorithm.advantages import zero_variance_groups


def _share(count: mx.array, total: mx.array) -> mx.array:
    return count / mx.maximum(total, 1.0)


def cast_diagnostics(
    rewards: mx.array,
    base_adv: mx.array,
    gaps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    a_max: float | None,
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
      tokens with |A| >= a_max (only for an algorithm that clips there: pass None otherwise).
    """
    m = (mask != 0).astype(mx.float32)
    total = mx.sum(m)
    flat = zero_variance_groups(rewards, group_size)
    first_correct = rewards.reshape(-1, group_size)[:, 0] > 0
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
    if a_max is not None:
        out["adv/at_a_max_share"] = _share(mx.sum((mx.abs(advantages) >= a_max) * m), total)
    return out


def end_of_turn_diagnostics(
    rewards: mx.array,
    gaps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    special: mx.array,
    eos: mx.array,
    *,
    group_size: int,
) -> dict[str, mx.array]:
    """What shows a length drift starting: `eos/neg_gap_share` (EOS tokens with
    g < 0), `eos/adv_mean/{all_correct,all_wrong,mixed_correct,mixed_wrong}` (the mean
    advantage of the EOS tokens of each trajectory type: a negative value pushes stopping
    down) and `content/neg_gap_share` (real, non-special tokens with g < 0)."""
    m = (mask != 0).astype(mx.float32)
    e = (eos != 0).astype(mx.float32) * m
    content = m * (special == 0)
    flat = mx.repeat(zero_variance_groups(rewards, group_size), group_size)[:, None]
    correct = (rewards > 0)[:, None]
    out = {
        "eos/neg_gap_share": _share(mx.sum((gaps < 0) * e), mx.sum(e)),
        "content/neg_gap_share": _share(mx.sum((gaps < 0) * content), mx.sum(content)),
    }
    for name, rows in (
        ("all_correct", flat & correct),
        ("all_wrong", flat & ~correct),
        ("mixed_correct", ~flat & correct),
        ("mixed_wrong", ~flat & ~correct),
    ):
        cell = e * rows
        out[f"eos/adv_mean/{name}"] = _share(mx.sum(advantages * cell), mx.sum(cell))
    return out


# the update's per-iteration aux names -> the metrics line's names
ITERATION_NAMES = {
    "loss": "loss",
    "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
    "ratio_mean": "ratio_mean",
}


def step_metrics(
    rows: dict,
    *,
    group_size: int,
    a_max: float | None,
    step: int,
    epoch: int,
    loss_value,
    grad_norm,
    aux: dict,
    lr: float,
    times: dict,
    usage: dict,
    applied: bool,
    compile_count: int,
) -> dict:
    """The metrics line of a step from the per-row arrays of the whole batch (`rows`:
    rewards, base, gaps, adv, mask, truncated, lengths, the special-token and EOS masks, and
    the strict / lenient / dropped flags), the update's results (`aux`: the loss metrics, entropy, rows skipped), the
    phase times and the memory use."""
    g = group_size
    rewards, base, gaps, adv = rows["rewards"], rows["base"], rows["gaps"], rows["adv"]
    mask, truncated = rows["mask"], rows["truncated"]
    rew = rewards.reshape(-1, g)
    lengths = rows["lengths"].astype(mx.float32)
    ended = 1.0 - truncated
    n_ended = float(ended.sum().item())
    gen_tokens = float(rows["lengths"].sum().item())
    n_rows = rewards.shape[0]
    diag = cast_diagnostics(rewards, base, gaps, adv, mask, a_max=a_max, group_size=g)
    diag |= end_of_turn_diagnostics(rewards, gaps, adv, mask, rows["special"], rows["eos"], group_size=g)
    m = {
        "step": step,
        "epoch": epoch,
        "reward": rewards.mean().item(),
        "reward_std": float(
            cast(
                float, mx.sqrt(((rew - rew.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) / max(g - 1, 1)).mean().item()
            )
        ),
        "frac_reward_zero_std": float(cast(float, zero_variance_groups(rewards, g).astype(mx.float32).mean().item())),
        "accuracy/strict": sum(rows["strict"].tolist()) / n_rows,
        "accuracy/lenient": sum(rows["lenient"].tolist()) / n_rows,
        "reward/dropped": sum(rows["dropped"].tolist()),
        "completions/mean_length": lengths.mean().item(),
        "completions/mean_terminated_length": float((lengths * ended).sum().item()) / max(n_ended, 1.0),
        "completions/max_length": float(lengths.max().item()),
        "completions/clipped_ratio": float(truncated.mean().item()),
        "loss": loss_value,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "update_applied": applied,
        "clip_ratio/low_mean": aux.get("clip_frac_low", 0.0),
        "clip_ratio/high_mean": aux.get("clip_frac_high", 0.0),
        "ratio_mean": aux.get("ratio_mean", 1.0),
        "entropy": aux["entropy"],
        "rows_skipped": aux["rows_skipped"],
        "compile_count": compile_count,
        "time/sample": times["sample"],
        "time/verify": times["verify"],
        "time/teacher": times["teacher"],
        "time/update": times["update"],
        "time/step": sum(times.values()),
        "tokens_per_s/generate": gen_tokens / max(times["sample"], 1e-9),
        "tokens_per_s/train": float(mask.sum().item()) / max(times["update"], 1e-9),
        **usage,
    }
    if "kl_mean" in aux:
        m["kl"] = aux["kl_mean"]
    if "updates_applied" in aux:  # loss.num_iterations > 1: each update's loss, clip and ratio
        m["updates_applied"] = aux["updates_applied"]
        for k, v in aux.items():
            name, sep, it = k.partition("/iter")
            if sep and name in ITERATION_NAMES:
                m[f"{ITERATION_NAMES[name]}/iter{it}"] = v
    for k, v in diag.items():
        m[f"cast/{k}"] = float(cast(float, v.item())) if isinstance(v, mx.array) else float(v)
    return m


def memory_usage() -> dict[str, float]:
    """MLX's peak memory and the process's peak resident set size, in GB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return {
        "memory/peak_gb": mx.get_peak_memory() / 2**30,
        "memory/rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20),
    }


def length_drift(history: list, window: int, rise: float) -> bool:
    """The length-drift rule over `history`, one `[truncation rate, reward]` per step: the
    mean truncation rate of the last `window` steps is at least `rise` above the lowest
    `window`-step mean so far, and the mean reward of the last `window` steps is no higher
    than that of the `window` steps before (the policy learns to ramble, not to answer)."""
    if len(history) < 2 * window:
        return False
    trunc = [h[0] for h in history]
    means = [sum(trunc[t - window : t]) / window for t in range(window, len(trunc) + 1)]
    reward = [h[1] for h in history]
    last, before = reward[-window:], reward[-2 * window : -window]
    return means[-1] - min(means) >= rise and sum(last) <= sum(before)

"""Which problems a step samples, with which random key, and DAPO's dynamic sampling: rounds
of further prompts until the batch holds enough groups whose rewards differ (a group whose
completions all score the same has a zero GRPO advantage and teaches nothing)."""

from __future__ import annotations

import random
from typing import Callable

import mlx.core as mx

from cast_mlx.training.trajectory import Trajectory, merge_groups


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"cast-mlx/order/{seed}/{epoch}").shuffle(order)
    return order


def next_indices(n: int, state, recipe) -> list[int]:
    """The indices of the next `prompts_per_step` problems of `n`, advancing the data cursor
    of `state` (epoch and position; checkpointed, so a resumed run draws the same)."""
    picked: list[int] = []
    p = recipe.sampling.prompts_per_step
    while len(picked) < p:
        order = epoch_order(n, recipe.seed, state.epoch, recipe.data.shuffle)
        take = order[state.cursor : state.cursor + p - len(picked)]
        picked += take
        state.cursor += len(take)
        if state.cursor >= len(order):
            state.epoch, state.cursor = state.epoch + 1, 0
    return picked


def step_key(seed: int, step: int, round: int = 0) -> mx.array:
    """The sampling key of a step (and of its later dynamic-sampling rounds)."""
    key = mx.random.key((seed * 1_000_003 + step) % (2**63))
    return key if round == 0 else mx.random.split(key, round + 1)[round]


def groups_with_signal(traj: Trajectory) -> list[int]:
    """The groups of a judged trajectory whose kept (not dropped) rows' rewards differ."""
    assert traj.judged is not None, "groups_with_signal needs the rewards stage's results"
    g, j = traj.group_size, traj.judged
    out = []
    for p in range(len(traj.problems)):
        values = {j.values[i] for i in range(p * g, (p + 1) * g) if not j.dropped[i]}
        if len(values) > 1:
            out.append(p)
    return out


def dynamic_batch(
    draw: Callable[[int], Trajectory], want: int, max_rounds: int, special_ids: list[int]
) -> tuple[Trajectory, dict]:
    """DAPO's dynamic sampling: `draw(round)` samples and judges a round of prompts; keep
    the groups with a reward spread until `want` of them, at most `max_rounds` rounds (the
    surplus of the last round is left out, as verl's filter_groups does). Fewer than `want`
    after the last round: the step trains on those; none at all: the last round as it is
    (nothing to learn, the update is skipped). Returns the judged batch and the metrics."""
    kept: list[tuple[Trajectory, list[int]]] = []
    n_kept = drawn = dropped = rounds = 0
    traj = None
    while rounds < max_rounds and n_kept < want:
        traj = draw(rounds)
        rounds += 1
        groups = groups_with_signal(traj)
        drawn += len(traj.problems)
        dropped += len(traj.problems) - len(groups)
        if take := groups[: want - n_kept]:
            kept.append((traj, take))
            n_kept += len(take)
    assert traj is not None, "max_rounds must be >= 1"
    stats = {
        "sampling/rounds": rounds,
        "sampling/prompts_drawn": drawn,
        "sampling/groups_dropped": dropped,
        "sampling/groups_kept": n_kept,
    }
    return (merge_groups(kept, special_ids) if kept else traj), stats

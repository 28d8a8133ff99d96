"""The step record: rows per problem, the gathered columns and the samples file's records."""

import mlx.core as mx
import pytest

from cast_mlx.tasks.problems import Problem
from cast_mlx.tasks.rewards import RowRewards
from cast_mlx.training.trajectory import Trajectory


class FakeRollout:
    lengths = mx.array([3, 1, 2, 2])
    finish_reasons = ["eos", "length", "eos", "eos"]


def trajectory() -> Trajectory:
    problems = [Problem("a", "1 + 1?", "2"), Problem("b", "2 + 2?", "4")]
    traj = Trajectory(problems, [[1, 2], [3]], FakeRollout(), group_size=2)
    traj.texts = ["2", "3", "4", "four"]
    traj.judged = RowRewards(
        [1.0, 0.0, 1.0, 0.0],
        [True, False, False, False],
        [True, False, True, False],
        [False, False, False, True],
        {"fmt": [1.0, 0.5, 1.0, float("nan")]},
    )
    traj.rewards = mx.array(traj.judged.values)
    for name in ("mask", "gaps", "adv", "special", "eos"):
        setattr(traj, name, mx.zeros((4, 3)))
    traj.truncated, traj.base = mx.array([0.0, 1.0, 0.0, 0.0]), mx.zeros((4,))
    return traj


def test_rows_repeat_their_problem():
    traj = trajectory()
    assert traj.n_rows == 4
    assert traj.per_row(["x", "y"]) == ["x", "x", "y", "y"]
    assert traj.contexts == [[1, 2], [1, 2], [3], [3]]


def test_columns_hold_every_per_row_value_the_metrics_read():
    cols = trajectory().columns()
    assert set(cols) == {
        "rewards",
        "base",
        "gaps",
        "adv",
        "mask",
        "truncated",
        "lengths",
        "special",
        "eos",
        "strict",
        "lenient",
        "dropped",
        "reward_fn/fmt",
    }
    assert cols["lenient"].tolist() == [True, False, True, False]
    assert cols["dropped"].tolist() == [False, False, False, True]
    assert cols["reward_fn/fmt"].tolist()[:3] == [1.0, 0.5, 1.0]
    assert all(v.shape[0] == 4 for v in cols.values())


def test_columns_need_the_rewards_stage():
    traj = trajectory()
    traj.judged = None
    with pytest.raises(AssertionError, match="rewards stage"):
        traj.columns()


def test_sample_records_are_the_first_rows():
    records = trajectory().sample_records(step=7, n=3)
    assert [r["completion"] for r in records] == ["2", "3", "4"]
    assert records[1] == {
        "step": 7,
        "problem": "1 + 1?",
        "gold": "2",
        "completion": "3",
        "reward": 0.0,
        "finish": "length",
    }
    assert records[2]["problem"] == "2 + 2?"

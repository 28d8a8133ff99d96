"""DAPO's dynamic sampling (`sampling.dynamic`): rounds of further prompts until the batch
holds `prompts_per_step` groups whose rewards differ; by hand on fake rounds, then through
the trainer on the tiny random-weight model (fast tier), resume included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_trainer import ALTERNATING, HALF, ZERO, assert_resumes_bit_identically, plugin

from cast_mlx import config as cfg
from cast_mlx.engine import distributed as dist
from cast_mlx.tasks.rewards import RowRewards
from cast_mlx.training import sampling, trainer
from cast_mlx.training.trajectory import Trajectory

from helpers import tiny_recipe


def judged(values: list[float], group_size: int, dropped=None) -> Trajectory:
    n = len(values)
    traj = Trajectory(list(range(n // group_size)), [[1]] * (n // group_size), None, group_size)
    traj.judged = RowRewards(values, [False] * n, [False] * n, dropped or [False] * n, {})
    return traj


def test_groups_with_signal_by_hand():
    traj = judged([1, 0, 1, 1, 0, 0, 0.5, 1, 0.5, 0.5], 2)
    assert sampling.groups_with_signal(traj) == [0, 3]
    # a dropped row does not count: group 1's only other row is 1
    assert sampling.groups_with_signal(judged([1, 0, 0, 1], 2, dropped=[False, False, True, False])) == [0]


def test_dynamic_batch_draws_rounds_until_enough_groups():
    rounds = [judged([0, 0, 1, 0, 1, 1], 2), judged([1, 0, 0, 0, 0, 1], 2), judged([0, 1, 1, 0, 0, 1], 2)]
    drawn: list[int] = []
    merged: list = []

    def draw(r):
        drawn.append(r)
        return rounds[r]

    def fake_merge(parts, special_ids):
        merged.append([(rounds.index(t), groups) for t, groups in parts])
        return "merged"

    import cast_mlx.training.sampling as mod

    original = mod.merge_groups
    mod.merge_groups = fake_merge
    try:
        out, stats = sampling.dynamic_batch(draw, want=3, max_rounds=3, special_ids=[])
        assert drawn == [0, 1] and out == "merged"
        # round 0 has group 1, round 1 groups 0 and 2: three, no third round
        assert merged[-1] == [(0, [1]), (1, [0, 2])]
        assert stats == {
            "sampling/rounds": 2,
            "sampling/prompts_drawn": 6,
            "sampling/groups_dropped": 3,
            "sampling/groups_kept": 3,
        }
        drawn.clear()
        out, stats = sampling.dynamic_batch(draw, want=5, max_rounds=2, special_ids=[])  # too few in 2 rounds
        assert drawn == [0, 1] and stats["sampling/groups_kept"] == 3 and stats["sampling/rounds"] == 2
        nothing = [judged([0, 0, 1, 1], 2)] * 2
        out, stats = sampling.dynamic_batch(lambda r: nothing[r], want=2, max_rounds=2, special_ids=[])
        assert out is nothing[1] and stats["sampling/groups_kept"] == 0  # the last round, nothing to learn
    finally:
        mod.merge_groups = original


def test_a_step_samples_until_it_has_enough_groups(tmp_path, tiny_model_dir):
    """HALF scores the first group of every round 0/1 and the second all 0: two rounds give
    the two groups with a signal; the merged batch is judged as its rounds were."""
    sets = ("algorithm.name=grpo", "sampling.dynamic=true", plugin(tmp_path, "half", HALF))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, *sets)
    with trainer.setup(recipe) as run:
        rounds: list[Trajectory] = []
        original = trainer.sample

        def spy(run_, problems, round=0):
            rounds.append(original(run_, problems, round))
            return rounds[-1]

        trainer.sample = spy
        try:
            traj, stats = trainer.draw_batch(run)
        finally:
            trainer.sample = original
        assert stats == {
            "sampling/rounds": 2,
            "sampling/prompts_drawn": 4,
            "sampling/groups_dropped": 2,
            "sampling/groups_kept": 2,
        }
        assert run.state.cursor == 4  # both rounds' prompts are consumed
        assert traj.problems == [rounds[0].problems[0], rounds[1].problems[0]]
        assert traj.rewards.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        for k, source in enumerate(rounds):  # group k of the batch is group 0 of round k
            rows = slice(4 * k, 4 * k + 4)
            n = int(source.rollout.lengths[:4].max().item())
            assert np.array_equal(np.array(traj.rollout.tokens[rows, :n]), np.array(source.rollout.tokens[:4, :n]))
            assert traj.texts[rows] == source.texts[:4]
        assert rounds[0].rollout.tokens.tolist() != rounds[1].rollout.tokens.tolist()  # its own key per round
        metrics, _ = trainer.learn(run, traj)
        assert metrics["update_applied"] is True and metrics["rows_skipped"] == 0


def test_without_dynamic_the_zero_variance_group_is_skipped(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "algorithm.name=grpo", plugin(tmp_path, "half", HALF))
    with trainer.setup(recipe) as run:
        metrics, _ = trainer.train_step(run)
    assert metrics["rows_skipped"] == 4 and "sampling/rounds" not in metrics


def test_no_group_with_a_signal_trains_on_nothing(tmp_path, tiny_model_dir):
    sets = ("algorithm.name=grpo", "sampling.dynamic=true", "sampling.max_rounds=2", plugin(tmp_path, "zero", ZERO))
    with trainer.setup(tiny_recipe(tmp_path, tiny_model_dir, *sets)) as run:
        metrics, _ = trainer.train_step(run)
    assert metrics["sampling/rounds"] == 2 and metrics["sampling/groups_kept"] == 0
    assert metrics["update_applied"] is False and run.state.step == 1 and run.state.bad_steps == 0


def test_dynamic_sampling_resumes_bit_identically(tmp_path, tiny_model_dir):
    sets = ("algorithm.name=grpo", "sampling.dynamic=true", plugin(tmp_path, "half", HALF))
    first, _ = assert_resumes_bit_identically(tiny_recipe(tmp_path / "a", tiny_model_dir, *sets))
    assert first["sampling/rounds"] == 2


def test_recipes_that_contradict_dynamic_sampling_are_refused():
    base = ["sampling.dynamic=true"]
    with pytest.raises(cfg.ConfigError, match=r"sampling.dynamic: cast learns from all-correct/all-wrong groups"):
        cfg.load_recipe("recipes/smoke.yaml", [*base, "algorithm.name=cast", "algorithm.zero_var_base=0.25"])
    r = cfg.load_recipe("recipes/smoke.yaml", [*base, "algorithm.name=cast", "algorithm.zero_var_base=0"])
    assert r.sampling.dynamic
    r = cfg.load_recipe("recipes/smoke.yaml", [*base, "algorithm.name=cast-verl", "algorithm.zero_var_base=0"])
    with pytest.raises(cfg.ConfigError, match="sampling.dynamic: its rounds are not split over 2 processes"):
        dist.check_recipe(r, 2)
    r = cfg.load_recipe("recipes/smoke.yaml", [*base, "algorithm.name=grpo", "sampling.prompts_per_step=2"])
    with pytest.raises(cfg.ConfigError, match="sampling.dynamic"):
        dist.check_recipe(r, 2)


def test_the_cli_writes_the_rounds(tmp_path, tiny_model_dir):
    from helpers import run_cli

    out = tmp_path / "cli"
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard", "--quiet",
        *[a for s in (f"model.name={tiny_model_dir}", "sampling.group_size=4", "sampling.max_new_tokens=8",
                      "lora.num_layers=1", "loss.mask_truncated=false", "logging.eval_every=0",
                      f"logging.out_dir={out}", "schedule.steps=2", "algorithm.name=grpo", "sampling.dynamic=true",
                      plugin(tmp_path, "alt", ALTERNATING)) for a in ("--set", s)],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in lines if m.get("step", 0) >= 1 and "sampling/rounds" in m]
    assert [m["sampling/rounds"] for m in rows] == [1, 1] and rows[0]["sampling/groups_kept"] == 2

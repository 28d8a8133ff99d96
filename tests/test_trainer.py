"""The loop's invariants on a tiny random-weight model (fast tier): the NaN guard,
gradient accumulation, and the skip of groups with nothing to learn."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from cast_mlx.engine import models
from cast_mlx.errors import TrainingError
from cast_mlx.training import trainer

from helpers import tiny_recipe

ALTERNATING = "def reward(completions, **kwargs):\n    return [float(i % 2) for i in range(len(completions))]\n"
ZERO = "def reward(completions, **kwargs):\n    return [0.0] * len(completions)\n"


def plugin(tmp_path, name: str, source: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return f"reward.functions=[{path}:reward]"


def lora(run) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in models.lora_state(run.model).items()}


def test_a_non_finite_teacher_skips_the_update_then_stops_the_run(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "algorithm.name=cast", "system.max_bad_steps=2")
    with trainer.setup(recipe) as run:
        assert run.teacher is not None
        run.teacher.params = {k: mx.full(v.shape, math.nan) for k, v in run.teacher.params.items()}
        before = lora(run)
        metrics, _ = trainer.train_step(run)
        assert metrics["update_applied"] is False and math.isnan(metrics["loss"])
        assert run.state.step == 1 and run.state.bad_steps == 1
        after = lora(run)
        assert all(np.array_equal(before[k], after[k]) for k in before)
        with pytest.raises(TrainingError, match="2 consecutive steps .*non-finite teacher gaps"):
            trainer.train_step(run)


def test_accumulated_micro_batches_give_the_whole_batch_update(tmp_path, tiny_model_dir):
    deltas = []
    for micro in (1, 8):
        recipe = tiny_recipe(
            tmp_path / str(micro),
            tiny_model_dir,
            "algorithm.name=grpo",
            f"optimizer.micro_batch_size={micro}",
            plugin(tmp_path, "alternating", ALTERNATING),
        )
        with trainer.setup(recipe) as run:
            run.optimizer = optim.SGD(learning_rate=1.0)  # the step is the (clipped) gradient itself
            start = lora(run)
            metrics, _ = trainer.train_step(run)
            assert metrics["update_applied"] is True and metrics["rows_skipped"] == 0
            deltas.append({k: v - start[k] for k, v in lora(run).items()})
    one, whole = deltas
    assert max(np.abs(d).max() for d in whole.values()) > 1e-6  # the step moved something
    scale = max(np.abs(d).max() for d in whole.values())
    for k in whole:
        np.testing.assert_allclose(one[k], whole[k], atol=1e-4 * scale, err_msg=k)


def test_groups_with_nothing_to_learn_are_skipped(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "algorithm.name=grpo", plugin(tmp_path, "zero", ZERO))
    with trainer.setup(recipe) as run:
        before = lora(run)
        metrics, _ = trainer.train_step(run)
        n = recipe.sampling.prompts_per_step * recipe.sampling.group_size
        assert metrics["rows_skipped"] == n and metrics["update_applied"] is False
        assert metrics["frac_reward_zero_std"] == 1.0
        assert run.state.step == 1 and run.state.bad_steps == 0  # nothing to learn is not a bad step
        after = lora(run)
        assert all(np.array_equal(before[k], after[k]) for k in before)

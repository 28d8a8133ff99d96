"""The loop's invariants on a tiny random-weight model (fast tier): the NaN guard,
gradient accumulation, and the skip of groups with nothing to learn."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_unflatten

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


def test_a_non_finite_lora_weight_skips_the_update_then_stops_the_run(tmp_path, tiny_model_dir):
    # The inputs (rewards, advantages) stay finite; the loss and the gradient do not. The
    # weight turns NaN between sampling and the update (the sampler refuses NaN logits).
    recipe = tiny_recipe(
        tmp_path, tiny_model_dir, "algorithm.name=grpo", "system.max_bad_steps=2", plugin(tmp_path, "alt", ALTERNATING)
    )
    with trainer.setup(recipe) as run:
        good = models.lora_state(run.model)
        name = next(k for k in good if k.endswith("lora_a"))
        nan_weight = [(name, mx.full(good[name].shape, math.nan))]

        def bad_step():
            run.model.update(tree_unflatten(list(good.items())))
            traj = trainer.sample(run, trainer.next_prompts(run))
            run.model.update(tree_unflatten(nan_weight))
            return trainer.learn(run, traj)[0]

        metrics = bad_step()
        assert metrics["update_applied"] is False and metrics["rows_skipped"] < 8
        assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
        assert run.state.step == 1 and run.state.bad_steps == 1
        after = lora(run)
        assert np.isnan(after[name]).all()
        assert all(np.array_equal(np.array(good[k]), after[k]) for k in good if k != name)
        with pytest.raises(TrainingError, match="2 consecutive steps .*loss nan"):
            bad_step()
        assert run.state.step == 2


def test_accumulated_micro_batches_give_the_whole_batch_update(tmp_path, tiny_model_dir):
    # 8 rows: eight micro-batches of one row against one of all eight (share_prefix off in
    # both, else a micro-batch holds one prompt's rows). SGD at lr 1 without clipping: the
    # step is minus the accumulated gradient itself, so a wrong scale fails too.
    deltas, norms, samples = [], [], []
    for micro in (1, 8):
        recipe = tiny_recipe(
            tmp_path / str(micro),
            tiny_model_dir,
            "algorithm.name=grpo",
            f"optimizer.micro_batch_size={micro}",
            "optimizer.max_grad_norm=1e6",
            "system.share_prefix=false",
            plugin(tmp_path, "alternating", ALTERNATING),
        )
        with trainer.setup(recipe) as run:
            run.optimizer = optim.SGD(learning_rate=1.0)
            start = lora(run)
            metrics, records = trainer.train_step(run)
            assert metrics["update_applied"] is True and metrics["rows_skipped"] == 0
            deltas.append({k: v - start[k] for k, v in lora(run).items()})
            norms.append(metrics["grad_norm"])
            samples.append(records)
    assert samples[0] == samples[1]  # the same rollout
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[0] > 1e-3
    one, whole = deltas
    assert max(np.abs(d).max() for d in whole.values()) > 1e-6  # the step moved something
    scale = max(np.abs(d).max() for d in whole.values())
    for k in whole:
        np.testing.assert_allclose(one[k], whole[k], atol=1e-5 * scale, err_msg=k)


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

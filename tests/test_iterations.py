"""Several clipped updates per sampled batch (`loss.num_iterations`, TRL's num_iterations,
verl's ppo_epochs) and the sequence-level ratio (`loss.importance_level`, GSPO) through the
trainer on the tiny random-weight model (fast tier); the loss itself against the PyTorch
reference is in test_loss.py, the whole two-update step in test_parity_torch.py."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from test_trainer import ALTERNATING, assert_resumes_bit_identically, lora, plugin

from cast_mlx.training import trainer
from cast_mlx.training.update import accumulate_gradients, lr_schedule

from helpers import tiny_recipe

SETS = ("algorithm.name=grpo", "optimizer.max_grad_norm=1e6", "system.share_prefix=false")


def test_two_updates_take_the_first_pass_as_the_behaviour_policy(tmp_path, tiny_model_dir):
    """mu = 2 with SGD: the step equals two hand-made updates from the same batch, the second
    with the first one's log-probs as `old`; the first update's ratio is exactly 1, the
    second's is not, and the metrics line reports both."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, *SETS, "loss.num_iterations=2", plugin(tmp_path, "alt", ALTERNATING))
    with trainer.setup(recipe) as run:
        run.optimizer = optim.SGD(learning_rate=30.0)
        start = lora(run)
        traj = trainer.sample(run, trainer.next_prompts(run))
        metrics, _ = trainer.learn(run, traj)
        after = lora(run)

        # by hand, from the same start and batch
        run.model.update(_unflatten(start))
        rows = list(range(traj.n_rows))
        args = (run.model, run.loss_fn, recipe)
        from cast_mlx.algorithm.loss import loss_norm

        norm = loss_norm(traj.mask, traj.truncated, mask_truncated=False)
        batch = (norm, rows, traj.contexts, traj.rollout.tokens, traj.mask, traj.adv, traj.truncated, None, None)
        sgd = optim.SGD(learning_rate=30.0)
        grads, _, _, sums1, lps = accumulate_gradients(*args, *batch, lambda *a: None)
        sgd.update(run.model, grads)
        grads, _, _, sums2, _ = accumulate_gradients(*args, *batch, lambda *a: None, old_lp=lps)
        sgd.update(run.model, grads)
        by_hand = lora(run)

    assert metrics["updates_applied"] == 2
    assert metrics["ratio_mean/iter1"] == 1.0
    assert abs(metrics["ratio_mean/iter2"] - 1.0) > 1e-3  # the first update moved the policy
    assert metrics["ratio_mean"] == pytest.approx((1.0 + metrics["ratio_mean/iter2"]) / 2)
    assert metrics["loss"] == metrics["loss/iter1"] != metrics["loss/iter2"]
    assert {"clip_ratio/high_mean/iter2", "clip_ratio/low_mean/iter2"} <= set(metrics)
    assert float(sums2["ratio_mean"].item()) != pytest.approx(float(sums1["ratio_mean"].item()))
    scale = max(np.abs(after[k] - start[k]).max() for k in start)
    assert scale > 1e-5
    for k in start:
        np.testing.assert_allclose(after[k], by_hand[k], atol=1e-5 * scale, err_msg=k)


def test_one_iteration_writes_no_iteration_metrics(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, *SETS, plugin(tmp_path, "alt", ALTERNATING))
    with trainer.setup(recipe) as run:
        metrics, _ = trainer.train_step(run)
    assert metrics["ratio_mean"] == 1.0 and metrics["update_applied"] is True
    assert not [k for k in metrics if "/iter" in k or k == "updates_applied"]


def test_sequence_level_ratio_runs_through_the_trainer(tmp_path, tiny_model_dir):
    sets = (*SETS, "loss.num_iterations=2", "loss.importance_level=sequence", plugin(tmp_path, "alt", ALTERNATING))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, *sets)
    with trainer.setup(recipe) as run:
        run.optimizer = optim.SGD(learning_rate=30.0)
        metrics, _ = trainer.train_step(run)
    assert metrics["updates_applied"] == 2 and metrics["ratio_mean/iter1"] == 1.0
    assert abs(metrics["ratio_mean/iter2"] - 1.0) > 1e-3


def test_the_schedule_counts_updates():
    """Warmup and decay run over steps x num_iterations optimizer updates."""
    from cast_mlx import config as cfg

    sets = ["schedule.steps=10", "schedule.warmup_ratio=0.4", "loss.num_iterations=2"]
    r = cfg.load_recipe("recipes/smoke.yaml", sets)
    r.schedule.decay, r.optimizer.lr = "linear", 1e-3
    fn = lr_schedule(r)
    values = [float(fn(mx.array(s)).item()) for s in range(20)]
    assert values[:8] == pytest.approx([1e-3 * k / 8 for k in range(1, 9)])  # 0.4 * 20 updates
    assert values[8] == pytest.approx(1e-3) and values[-1] < values[9]


def _unflatten(flat: dict[str, np.ndarray]):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, mx.array(v)) for k, v in flat.items()])


def test_two_updates_resume_bit_identically(tmp_path, tiny_model_dir):
    """The optimizer's update count (the schedule's clock) is checkpointed with mu updates per step."""
    sets = (*SETS, "loss.num_iterations=2", "schedule.warmup_ratio=0.5", plugin(tmp_path, "alt", ALTERNATING))
    _, second = assert_resumes_bit_identically(tiny_recipe(tmp_path / "a", tiny_model_dir, *sets))
    assert second["updates_applied"] == 2 and second["learning_rate"] == pytest.approx(1e-4)  # after the warmup


def test_the_cli_writes_each_updates_metrics(tmp_path, tiny_model_dir):
    import json

    from helpers import TINY_SETS, run_cli

    out = tmp_path / "cli"
    sets = [f"model.name={tiny_model_dir}", *TINY_SETS, f"logging.out_dir={out}", "schedule.steps=2", *SETS]
    sets += ["loss.num_iterations=3", "loss.importance_level=sequence", plugin(tmp_path, "alt", ALTERNATING)]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard", "--quiet", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("step", 0) >= 1]
    assert [m["updates_applied"] for m in steps] == [3, 3]
    assert all(m["ratio_mean/iter1"] == 1.0 and "clip_ratio/high_mean/iter3" in m for m in steps)

"""The loop's invariants on a tiny random-weight model (fast tier): the NaN guard,
gradient accumulation, and the skip of groups with nothing to learn."""

from __future__ import annotations

import json
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


def assert_resumes_bit_identically(recipe) -> tuple[dict, dict]:
    """Two steps straight, and the second step again from a checkpoint after the first: the
    same LoRA tensors and the same metrics (times and memory aside). Returns the two steps'
    metrics of the straight run."""
    with trainer.setup(recipe) as run:
        first, _ = trainer.train_step(run)
        ckpt = trainer.save(run)
        second, _ = trainer.train_step(run)
        straight = lora(run)
    with trainer.setup(recipe) as run:
        trainer.resume(run, ckpt)
        again, _ = trainer.train_step(run)
        resumed = lora(run)
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)
    stable = [k for k in second if not k.startswith(("time/", "tokens_per_s/", "memory/"))]
    assert {k: again[k] for k in stable} == {k: second[k] for k in stable}
    return first, second


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


HALF = (
    "def reward(completions, **kwargs):\n"
    "    n = len(completions) // 2\n"
    "    return [float(i % 2) if i < n else 0.0 for i in range(len(completions))]\n"
)


def test_the_mean_ratio_is_over_the_rows_that_carry_loss(tmp_path, tiny_model_dir):
    # one mixed group learns, one all-wrong group is skipped; with one update per batch the
    # ratio of every loss-carrying token is exactly 1, so its mean must be 1, not the
    # share of the batch's tokens that went through the update
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "algorithm.name=grpo", plugin(tmp_path, "half", HALF))
    with trainer.setup(recipe) as run:
        metrics, _ = trainer.train_step(run)
        assert metrics["rows_skipped"] == recipe.sampling.group_size and metrics["update_applied"] is True
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_an_oracle_run_is_labelled_in_its_header_metrics_summary_and_report(tmp_path, tiny_model_dir):
    from helpers import run_cli

    out = tmp_path / "oracle"
    sets = [
        f"model.name={tiny_model_dir}",
        "sampling.group_size=4",
        "sampling.max_new_tokens=8",
        "lora.num_layers=1",
        "logging.eval_every=0",
        "schedule.steps=2",
        f"logging.out_dir={out}",
        "algorithm.name=cast",
        "teacher.context=privileged",
        "teacher.oracle=true",
    ]
    cmd = ["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard"]
    proc = run_cli(*cmd, *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ORACLE: NOT CAST: its teacher sees the gold answer; a diagnostic bound" in proc.stdout
    assert "summary: step 2 of 2" in proc.stdout and "(oracle: not CAST" in proc.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["label"].startswith("oracle: not CAST") for line in lines)
    assert "cast/adv/at_a_max_share" in lines[-1]  # cast clips at a_max
    assert "<b>oracle: not CAST</b>" in (out / "report.html").read_text()
    # without the switch the same context is refused for CAST's rule
    refused = run_cli(*cmd, *(a for s in sets[:-1] for a in ("--set", s)))
    assert refused.returncode == 2 and "teacher.oracle=true runs it as a labelled oracle" in refused.stderr


def test_the_ports_same_context_teacher_runs_the_top_blocks_on_the_rollouts_states(
    tmp_path, tiny_model_dir, monkeypatch
):
    from cast_mlx.algorithm import teacher as teacher_module

    seen = []
    real = teacher_module.score_in_buckets

    def spy(score, contexts, tokens, mask, micro_batch, share_prefix, frozen, rows=None):
        seen.append(frozen)
        return real(score, contexts, tokens, mask, micro_batch, share_prefix, frozen, rows)

    monkeypatch.setattr(teacher_module, "score_in_buckets", spy)
    packs = []  # a teacher on its own context runs the whole model, packed (no kept states)
    real_packed = teacher_module.packed.packed_logprobs
    monkeypatch.setattr(
        teacher_module.packed, "packed_logprobs", lambda *a, **k: packs.append(1) or real_packed(*a, **k)
    )
    for context in ("same", "instructed"):
        recipe = tiny_recipe(
            tmp_path / context, tiny_model_dir, "algorithm.name=cast-verl", f"teacher.context={context}"
        )
        assert recipe.teacher.context == context
        seen.clear()
        packs.clear()
        with trainer.setup(recipe) as run:
            traj = trainer.sample(run, trainer.next_prompts(run))
            metrics, _ = trainer.learn(run, traj)
            if context == "same":  # teacher = policy at step 0: exactly no gap, and nothing scored
                assert not seen and np.array(traj.gaps).tolist() == np.zeros(traj.gaps.shape).tolist()
                assert not run.teacher.is_policy(run.model)  # the update moved the policy
                traj = trainer.sample(run, trainer.next_prompts(run))
                metrics, _ = trainer.learn(run, traj)
        assert "cast/adv/at_a_max_share" not in metrics  # the port has no clip at a_max
        if context == "same":  # the port's default: the policy's own prompt, top blocks only
            assert seen and all(f is not None for f in seen) and not packs
            assert np.abs(np.array(traj.gaps)).max() > 0  # the weight lag of one update
        else:  # another context: the whole model runs, packed
            assert not seen and packs
            assert np.abs(np.array(traj.gaps)).max() > 0

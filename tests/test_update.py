"""The update stage's pure parts: the learning-rate schedule (warmup then decay, for every step
count a recipe allows), the NaN guard's check and the step counter."""

import math

import mlx.core as mx
import pytest

from cast_mlx import config as cfg
from cast_mlx.errors import TrainingError
from cast_mlx.training.checkpoint import TrainState
from cast_mlx.training.update import UpdateResult, count_step, first_nonfinite, lr_schedule


def recipe(steps, warmup_ratio, decay="constant", lr=1e-3, min_lr_ratio=0.0):
    r = cfg.load_recipe("recipes/smoke.yaml")
    r.schedule.steps, r.schedule.warmup_ratio, r.schedule.decay = steps, warmup_ratio, decay
    r.schedule.min_lr_ratio = min_lr_ratio
    r.optimizer.lr = lr
    return r


def lrs(r):
    fn = lr_schedule(r)
    return [float(fn(mx.array(s)).item()) for s in range(r.schedule.steps)]


@pytest.mark.parametrize("steps,ratio", [(20, 0.05), (1, 0.5), (2, 0.3), (10, 0.0)])
def test_warmup_of_zero_or_one_step_starts_at_the_full_rate(steps, ratio):
    # 0.05 * 20 = 1 warmup step used to build a zero-step linear schedule and crash
    assert lrs(recipe(steps, ratio)) == pytest.approx([1e-3] * steps)


def test_warmup_rises_linearly_to_the_rate_then_decays():
    values = lrs(recipe(10, 0.4, decay="linear", min_lr_ratio=0.0))
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(values[4:], values[5:]))
    assert values[-1] == pytest.approx(1e-3 * (1 - 5 / 6))


def test_cosine_ends_at_the_minimum_ratio():
    fn = lr_schedule(recipe(10, 0.0, decay="cosine", min_lr_ratio=0.1))
    assert float(fn(mx.array(10)).item()) == pytest.approx(1e-4)
    assert math.isclose(float(fn(mx.array(0)).item()), 1e-3, rel_tol=1e-6)


def test_first_nonfinite_names_the_array_and_ignores_padding():
    mask = mx.array([[1.0, 0.0]])
    gaps = mx.array([[0.5, float("nan")]])  # NaN in the padding: harmless
    assert first_nonfinite({"rewards": mx.array([1.0]), "gaps": gaps}, mask) is None
    adv = mx.array([[float("nan"), 0.0]])
    assert first_nonfinite({"gaps": gaps, "advantages": adv}, mask) == "advantages"
    assert first_nonfinite({"rewards": mx.array([float("inf")])}, mask) == "rewards"


def test_count_step_advances_and_stops_after_too_many_bad_steps():
    state = TrainState()
    bad = UpdateResult(float("nan"), float("nan"), nonfinite="advantages")
    assert count_step(state, bad, all_skipped=False, max_bad_steps=3) is False
    assert (state.step, state.bad_steps) == (1, 1)
    assert count_step(state, UpdateResult(0.0, 0.0), all_skipped=True, max_bad_steps=3) is True  # nothing to learn
    assert (state.step, state.bad_steps) == (2, 0)
    count_step(state, bad, all_skipped=False, max_bad_steps=3)
    count_step(state, bad, all_skipped=False, max_bad_steps=3)
    with pytest.raises(
        TrainingError, match="3 consecutive steps with non-finite values \\(last: non-finite advantages\\)"
    ):
        count_step(state, bad, all_skipped=False, max_bad_steps=3)
    assert state.step == 5  # the batch is consumed even when the run stops
    good = UpdateResult(0.1, 0.2, applied=True)
    assert count_step(state, good, all_skipped=False, max_bad_steps=3) is True and state.bad_steps == 0

"""Advantages (spec sections 2 and 4): hand-computed cases and parity with the PyTorch reference."""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cast_mlx.algorithm.advantages import base_advantages, cast_token_advantages, zero_variance_groups
from cast_mlx.algorithm.compiled import CompiledAdvantages, bucket_length, compile_count
from cast_mlx.algorithm.estimators import DEFAULT_PARAMS, ESTIMATORS, compute_advantages, default_scale_rewards
from cast_mlx.algorithm.facts import ALGORITHMS, AlgorithmFacts, declare, facts_of

from helpers import torch_reference


def f32(x: float) -> float:
    """`x` rounded to float32: thresholds compared with float32 gaps must be exact in both."""
    return float(np.float32(x))


def cast_tokens(bases, gaps, **params):
    """CAST token advantages of single-token completions with the given B and g."""
    b = mx.array(bases, dtype=mx.float32)
    g = mx.array(gaps, dtype=mx.float32)[:, None]
    lam = params.pop("lam", 1.0)
    out = cast_token_advantages(b, g, mx.ones(g.shape), lam, **params)
    return np.array(out)[:, 0]


# --------------------------------------------------------------------------- section 2


def test_default_scale_rewards():
    assert default_scale_rewards("cast") == "none"
    assert default_scale_rewards("grpo") == "group"
    assert default_scale_rewards("rlsd") == "group"
    assert default_scale_rewards("cast-verl") == "group"
    assert sorted(ESTIMATORS) == ["cast", "cast-verl", "grpo", "rlsd"]


def test_base_advantages_by_hand():
    rewards = mx.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=mx.float32)
    # none: r - mean.
    none = base_advantages(rewards, group_size=4, scale_rewards="none", zero_var_value=1.0)
    np.testing.assert_allclose(np.array(none), [0.75, -0.25, -0.25, -0.25, 1, 1, 1, 1, -1, -1, -1, -1], rtol=1e-7)
    # group: Bessel std of [1, 0, 0, 0] is 0.5 -> 0.75 / 0.5001.
    group = base_advantages(rewards, group_size=4, scale_rewards="group", zero_var_value=0.0)
    expected = [1.49970006, -0.49990002, -0.49990002, -0.49990002] + [0.0] * 8
    np.testing.assert_allclose(np.array(group), expected, rtol=1e-6)
    # batch: the Bessel std of all 12 rewards (5 ones) is sqrt(420 / 1584) = 0.51492865;
    # zero-variance groups still get +-zero_var_value.
    batch = base_advantages(rewards, group_size=4, scale_rewards="batch", zero_var_value=0.5)
    expected = [1.45622967, -0.48540989, -0.48540989, -0.48540989]
    np.testing.assert_allclose(np.array(batch), expected + [0.5] * 4 + [-0.5] * 4, rtol=1e-6)


def test_zero_variance_groups_get_exact_values():
    rewards = mx.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=mx.float32)
    assert zero_variance_groups(rewards, 2).tolist() == [True, True, False, True]
    gaps = mx.full((8, 3), 0.3)
    mask = mx.ones((8, 3))
    for name in ("grpo", "rlsd"):
        token, base = compute_advantages(name, rewards, gaps, mask, group_size=2)
        base, token = np.array(base), np.array(token)
        assert base[[0, 1, 2, 3, 6, 7]].tolist() == [0.0] * 6  # exactly 0
        assert not np.any(token[[0, 1, 2, 3, 6, 7]])
        assert np.all(token[4] > 0) and np.all(token[5] < 0)
    token, base = compute_advantages("cast", rewards, gaps, mask, group_size=2)
    assert np.array(base).tolist() == [1.0, 1.0, -1.0, -1.0, 0.5, -0.5, -1.0, -1.0]
    token, base = compute_advantages("cast", rewards, gaps, mask, group_size=2, zero_var_base=0.0)
    assert np.array(base).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, -0.5, 0.0, 0.0]
    assert not np.any(np.array(token)[[0, 1, 2, 3, 6, 7]])


# --------------------------------------------------------------------------- section 4, by hand


def test_down_flip():
    # B = 0.5 > 0, g = -0.1: A = -0.5 * clip(e^0.1, 1, 1.2) = -0.5 * 1.10517092.
    # g = -0.5: e^0.5 = 1.6487 -> the 1.2 cap binds: A = -0.6.
    np.testing.assert_allclose(cast_tokens([0.5, 0.5], [-0.1, -0.5]), [-0.552585459, -0.6], rtol=1e-6)


def test_up_flip():
    # B = -0.5, g = 0.03: A = +0.5 * e^0.03 = 0.515227267; g = 0.2: the 1.05 cap binds: 0.525.
    np.testing.assert_allclose(cast_tokens([-0.5, -0.5], [0.03, 0.2]), [0.515227267, 0.525], rtol=1e-6)


def test_agree_correct_and_wrong():
    # Correct completion, teacher-positive: w = clip(e^g, 0.8, 1.05).
    np.testing.assert_allclose(cast_tokens([0.5, 0.5], [0.03, 0.2]), [0.515227267, 0.525], rtol=1e-6)
    # Wrong completion, teacher-negative: w = clip(e^{-g}, 0.95, 1.2); A = B * w.
    np.testing.assert_allclose(cast_tokens([-0.5, -0.5], [-0.1, -0.5]), [-0.552585459, -0.6], rtol=1e-6)


def test_zero_gap_and_zero_base():
    # g = 0: w = 1, A = B (no flip either way); B = 0: A = 0 whatever g.
    out = cast_tokens([0.5, -0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.7, -0.7, 0.0])
    np.testing.assert_array_equal(out, [0.5, -0.5, 0, 0, 0])


def test_a_max_binds():
    # Scale "group" on [1, 0, 0, 0]: B = 0.75 / 0.5001 = 1.49970006 for the correct row.
    rewards = mx.array([1, 0, 0, 0], dtype=mx.float32)
    gaps = mx.array([[0.2, -0.5], [0.2, -0.5], [0.0, 0.0], [0.0, 0.0]])
    token, base = compute_advantages("cast", rewards, gaps, mx.ones((4, 2)), group_size=4, scale_rewards="group")
    np.testing.assert_allclose(np.array(base)[:2], [1.49970006, -0.49990002], rtol=1e-6)
    # Correct row: 1.4997 * 1.05 = 1.5747 -> clipped to 1.2; down-flip 1.4997 * 1.2 -> -1.2.
    # Wrong row (B = -0.4999): g = 0.2 up-flips to +0.4999 * 1.05; g = -0.5 -> -0.4999 * 1.2.
    np.testing.assert_allclose(np.array(token)[:2], [[1.2, -1.2], [0.524895021, -0.599880024]], rtol=1e-6)
    token, _ = compute_advantages(
        "cast", rewards, gaps, mx.ones((4, 2)), group_size=4, scale_rewards="group", a_max=2.0
    )
    np.testing.assert_allclose(np.array(token)[0], [1.574685063, -1.799640072], rtol=1e-6)


def test_lambda_half():
    # Down-flip: 1 + 0.5 * (1.2 - 1) = 1.1 -> A = -0.55.  Up-flip capped: 1 + 0.5 * 0.05 -> 0.5125.
    # Kept (g = 0.03, correct): 0.5 * (1 + 0.5 * (e^0.03 - 1)) = 0.507613633.
    np.testing.assert_allclose(
        cast_tokens([0.5, -0.5, 0.5], [-0.5, 0.2, 0.03], lam=0.5), [-0.55, 0.5125, 0.507613633], rtol=1e-6
    )
    # flip "none", g = -0.1 in a correct completion: 0.5 * (1 + 0.5 * (e^-0.1 - 1)) = 0.476209355.
    np.testing.assert_allclose(cast_tokens([0.5], [-0.1], lam=0.5, flip="none"), [0.476209355], rtol=1e-6)


def test_lambda_large_hits_zero_floor():
    # lambda = 10, not flipped, g = -0.5 in a correct completion: w = 0.8 -> 1 + 10 * (-0.2) < 0 -> A = 0.
    np.testing.assert_array_equal(cast_tokens([0.5], [-0.5], lam=10.0, flip="none"), [0.0])


def test_lambda_linear_decay():
    rewards = mx.array([1, 0], dtype=mx.float32)  # scale none: B = +-0.5
    gaps = mx.array([[-0.5], [0.2]])
    params = dict(group_size=2, lambda_schedule="linear_decay", lambda_decay_steps=100)
    token, _ = compute_advantages("cast", rewards, gaps, mx.ones((2, 1)), step=50, **params)  # lambda 0.5
    np.testing.assert_allclose(np.array(token)[:, 0], [-0.55, 0.5125], rtol=1e-6)
    token, _ = compute_advantages("cast", rewards, gaps, mx.ones((2, 1)), step=150, **params)  # lambda 0
    np.testing.assert_allclose(np.array(token)[:, 0], [-0.5, 0.5], rtol=1e-6)  # still flipped, |A| = |B|


def test_deadband():
    tau = f32(0.05)
    # |g| <= tau never flips: g = -0.03 -> 0.5 * e^-0.03; g = -tau exactly -> 0.5 * e^-0.05;
    # g = -0.1 is outside and flips.
    out = cast_tokens([0.5, 0.5, 0.5, -0.5], [-0.03, -tau, -0.1, 0.03], flip_deadband=tau)
    np.testing.assert_allclose(out, [0.485222767, 0.475614712, -0.552585459, -0.485222767], rtol=1e-6)


def test_flip_down_and_none():
    # flip "down": the up-flip candidate (B < 0, g > 0) keeps its sign: -0.5 * clip(e^-0.03, 0.95, 1.2).
    out = cast_tokens([-0.5, 0.5], [0.03, -0.1], flip="down")
    np.testing.assert_allclose(out, [-0.485222767, -0.552585459], rtol=1e-6)
    # flip "none": both keep their sign; the box low edges bind (0.8 for correct, 0.95 for wrong).
    out = cast_tokens([0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, -0.1, 0.03], flip="none")
    np.testing.assert_allclose(out, [0.4, -0.475, 0.452418709, -0.485222767], rtol=1e-6)


def test_symmetric_box():
    box = (0.8, 1.2)
    out = cast_tokens([0.5, -0.5], [0.5, -0.5], correct_box=box, wrong_box=box)
    np.testing.assert_allclose(out, [0.6, -0.6], rtol=1e-6)


def test_sign_follows_gap_when_lambda_is_one():
    # Spec "worked consequence": with lambda = 1, sign(A) = sign(g) for every g != 0.
    rng = np.random.default_rng(0)
    bases = rng.choice([-1.0, -0.5, 0.25, 0.75, 1.0], size=200)
    gaps = rng.normal(scale=0.5, size=200)
    out = cast_tokens(bases, gaps)
    assert np.array_equal(np.sign(out), np.sign(gaps.astype(np.float32)))
    assert out.max() <= 1.05 + 1e-7 and out.min() >= -1.2 - 1e-7


def test_rlsd_lambda_schedule():
    rewards = mx.array([1, 0], dtype=mx.float32)
    gaps = mx.array([[0.1], [0.5]])
    expected = {  # B = +-0.5 (scale none); w = clip(e^{s g}, 0.8, 1.2)
        0: [0.5 * (0.5 + 0.5 * 1.105170918), -0.5 * (0.5 + 0.5 * 0.8)],
        25: [0.5 * (0.75 + 0.25 * 1.105170918), -0.5 * (0.75 + 0.25 * 0.8)],
        50: [0.5, -0.5],
        80: [0.5, -0.5],
    }
    for step, values in expected.items():
        token, _ = compute_advantages(
            "rlsd", rewards, gaps, mx.ones((2, 1)), group_size=2, step=step, scale_rewards="none"
        )
        np.testing.assert_allclose(np.array(token)[:, 0], values, rtol=1e-6, err_msg=f"step {step}")
    # Scale "group" (the RLSD default): B = 0.5 / (sqrt(0.5) + 1e-4).
    token, base = compute_advantages("rlsd", rewards, gaps, mx.ones((2, 1)), group_size=2, step=50)
    np.testing.assert_allclose(np.array(base), [0.707006795, -0.707006795], rtol=1e-6)


def test_mask_zeroes_padding_even_with_nan_gaps():
    rewards = mx.array([1, 0], dtype=mx.float32)
    gaps = mx.array([[0.1, float("nan")], [0.2, float("inf")]])
    mask = mx.array([[1, 0], [1, 0]])
    for name in ESTIMATORS:
        token, _ = compute_advantages(name, rewards, gaps, mask, group_size=2)
        assert np.array(token)[:, 1].tolist() == [0.0, 0.0], name
        assert np.all(np.isfinite(np.array(token)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="ppo"), "algorithm"),
        (dict(scale_rewards="std"), "scale_rewards"),
        (dict(flip="up"), "flip"),
        (dict(correct_box=(1.1, 1.0)), "correct_box"),
        (dict(a_max=0.0), "a_max"),
        (dict(flip_deadband=-0.1), "flip_deadband"),
        (dict(lambda_schedule="cosine"), "lambda_schedule"),
        (dict(lambda_schedule="linear_decay", lambda_decay_steps=0), "lambda_decay_steps"),
        (dict(cast_lamda=1.0), "cast_lamda"),
        (dict(cast_lambda=-1.0), "cast_lambda"),
        (dict(name="rlsd", rlsd_eps_w=1.5), "rlsd_eps_w"),
        (dict(name="rlsd", rlsd_lambda_steps=0), "rlsd_lambda_steps"),
        (dict(group_size=3), "group_size=3"),
        (dict(group_size=1), "group_size"),
    ],
)
def test_bad_input_names_the_field(kwargs, message):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "cast")
    group_size = kwargs.pop("group_size", 2)
    rewards = mx.array([1, 0, 1, 1], dtype=mx.float32)
    with pytest.raises(ValueError, match=message):
        compute_advantages(name, rewards, mx.zeros((4, 3)), mx.ones((4, 3)), group_size=group_size, **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="gaps"):
        compute_advantages("grpo", mx.zeros((4,)), mx.zeros((4, 2)), mx.ones((4, 3)), group_size=2)


# --------------------------------------------------------------------------- parity with the reference

# Gaps where a rule switches: e^{+-g} on a box edge, or |g| on a dead-band used below.
DEADBANDS = [0.0, f32(0.01), f32(0.05), f32(0.2)]
EDGES = [math.log(v) for v in (1.05, 1.2, 0.8, 0.95, 1 / 0.8, 1 / 0.95)] + DEADBANDS[1:]


def make_batch(rng, group_size, kinds, length):
    """Rewards, gaps and masks for groups of the given kinds ("correct", "wrong", "mixed")."""
    rewards = []
    for kind in kinds:
        if kind == "mixed":
            group = rng.integers(0, 2, size=group_size)
            group[0], group[rng.integers(1, group_size)] = 1, 0
            rng.shuffle(group)
        else:
            group = np.full(group_size, 1 if kind == "correct" else 0)
        rewards.extend(group)
    n = len(rewards)
    lengths = rng.integers(0, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)

    # A mixture: smooth gaps, exact zeros, values within 1e-6 of the switch points, exactly
    # on them, and large gaps.
    kind = rng.integers(0, 5, size=(n, length))
    edge = rng.choice(EDGES, size=(n, length)) * rng.choice([-1, 1], size=(n, length))
    gaps = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3],
        [rng.normal(scale=0.3, size=(n, length)), 0.0, edge + rng.uniform(-1e-6, 1e-6, size=(n, length)), edge],
        rng.normal(scale=3.0, size=(n, length)),
    ).astype(np.float32)
    gaps[mask == 0] = rng.choice([np.nan, 50.0, -50.0])  # garbage in the padding
    return np.array(rewards, dtype=np.float32), gaps, mask, group_size


@st.composite
def batches(draw):
    """A batch with all-correct / all-wrong / mixed groups, G in 2..16, and padding."""
    group_size = draw(st.integers(2, 16))
    kinds = draw(st.lists(st.sampled_from(["correct", "wrong", "mixed"]), min_size=1, max_size=4))
    length = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_batch(rng, group_size, kinds, length)


def assert_parity(name, rewards, gaps, mask, group_size, step, params):
    token, base = compute_advantages(
        name, mx.array(rewards), mx.array(gaps), mx.array(mask), group_size=group_size, step=step, **params
    )
    ref = torch_reference()
    ref_token, ref_base = ref.advantages(name, rewards, gaps, mask, group_size=group_size, step=step, **params)
    np.testing.assert_allclose(np.array(base), ref_base.cpu().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(token), ref_token.cpu().numpy(), rtol=1e-6, atol=1e-6)


cast_params = st.fixed_dictionaries(
    {
        "scale_rewards": st.sampled_from([None, "none", "group", "batch"]),
        "reward_std": st.sampled_from(["sample", "population"]),
        "zero_var_base": st.sampled_from([1.0, 0.0, 0.5]),
        "cast_lambda": st.sampled_from([1.0, 0.5, 0.25, 2.0, 7.0]),
        "lambda_schedule": st.sampled_from(["constant", "linear_decay"]),
        "lambda_decay_steps": st.sampled_from([10, 100]),
        "correct_box": st.sampled_from([(0.8, 1.05), (0.8, 1.2)]),
        "wrong_box": st.sampled_from([(0.95, 1.2), (0.8, 1.2)]),
        "a_max": st.sampled_from([1.2, 0.6, 10.0]),
        "flip": st.sampled_from(["both", "down", "none"]),
        "flip_deadband": st.sampled_from(DEADBANDS),
    }
)


@pytest.mark.torch
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), params=cast_params, step=st.integers(0, 150))
def test_cast_parity(batch, params, step):
    assert_parity("cast", *batch, step, params)


verl_params = st.fixed_dictionaries(
    {
        "scale_rewards": st.sampled_from([None, "none", "group", "batch"]),
        "reward_std": st.sampled_from(["sample", "population"]),
        "zero_var_base": st.sampled_from([1.0, 0.0]),
        "cast_lambda": st.sampled_from([1.0, 0.5, 3.0]),
        "correct_box": st.sampled_from([(0.8, 1.05), (0.8, 1.2)]),
        "wrong_box": st.sampled_from([(0.95, 1.2), (0.8, 1.2)]),
        "ratio_band": st.sampled_from([(1.0, 1.0), (0.9, 1.1), (0.5, 2.0)]),
        # parameters of the paper's rule that the port does not read
        "a_max": st.sampled_from([1.2, 0.1]),
        "flip": st.sampled_from(["both", "down"]),
    }
)


@pytest.mark.torch
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), params=verl_params, step=st.integers(0, 50))
def test_cast_verl_parity(batch, params, step):
    assert_parity("cast-verl", *batch, step, params)


def test_cast_verl_by_hand():
    # One mixed group (1, 0) and one all-wrong group (0, 0), one token each, group std scaling:
    # B = +-0.5 / (std 0.70711 + 1e-4) = +-0.70701; all wrong: -zero_var_base = -1.
    rewards = mx.array([1.0, 0.0, 0.0, 0.0])
    gaps = mx.array([[-0.5], [0.5], [0.05], [-0.5]])
    token, base = compute_advantages("cast-verl", rewards, gaps, mx.ones((4, 1)), group_size=2)
    b = 0.5 / (math.sqrt(0.5) + 1e-4)
    np.testing.assert_allclose(np.array(base), [b, -b, -1.0, -1.0], rtol=1e-6)
    # No flips: a teacher-negative token of the correct row keeps A > 0, shrunk to the low
    # edge of the correct box (0.8); the wrong row's teacher-positive token is shrunk to
    # 0.95; all-wrong tokens get -e^{-g} inside the wrong box [0.95, 1.2]: e^-0.05 and 1.2.
    np.testing.assert_allclose(np.array(token)[:, 0], [0.8 * b, -0.95 * b, -math.exp(-0.05), -1.2], rtol=1e-6)
    # sign(A) = sign(B) everywhere, and no final clip: B = 2 (zero_var_base) times 1.2.
    token, _ = compute_advantages("cast-verl", rewards, gaps, mx.ones((4, 1)), group_size=2, zero_var_base=2.0)
    assert float(token[3, 0]) == pytest.approx(-2.4)
    # The dead-band: |g| = 0.05 has e^g in [0.9, 1.1] -> g = 0 -> A = B exactly.
    token, _ = compute_advantages("cast-verl", rewards, gaps, mx.ones((4, 1)), group_size=2, ratio_band=(0.9, 1.1))
    assert float(token[2, 0]) == -1.0
    np.testing.assert_allclose(np.array(token)[[0, 1, 3], 0], [0.8 * b, -0.95 * b, -1.2], rtol=1e-6)


def test_cast_verl_rejects_a_bad_band():
    with pytest.raises(ValueError, match="ratio_band"):
        compute_advantages(
            "cast-verl", mx.array([1.0, 0.0]), mx.zeros((2, 1)), mx.ones((2, 1)), group_size=2, ratio_band=(1.1, 2.0)
        )


rlsd_params = st.fixed_dictionaries(
    {
        "scale_rewards": st.sampled_from([None, "none", "group", "batch"]),
        "rlsd_eps_w": st.sampled_from([0.2, 0.1]),
        "rlsd_lambda_start": st.sampled_from([0.5, 1.0]),
        "rlsd_lambda_steps": st.sampled_from([50, 10]),
    }
)


@pytest.mark.torch
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), params=rlsd_params, step=st.integers(0, 80))
def test_rlsd_parity(batch, params, step):
    assert_parity("rlsd", *batch, step, params)


@pytest.mark.torch
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    scale=st.sampled_from([None, "none", "group", "batch"]),
    reward_std=st.sampled_from(["sample", "population"]),
)
def test_grpo_parity(batch, scale, reward_std):
    # Extra parameters of other algorithms are accepted and ignored.
    assert_parity("grpo", *batch, 0, {"scale_rewards": scale, "reward_std": reward_std, "a_max": 0.1, "flip": "none"})


def test_population_std_by_hand():
    # one correct of four: mean 0.25; Bessel std 0.5, population std sqrt(3)/4
    rewards = mx.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    mask = mx.ones((8, 1))
    _, sample = compute_advantages("grpo", rewards, mx.zeros((8, 1)), mask, group_size=4, eps=0.0)
    _, population = compute_advantages("grpo", rewards, mx.zeros((8, 1)), mask, group_size=4, reward_std="population")
    np.testing.assert_allclose(np.array(sample)[:4], [1.5, -0.5, -0.5, -0.5], atol=1e-6)
    np.testing.assert_allclose(
        np.array(population)[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (3**0.5 / 4), atol=1e-5
    )
    assert np.array(population)[4:].tolist() == [0.0] * 4  # zero-variance: 0, not 0 / 1e-6
    with pytest.raises(ValueError, match="reward_std"):
        compute_advantages("grpo", rewards, mx.zeros((8, 1)), mask, group_size=4, reward_std="bessel")


# --------------------------------------------------------------------------- compiled


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]
    assert bucket_length(5, multiple=8) == 8
    with pytest.raises(ValueError, match="multiple"):
        bucket_length(5, multiple=0)


COMPILED_CASES = [
    ("grpo", {}),
    ("grpo", {"scale_rewards": "batch"}),
    ("cast", {}),
    ("cast", {"scale_rewards": "group", "flip": "down", "flip_deadband": f32(0.05), "cast_lambda": 0.5}),
    ("cast", {"lambda_schedule": "linear_decay", "lambda_decay_steps": 20, "flip": "none", "a_max": 0.6}),
    ("rlsd", {}),
    ("rlsd", {"scale_rewards": "none", "rlsd_eps_w": 0.1}),
    ("cast-verl", {}),
    ("cast-verl", {"ratio_band": (f32(0.9), f32(1.1)), "zero_var_base": 0.5}),
]


@pytest.mark.parametrize("name, params", COMPILED_CASES)
def test_compiled_equals_eager(name, params):
    # One shape bucket (N = 16, L in 33..64) so that each case compiles once.
    rng = np.random.default_rng(len(COMPILED_CASES))
    fn = CompiledAdvantages(name, group_size=4, **params)
    for step, length in ((0, 40), (7, 33), (30, 64)):
        kinds = ["mixed", "correct", "wrong", "mixed"]
        rewards, gaps, mask = (mx.array(x) for x in make_batch(rng, 4, kinds, length)[:3])
        eager_token, eager_base = compute_advantages(name, rewards, gaps, mask, group_size=4, step=step, **params)
        token, base = fn(rewards, gaps, mask, step=step)
        assert token.shape == eager_token.shape == (16, length)
        np.testing.assert_array_equal(np.array(base), np.array(eager_base))
        # Compiled kernels may fuse a multiply-add: allow an ulp.
        np.testing.assert_allclose(np.array(token), np.array(eager_token), rtol=1e-7, atol=1e-7)
    assert fn.compile_count == 1


def test_compiles_once_for_lengths_33_to_64():
    # a_max 1.234 is used by no other test, so this kernel starts uncompiled.
    fn = CompiledAdvantages("cast", group_size=4, a_max=1.234, lambda_schedule="linear_decay", lambda_decay_steps=5)
    before = compile_count()
    rng = np.random.default_rng(0)
    rewards = mx.array([1, 0, 0, 1, 1, 1, 1, 1], dtype=mx.float32)
    for step, length in enumerate(rng.integers(33, 65, size=10)):
        gaps = mx.array(rng.normal(size=(8, length)).astype(np.float32))
        token, _ = fn(rewards, gaps, mx.ones((8, int(length))), step=step)  # lambda changes every step
        assert token.shape == (8, length)
        mx.eval(token)
    assert fn.compile_count == 1
    assert compile_count() - before == 1
    fn(rewards, mx.zeros((8, 65)), mx.ones((8, 65)))  # a new bucket: one more trace
    assert fn.compile_count == 2


def test_compiled_rejects_bad_parameters_up_front():
    with pytest.raises(ValueError, match="wrong_box"):
        CompiledAdvantages("cast", group_size=2, wrong_box=(1.3, 1.2))
    with pytest.raises(ValueError, match="unknown"):
        CompiledAdvantages("grpo", group_size=2, not_a_param=1)
    assert set(DEFAULT_PARAMS) >= {"cast_lambda", "flip_deadband", "rlsd_lambda_steps"}


def test_registry_matches_the_recipe_schema():
    import typing

    from cast_mlx import config

    names = typing.get_args(typing.get_type_hints(config.AlgorithmConfig)["name"])
    assert set(ESTIMATORS) == set(names) == set(ALGORITHMS)
    for est in ESTIMATORS.values():
        assert set(est.params) <= set(DEFAULT_PARAMS), est.name  # every parameter is a recipe field
    assert ESTIMATORS["grpo"].kernel_params == ("scale_rewards", "eps", "reward_std")
    assert ESTIMATORS["grpo"].params[-2:] == ("special_tokens", "gap_centering")  # around every kernel
    assert ESTIMATORS["cast"].schedule_params == ("cast_lambda", "lambda_schedule", "lambda_decay_steps")
    assert not ESTIMATORS["grpo"].uses_teacher and ESTIMATORS["cast"].uses_teacher


def test_one_registration_serves_eager_and_compiled():
    from cast_mlx.algorithm import estimators

    def half_lambda(step, *, cast_lambda):
        return cast_lambda / (1 + step)

    toy_facts = AlgorithmFacts(
        "toy",
        uses_teacher=False,
        flips=False,
        clips_at_a_max=True,
        answer_free=True,
        zero_var_base=False,
        scale_rewards="group",
        teacher_context="question-only",
        summary="a test's estimator",
    )

    @estimators.register_estimator(toy_facts, schedule=half_lambda)  # facts and kernel in one step
    def toy(rewards, gaps, mask, lam, *, group_size, scale_rewards, eps, a_max):
        base = base_advantages(rewards, group_size=group_size, scale_rewards=scale_rewards, zero_var_value=0.0, eps=eps)
        return mx.where(mask != 0, lam * mx.clip(base[:, None], -a_max, a_max), 0.0), base

    try:
        assert ALGORITHMS["toy"] is toy_facts and ESTIMATORS["toy"].facts is toy_facts
        rewards = mx.array([1.0, 0.0, 1.0, 1.0])
        mask = mx.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
        gaps = mx.zeros((4, 3))
        params = dict(scale_rewards="none", a_max=0.25, cast_lambda=2.0)
        token, base = compute_advantages("toy", rewards, gaps, mask, group_size=2, step=1, **params)
        # B = +-0.5 in the mixed group, 0 in the all-correct one; lambda = 2 / (1 + 1) = 1
        assert np.array(base).tolist() == [0.5, -0.5, 0.0, 0.0]
        assert np.array(token).tolist() == [[0.25, 0.25, 0], [-0.25, 0, 0], [0, 0, 0], [0, 0, 0]]
        compiled = CompiledAdvantages("toy", group_size=2, **params)
        c_token, c_base = compiled(rewards, gaps, mask, step=1)
        assert np.array_equal(np.array(c_token), np.array(token))
        assert np.array_equal(np.array(c_base), np.array(base))
        with pytest.raises(ValueError, match="registered twice"):
            estimators.register_estimator("toy")(toy)
        with pytest.raises(ValueError, match="registered twice"):
            estimators.register_estimator(toy_facts)(toy)
    finally:
        estimators.ESTIMATORS.pop("toy", None)
        ALGORITHMS.pop("toy", None)


def test_the_facts_of_each_algorithm():
    rows = {
        name: (
            f.uses_teacher,
            f.flips,
            f.clips_at_a_max,
            f.answer_free,
            f.zero_var_base,
            f.scale_rewards,
            f.teacher_context,
        )
        for name, f in ALGORITHMS.items()
    }
    assert rows == {
        "grpo": (False, False, False, True, False, "group", "instructed"),
        "cast": (True, True, True, True, True, "none", "instructed"),
        "cast-verl": (True, False, False, True, True, "group", "same"),
        "rlsd": (True, False, False, False, False, "group", "privileged"),
    }
    for name, est in ESTIMATORS.items():
        assert est.facts is ALGORITHMS[name] and est.uses_teacher == ALGORITHMS[name].uses_teacher
        assert default_scale_rewards(name) == facts_of(name).scale_rewards
        # a kernel reads a_max exactly when it clips at it, zero_var_base exactly when it uses it
        assert ("a_max" in est.kernel_params) == est.facts.clips_at_a_max, name
        assert ("zero_var_base" in est.kernel_params) == est.facts.zero_var_base, name


def test_the_facts_match_what_the_kernels_do():
    """A large teacher gap against the row's sign: only an estimator that declares `flips`
    flips it, and only one that declares `clips_at_a_max` stays within a_max = 0.5."""
    rewards = mx.array([1.0, 0.0])
    gaps = mx.array([[-3.0], [3.0]])  # teacher-negative on the correct row, positive on the wrong
    mask = mx.ones((2, 1))
    for name, facts in ALGORITHMS.items():
        token, base = compute_advantages(name, rewards, gaps, mask, group_size=2, a_max=0.5, scale_rewards="none")
        flipped = bool(mx.any(token[:, 0] * base < 0).item())
        assert flipped == facts.flips, name
        if facts.clips_at_a_max:
            assert float(mx.abs(token).max().item()) <= 0.5, name
        zero_var, _ = compute_advantages(name, mx.array([1.0, 1.0]), mx.zeros((2, 1)), mask, group_size=2)
        assert bool(mx.any(zero_var != 0).item()) == facts.zero_var_base, name


def test_a_bad_registration_leaves_the_registry_unchanged():
    from cast_mlx.algorithm import estimators

    before_est, before_facts = dict(ESTIMATORS), dict(ALGORITHMS)

    def kernel(rewards, gaps, mask, lam, *, group_size, scale_rewards, eps, not_a_field):
        return gaps, rewards

    with pytest.raises(ValueError, match="declare it"):
        estimators.register_estimator("undeclared")(kernel)
    with pytest.raises(ValueError, match="declared twice"):
        declare(ALGORITHMS["grpo"])
    bad = dict(vars(ALGORITHMS["grpo"])) | {"name": "half", "teacher_context": "nowhere"}
    with pytest.raises(ValueError, match="teacher_context"):
        declare(AlgorithmFacts(**bad))
    with pytest.raises(ValueError, match="flips and zero-variance"):
        declare(AlgorithmFacts(**(bad | {"teacher_context": "question-only", "flips": True})))
    declare(AlgorithmFacts(**(bad | {"teacher_context": "question-only"})))
    try:
        with pytest.raises(ValueError, match="not_a_field"):
            estimators.register_estimator("half")(kernel)
        assert "half" not in ESTIMATORS
        with pytest.raises(ValueError, match="'half' is declared but no estimator is registered"):
            estimators.get_estimator("half")
    finally:
        ALGORITHMS.pop("half", None)
    assert ESTIMATORS == before_est and ALGORITHMS == before_facts


def test_a_registration_with_its_facts_is_all_or_nothing():
    """Registering an estimator with its AlgorithmFacts checks the facts, the three parts'
    signatures, their parameters and the facts against the kernel before either table
    changes: every failure below leaves both as they were."""
    from cast_mlx.algorithm import estimators

    before_est, before_facts = dict(ESTIMATORS), dict(ALGORITHMS)
    good = AlgorithmFacts(
        "half",
        uses_teacher=True,
        flips=False,
        clips_at_a_max=False,
        answer_free=True,
        zero_var_base=False,
        scale_rewards="group",
        teacher_context="question-only",
        summary="a test's estimator",
    )

    def kernel(rewards, gaps, mask, lam, *, group_size, scale_rewards, eps):
        return gaps, rewards

    def no_group_size(rewards, gaps, mask, lam, *, scale_rewards):
        return gaps, rewards

    def three_arrays(rewards, gaps, mask, *, group_size):
        return gaps, rewards

    def any_keyword(rewards, gaps, mask, lam, *, group_size, **params):
        return gaps, rewards

    def reads_a_field(rewards, gaps, mask, lam, *, group_size, not_a_field):
        return gaps, rewards

    def schedule_without_step(*, cast_lambda):
        return cast_lambda

    def positional_check(a_max):
        return None

    cases = [
        # the facts themselves
        (dataclasses.replace(good, teacher_context="nowhere"), {}, kernel, "teacher_context"),
        (dataclasses.replace(good, scale_rewards="max"), {}, kernel, "scale_rewards"),
        (dataclasses.replace(good, flips="yes"), {}, kernel, "flips must be a bool"),
        (dataclasses.replace(good, name=" "), {}, kernel, "must not be empty"),
        (dataclasses.replace(good, answer_free=True, teacher_context="privileged"), {}, kernel, "answer-free"),
        (dataclasses.replace(good, name="grpo"), {}, kernel, "registered twice"),
        # the parts: what they are called with, and with recipe fields only
        (good, {}, no_group_size, "kernel must take"),
        (good, {}, three_arrays, "kernel must take"),
        (good, {}, any_keyword, "kernel must take"),
        (good, {}, "not a function", "kernel must be a function"),
        (good, {"schedule": schedule_without_step}, kernel, "schedule must take"),
        (good, {"schedule": None}, kernel, "schedule must be a function"),
        (good, {"check": positional_check}, kernel, "check must take"),
        (good, {}, reads_a_field, r"\['not_a_field'\] are not fields"),
        # the facts against the kernel: no clip at a_max, no zero-variance base, without reading them
        (
            dataclasses.replace(good, clips_at_a_max=True),
            {},
            kernel,
            "clips_at_a_max, but its kernel does not read a_max",
        ),
        (dataclasses.replace(good, zero_var_base=True), {}, kernel, "zero_var_base, but its kernel does not read"),
        # neither a declared name nor facts
        (None, {}, kernel, "expected a declared name or AlgorithmFacts"),
    ]
    for facts, parts, fn, message in cases:
        with pytest.raises(ValueError, match=message):
            estimators.register_estimator(facts, **parts)(fn)
        assert ESTIMATORS == before_est and ALGORITHMS == before_facts, message
    with pytest.raises(TypeError):  # incomplete facts: every field is required
        AlgorithmFacts("half", uses_teacher=True)

    estimators.register_estimator(good)(kernel)  # the same facts with a fitting kernel register
    try:
        assert ALGORITHMS["half"] is good and ESTIMATORS["half"].kernel is kernel
        assert ESTIMATORS["half"].params == ("scale_rewards", "eps", "special_tokens", "gap_centering")
    finally:
        ESTIMATORS.pop("half", None)
        ALGORITHMS.pop("half", None)
    assert ESTIMATORS == before_est and ALGORITHMS == before_facts


# --------------------------------------------------------------------------- spec 4b switches


def test_special_tokens_follow_the_verifier_by_hand():
    # group 0 mixed (rewards 1, 0), group 1 all wrong; the last token of each row is an EOS
    rewards = mx.array([1.0, 0.0, 0.0, 0.0])
    gaps = mx.array([[0.5, -1.2], [0.3, -1.2], [-0.1, -1.2], [0.2, -1.2]])
    mask = mx.ones((4, 2))
    special = mx.array([[0, 1]] * 4)
    teacher, base = compute_advantages("cast", rewards, gaps, mask, group_size=2)
    verifier, _ = compute_advantages(
        "cast", rewards, gaps, mask, group_size=2, special=special, special_tokens="verifier"
    )
    b = np.array(base)
    assert b.tolist() == [0.5, -0.5, -1.0, -1.0]  # scale none; all-wrong: -zero_var_base
    # the paper: the EOS of the correct row is teacher-negative, so it is flipped down
    assert np.array(teacher)[0, 1] < 0
    # verifier: EOS = B in the mixed group, 0 in the all-wrong group; content tokens unchanged
    assert np.array(verifier)[:, 1].tolist() == [0.5, -0.5, 0.0, 0.0]
    np.testing.assert_array_equal(np.array(verifier)[:, 0], np.array(teacher)[:, 0])
    # GRPO already gives B (0 in zero-variance groups): the switch changes nothing there
    g_plain, _ = compute_advantages("grpo", rewards, gaps, mask, group_size=2)
    g_ver, _ = compute_advantages("grpo", rewards, gaps, mask, group_size=2, special=special, special_tokens="verifier")
    np.testing.assert_array_equal(np.array(g_plain), np.array(g_ver))
    with pytest.raises(ValueError, match="special-token mask is needed"):
        compute_advantages("cast", rewards, gaps, mask, group_size=2, special_tokens="verifier")
    with pytest.raises(ValueError, match="special_tokens"):
        compute_advantages("cast", rewards, gaps, mask, group_size=2, special=special, special_tokens="eos")


def test_verifier_special_tokens_take_the_final_clip_of_the_rule_that_has_one():
    # group scaling: one correct of four gives the correct row B = 0.75 / 0.5 = 1.5 > a_max
    rewards = mx.array([1.0, 0.0, 0.0, 0.0])
    gaps = mx.full((4, 2), 0.1)
    mask = mx.ones((4, 2))
    special = mx.array([[0, 1]] * 4)
    common = dict(group_size=4, special=special, special_tokens="verifier", scale_rewards="group", eps=0.0)
    cast, base = compute_advantages("cast", rewards, gaps, mask, a_max=1.2, **common)
    assert np.array(base)[0] == pytest.approx(1.5)
    assert np.array(cast)[0].tolist() == pytest.approx([1.2, 1.2])  # the EOS too, not B = 1.5
    # the port has no final clip: its EOS keeps the row's base
    verl, _ = compute_advantages("cast-verl", rewards, gaps, mask, a_max=1.2, **common)
    assert np.array(verl)[0, 1] == pytest.approx(1.5)


def test_gap_centering_by_hand():
    rewards = mx.array([1.0, 0.0])
    # row 0: content gaps -1.0, -0.6 (mean -0.8) and a special token; row 1: -0.2 and 0.2
    gaps = mx.array([[-1.0, -0.6, -3.0], [-0.2, 0.2, 0.0]])
    mask = mx.array([[1, 1, 1], [1, 1, 0]])
    special = mx.array([[0, 0, 1], [0, 0, 0]])
    centred = np.array(advantages_module().center_gaps(gaps, (mask != 0) * (special == 0)))
    np.testing.assert_allclose(centred, [[-0.2, 0.2, -2.2], [-0.2, 0.2, 0.0]], atol=1e-6)
    # under CAST the correct row's first token is no longer teacher-negative: not flipped
    plain, _ = compute_advantages("cast", rewards, gaps, mask, group_size=2)
    shifted, _ = compute_advantages("cast", rewards, gaps, mask, group_size=2, special=special, gap_centering=True)
    assert np.array(plain)[0, 1] < 0 < np.array(shifted)[0, 1]


def advantages_module():
    from cast_mlx.algorithm import advantages

    return advantages


@st.composite
def special_batches(draw):
    """Smooth gaps (no values at the switch points: centring moves them in float32), random
    special tokens plus the last real token of each row, and padding."""
    group_size = draw(st.integers(2, 8))
    kinds = draw(st.lists(st.sampled_from(["correct", "wrong", "mixed"]), min_size=1, max_size=3))
    length = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rewards, _, mask, _ = make_batch(rng, group_size, kinds, length)
    gaps = rng.normal(scale=0.8, size=mask.shape).astype(np.float32)
    special = (rng.random(mask.shape) < 0.15).astype(np.float32)
    lengths = mask.sum(1).astype(int)
    special[np.arange(len(lengths))[lengths > 0], lengths[lengths > 0] - 1] = 1.0
    return rewards, gaps, mask, special, group_size


@pytest.mark.torch
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=special_batches(),
    name=st.sampled_from(["cast", "rlsd", "grpo"]),
    rule=st.sampled_from(["teacher", "verifier"]),
    centring=st.booleans(),
    flip=st.sampled_from(["both", "none"]),
    scale=st.sampled_from([None, "group"]),
    a_max=st.sampled_from([1.2, 0.3]),
)
def test_special_tokens_and_centring_parity(batch, name, rule, centring, flip, scale, a_max):
    rewards, gaps, mask, special, group_size = batch
    params = {"special_tokens": rule, "gap_centering": centring, "flip": flip, "scale_rewards": scale, "a_max": a_max}
    token, base = compute_advantages(
        name,
        mx.array(rewards),
        mx.array(gaps),
        mx.array(mask),
        group_size=group_size,
        step=3,
        special=mx.array(special),
        **params,
    )
    ref = torch_reference()
    ref_token, ref_base = ref.advantages(
        name, rewards, gaps, mask, group_size=group_size, step=3, special=special, **params
    )
    np.testing.assert_allclose(np.array(base), ref_base.cpu().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(token), ref_token.cpu().numpy(), rtol=1e-5, atol=1e-5)
    # and the compiled path gives the eager values
    compiled = CompiledAdvantages(name, group_size=group_size, **params)
    c_token, _ = compiled(mx.array(rewards), mx.array(gaps), mx.array(mask), step=3, special=mx.array(special))
    np.testing.assert_allclose(np.array(c_token), np.array(token), rtol=1e-6, atol=1e-6)

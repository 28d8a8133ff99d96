"""The clipped loss (spec section 5), diagnostics (section 7) and the compiled loss."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cast_mlx.algorithm.compiled import CompiledPolicyLoss, compile_count
from cast_mlx.algorithm.estimators import compute_advantages
from cast_mlx.algorithm.loss import LOSS_AGGS, loss_norm, merge_norms, policy_loss
from cast_mlx.training.metrics import cast_diagnostics

from helpers import torch_reference

GARBAGE = 100.0  # log-prob values in the padding, which must not matter


def hand_batch():
    """Two completions (3 and 2 tokens) with ratios [1, 1.5, 0.5] and [1.1, 1]."""
    ratios = np.array([[1.0, 1.5, 0.5], [1.1, 1.0, 1.0]])
    old = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, GARBAGE]], dtype=np.float32)
    logp = (old + np.log(ratios)).astype(np.float32)
    logp[1, 2] = GARBAGE
    adv = np.array([[1.0, 1.0, -1.0], [-2.0, 0.5, 0.0]], dtype=np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.float32)
    return mx.array(logp), mx.array(old), mx.array(adv), mx.array(mask)


# Per-token losses of hand_batch with eps 0.2 / 0.28:
#   row 0: -min(1*1, 1*1) = -1;  -min(1.5, 1.28) = -1.28;  -min(-0.5, -0.8) = +0.8   (sum -1.48)
#   row 1: -min(-2.2, -2.2) = +2.2;  -min(0.5, 0.5) = -0.5                           (sum +1.70)
HAND = {
    "seq-mean-token-mean": (-1.48 / 3 + 1.7 / 2) / 2,  # 0.178333
    "token-mean": (-1.48 + 1.7) / 5,  # 0.044
    "seq-mean-token-sum-norm": (-1.48 + 1.7) / (2 * 3),  # 0.036667
}


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_hand_computed_loss(agg):
    loss, metrics = policy_loss(*hand_batch(), loss_agg=agg)
    assert loss.item() == pytest.approx(HAND[agg], abs=1e-6)
    # low: ratio 0.5 < 0.8 with A < 0; high: ratio 1.5 > 1.28 with A > 0; 5 tokens.
    assert metrics["clip_frac_low"].item() == pytest.approx(0.2)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.2)
    assert metrics["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 1) / 5, abs=1e-6)
    assert "kl_mean" not in metrics


def test_sequence_level_ratio_by_hand():
    """GSPO: every token of a completion takes exp(mean log-ratio) of its completion, so the
    clip decides per completion; the gradient at token t is that ratio times A_t (divided
    by the aggregation's counts)."""
    logp, old, adv, mask = hand_batch()
    s0, s1 = (1.0 * 1.5 * 0.5) ** (1 / 3), (1.1 * 1.0) ** (1 / 2)  # 0.9086, 1.0488: inside [0.8, 1.28]
    rows = [(-s0 - s0 + s0) / 3, (2 * s1 - 0.5 * s1) / 2]
    value, metrics = policy_loss(logp, old, adv, mask, importance_level="sequence")
    assert value.item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx((3 * s0 + 2 * s1) / 5, rel=1e-6)
    grad = mx.grad(lambda lp: policy_loss(lp, old, adv, mask, importance_level="sequence")[0])(logp)
    np.testing.assert_allclose(np.array(grad[0]), [-s0 / 6, -s0 / 6, s0 / 6], rtol=1e-5)
    np.testing.assert_allclose(np.array(grad[1, :2]), [2 * s1 / 4, -0.5 * s1 / 4], rtol=1e-5)
    # a completion whose mean ratio leaves the band is clipped as a whole: no gradient where A > 0
    far = old + mx.array([[0.6, 0.6, 0.6], [0.0, 0.0, 0.0]])  # s = e^0.6 = 1.82 > 1.28
    grad = mx.grad(lambda lp: policy_loss(lp, old, mx.ones(adv.shape), mask, importance_level="sequence")[0])(far)
    assert np.abs(np.array(grad[0])).max() == 0.0 and np.abs(np.array(grad[1, :2])).min() > 0
    with pytest.raises(ValueError, match="importance_level"):
        policy_loss(logp, old, adv, mask, importance_level="row")


def test_truncated_rows_are_dropped():
    truncated = mx.array([False, True])
    expected = {"seq-mean-token-mean": -1.48 / 3, "token-mean": -1.48 / 3, "seq-mean-token-sum-norm": -1.48 / 3}
    for agg, value in expected.items():
        loss, _ = policy_loss(*hand_batch(), loss_agg=agg, truncated=truncated)
        assert loss.item() == pytest.approx(value, abs=1e-6), agg
        loss, _ = policy_loss(*hand_batch(), loss_agg=agg, truncated=truncated, mask_truncated=False)
        assert loss.item() == pytest.approx(HAND[agg], abs=1e-6), agg
    # Everything truncated: no loss at all, and no NaN.
    loss, metrics = policy_loss(*hand_batch(), truncated=mx.array([True, True]))
    assert loss.item() == 0.0 and metrics["ratio_mean"].item() == 0.0


def test_k3_kl():
    logp, old, adv, mask = hand_batch()
    ref_logp = logp + math.log(2.0)  # ref - lp = ln 2 -> k3 = 2 - ln 2 - 1 = 0.30685282
    loss, metrics = policy_loss(logp, old, adv, mask, loss_agg="token-mean", beta=0.1, ref_logp=ref_logp)
    assert metrics["kl_mean"].item() == pytest.approx(0.30685282, abs=1e-6)
    assert loss.item() == pytest.approx(0.044 + 0.1 * 0.30685282, abs=1e-6)
    # beta 0 with a reference: the KL is reported but not added.
    loss, metrics = policy_loss(logp, old, adv, mask, loss_agg="token-mean", ref_logp=ref_logp)
    assert loss.item() == pytest.approx(0.044, abs=1e-6)
    assert metrics["kl_mean"].item() == pytest.approx(0.30685282, abs=1e-6)


def test_clip_fractions_follow_trl():
    # ratio < 0.8 counts only with A < 0, ratio > 1.28 only with A > 0.
    ratios = np.array([[0.5, 0.5, 1.5, 1.5, 1.0, 0.79, 1.29]])
    adv = mx.array([[-1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    logp = mx.array(np.log(ratios).astype(np.float32))
    _, metrics = policy_loss(logp, mx.zeros(logp.shape), adv, mx.ones(logp.shape))
    assert metrics["clip_frac_low"].item() == pytest.approx(2 / 7)
    assert metrics["clip_frac_high"].item() == pytest.approx(2 / 7)
    assert metrics["ratio_mean"].item() == pytest.approx(ratios.mean(), abs=1e-6)


def test_padding_does_not_change_loss():
    logp, old, adv, mask = hand_batch()
    wide = [mx.pad(x, [(0, 1), (0, 29)], constant_values=0.0) for x in (logp, old, adv, mask)]
    for agg in LOSS_AGGS:
        assert policy_loss(*wide, loss_agg=agg)[0].item() == pytest.approx(HAND[agg], abs=1e-6)


def test_errors_name_the_field():
    logp, old, adv, mask = hand_batch()
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(logp, old, adv, mask, loss_agg="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:, :2], mask)
    with pytest.raises(ValueError, match="truncated"):
        policy_loss(logp, old, adv, mask, truncated=mx.array([True, False, False]))


# --------------------------------------------------------------------------- gradient accumulation


def random_batch(seed, n=8, length=20):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.0, 0.5, size=(n, length)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(n, length))).astype(np.float32)
    adv = rng.normal(0, 1, size=(n, length)).astype(np.float32)
    lengths = rng.integers(0, length + 1, size=n)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    truncated = rng.random(n) < 0.3
    truncated[0] = False
    ref_logp = (old + rng.normal(0, 0.2, size=(n, length))).astype(np.float32)
    return logp, old, adv, mask, truncated, ref_logp


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_micro_batches_add_up_to_the_full_batch(agg):
    logp, old, adv, mask, truncated, ref_logp = (mx.array(x) for x in random_batch(1))
    opts = dict(loss_agg=agg, beta=0.05)
    full, full_metrics = policy_loss(logp, old, adv, mask, truncated=truncated, ref_logp=ref_logp, **opts)

    norm = loss_norm(mask, truncated)
    splits = [(0, 3), (3, 4), (4, 8)]

    def micro_sum(lp):
        total = mx.array(0.0)
        metrics = {}
        for a, b in splits:
            width = max(int(mask[a:b].sum(axis=1).max().item()), 1)  # trim each micro-batch's padding
            part = lambda x: x[a:b, :width]  # noqa: E731, B023  (used within the iteration)
            inputs = [part(x) for x in (lp, old, adv, mask)]
            loss, m = policy_loss(*inputs, truncated=truncated[a:b], ref_logp=part(ref_logp), norm=norm, **opts)
            total = total + loss
            metrics = {k: metrics.get(k, 0.0) + v for k, v in m.items()}
        return total, metrics

    total, metrics = micro_sum(logp)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    for k, v in full_metrics.items():
        assert metrics[k].item() == pytest.approx(v.item(), abs=1e-6), k

    def full_loss(lp):
        return policy_loss(lp, old, adv, mask, truncated=truncated, ref_logp=ref_logp, **opts)[0]

    full_grad = mx.grad(full_loss)(logp)
    micro_grad = mx.grad(lambda lp: micro_sum(lp)[0])(logp)
    np.testing.assert_allclose(np.array(micro_grad), np.array(full_grad), atol=1e-7)

    # The micro-batches' own norms merge into the full batch's norm.
    merged = merge_norms(loss_norm(mask[a:b], truncated[a:b]) for a, b in splits)
    for field in ("num_tokens", "num_seqs", "max_len"):
        assert mx.array(getattr(merged, field)).item() == mx.array(getattr(norm, field)).item(), field


def test_skipping_zero_advantage_rows_keeps_the_loss():
    """The trainer may skip zero-variance groups under GRPO/RLSD (beta = 0) given the full norm."""
    logp, old, adv, mask, _, _ = (mx.array(x) for x in random_batch(2))
    adv = adv * mx.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=mx.float32)[:, None]
    keep = mx.array([0, 1, 4, 5])
    for agg in LOSS_AGGS:
        full, _ = policy_loss(logp, old, adv, mask, loss_agg=agg)
        part, _ = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], loss_agg=agg, norm=loss_norm(mask))
        assert part.item() == pytest.approx(full.item(), abs=1e-7), agg


# --------------------------------------------------------------------------- parity with the reference


@st.composite
def loss_cases(draw):
    n = draw(st.integers(1, 12))
    length = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = rng.normal(-1.5, 1.0, size=(n, length)).astype(np.float32)
    logp = (old + rng.normal(0, draw(st.sampled_from([0.01, 0.3, 1.0])), size=(n, length))).astype(np.float32)
    adv = rng.normal(0, 1, size=(n, length)).astype(np.float32) * (rng.random((n, 1)) > 0.2)
    lengths = rng.integers(0, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    logp[mask == 0] = rng.choice([GARBAGE, -GARBAGE])
    ref_logp = (old + rng.normal(0, 0.3, size=(n, length))).astype(np.float32)
    truncated = rng.random(n) < 0.25
    opts = dict(
        loss_agg=draw(st.sampled_from(LOSS_AGGS)),
        eps_low=draw(st.sampled_from([0.2, 0.1])),
        eps_high=draw(st.sampled_from([0.28, 0.2])),
        mask_truncated=draw(st.booleans()),
        beta=draw(st.sampled_from([0.0, 0.04])),
        importance_level=draw(st.sampled_from(["token", "sequence"])),
    )
    return logp, old, adv, mask, truncated, ref_logp, opts


@pytest.mark.torch
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loss_cases())
def test_loss_and_gradient_match_torch(case):
    logp, old, adv, mask, truncated, ref_logp, opts = case
    ref_in = ref_logp if opts["beta"] > 0 else None

    mlx_ref = None if ref_in is None else mx.array(ref_in)

    def mlx_loss(lp):
        inputs = [mx.array(x) for x in (old, adv, mask)]
        return policy_loss(lp, *inputs, truncated=mx.array(truncated), ref_logp=mlx_ref, **opts)[0]

    loss, grad = mx.value_and_grad(mlx_loss)(mx.array(logp))

    ref = torch_reference()
    lp = ref.tensor(logp).requires_grad_(True)
    ref_loss = ref.policy_loss(lp, old, adv, mask, truncated=truncated, ref_logp=ref_in, **opts)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(np.array(grad), lp.grad.cpu().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.torch
def test_reference_gather_logprobs():
    import torch

    ref = torch_reference()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)) * 4
    ids = rng.integers(0, 7, size=(2, 3))
    out = ref.gather_logprobs(torch.tensor(logits), torch.tensor(ids), temperature=0.7).numpy()
    scaled = logits / 0.7
    expected = np.take_along_axis(scaled, ids[..., None], -1)[..., 0] - np.log(np.exp(scaled).sum(-1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5)


# --------------------------------------------------------------------------- diagnostics


def test_cast_diagnostics_by_hand():
    rewards = mx.array([1, 0, 1, 1, 0, 0], dtype=mx.float32)  # mixed, all correct, all wrong
    gaps = mx.array([[0.1, -0.2], [0.3, 0.0], [-0.5, 9.0], [0.05, 0.01], [-0.1, 0.2], [1.0, 1.0]])
    mask = mx.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [0, 0]])
    token, base = compute_advantages("cast", rewards, gaps, mask, group_size=2)
    # B = [0.5, -0.5, 1, 1, -1, -1]; A row by row:
    expected = [[0.525, -0.6], [0.525, -0.5], [-1.2, 0], [1.05, 1.01005017], [-1.10517092, 1.05], [0, 0]]
    np.testing.assert_allclose(np.array(token), expected, rtol=1e-6)

    d = {k: v.item() for k, v in cast_diagnostics(rewards, base, gaps, token, mask, a_max=1.2, group_size=2).items()}
    expected = {
        "groups/all_correct": 1 / 3,
        "groups/all_wrong": 1 / 3,
        "groups/mixed": 1 / 3,
        # 9 completion tokens.
        "gap/correct_pos/share": 3 / 9,
        "gap/correct_pos/abs_mean": (0.1 + 0.05 + 0.01) / 3,
        "gap/correct_pos/flipped": 0.0,
        "gap/correct_neg/share": 2 / 9,
        "gap/correct_neg/abs_mean": 0.35,
        "gap/correct_neg/flipped": 1.0,
        "gap/wrong_pos/share": 2 / 9,
        "gap/wrong_pos/abs_mean": 0.25,
        "gap/wrong_pos/flipped": 1.0,
        "gap/wrong_neg/share": 1 / 9,
        "gap/wrong_neg/abs_mean": 0.1,
        "gap/wrong_neg/flipped": 0.0,
        "gap/zero_share": 1 / 9,
        "flip/down_share": 2 / 9,
        "flip/up_share": 2 / 9,
        "adv/mean": 0.0838754721,
        "adv/min": -1.2,
        "adv/max": 1.05,
        "adv/at_a_max_share": 1 / 9,
    }
    assert set(d) == set(expected)
    for k, v in expected.items():
        assert d[k] == pytest.approx(v, abs=1e-6), k


# --------------------------------------------------------------------------- compiled


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_compiled_loss_equals_eager(agg, level):
    logp, old, adv, mask, truncated, ref_logp = (mx.array(x) for x in random_batch(3, length=45))
    opts = dict(loss_agg=agg, beta=0.05, eps_low=0.2, eps_high=0.28, importance_level=level)
    compiled = CompiledPolicyLoss(**opts)

    def eager(lp):
        return policy_loss(lp, old, adv, mask, truncated=truncated, ref_logp=ref_logp, **opts)

    def comp(lp):
        return compiled(lp, old, adv, mask, truncated=truncated, ref_logp=ref_logp)

    (e_loss, e_metrics), e_grad = mx.value_and_grad(eager)(logp)
    (c_loss, c_metrics), c_grad = mx.value_and_grad(comp)(logp)
    assert c_loss.item() == pytest.approx(e_loss.item(), rel=1e-7, abs=1e-7)
    assert set(c_metrics) == set(e_metrics) == {"clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean"}
    for k in e_metrics:
        assert c_metrics[k].item() == pytest.approx(e_metrics[k].item(), rel=1e-7, abs=1e-7), k
    np.testing.assert_allclose(np.array(c_grad), np.array(e_grad), rtol=1e-7, atol=1e-7)

    # An explicit norm is honoured too.
    norm = loss_norm(mask, max_len=64)
    e_loss = policy_loss(logp, old, adv, mask, truncated=truncated, ref_logp=ref_logp, norm=norm, **opts)[0]
    c_loss = compiled(logp, old, adv, mask, truncated=truncated, ref_logp=ref_logp, norm=norm)[0]
    assert c_loss.item() == pytest.approx(e_loss.item(), rel=1e-7, abs=1e-7)


def test_compiled_loss_compiles_once_per_bucket():
    compiled = CompiledPolicyLoss(eps_low=0.19, loss_agg="token-mean")  # parameters no other test uses
    before = compile_count()
    rng = np.random.default_rng(4)
    for length in rng.integers(33, 65, size=10):
        logp, old, adv, mask, truncated, _ = (mx.array(x) for x in random_batch(int(length), length=int(length)))
        loss, grad = mx.value_and_grad(lambda lp: compiled(lp, old, adv, mask, truncated=truncated)[0])(logp)  # noqa: B023
        mx.eval(loss, grad)
    assert compiled.compile_count == 1
    assert compile_count() - before == 1


def test_rows_with_loss():
    from cast_mlx.algorithm.loss import rows_with_loss

    adv = mx.array([[0.0, 0.0], [0.5, 0.0], [0.0, -1.0], [0.3, 0.3]])
    mask = mx.array([[1, 1], [1, 0], [1, 1], [1, 1]])
    truncated = mx.array([0.0, 0.0, 0.0, 1.0])
    assert rows_with_loss(adv, mask, truncated, beta=0.0, mask_truncated=True) == [1, 2]
    assert rows_with_loss(adv, mask, truncated, beta=0.0, mask_truncated=False) == [1, 2, 3]
    # with a KL term every row with tokens carries loss, even at zero advantage
    assert rows_with_loss(adv, mask, truncated, beta=0.1, mask_truncated=False) == [0, 1, 2, 3]


def test_end_of_turn_diagnostics_by_hand():
    from cast_mlx.training.metrics import end_of_turn_diagnostics

    # group 0 mixed (rows 0 correct, 1 wrong), group 1 all wrong (row 3 truncated: no EOS)
    rewards = mx.array([1.0, 0.0, 0.0, 0.0])
    gaps = mx.array([[0.2, -1.0], [-0.3, -0.5], [0.4, 0.1], [-0.2, -0.1]])
    adv = mx.array([[1.0, -0.8], [-1.0, -1.1], [-1.0, -1.2], [-1.0, -1.0]])
    mask = mx.ones((4, 2))
    special = mx.array([[0, 1], [0, 1], [0, 1], [0, 0]])
    eos = mx.array([[0, 1], [0, 1], [0, 1], [0, 0]])
    d = {k: float(v) for k, v in end_of_turn_diagnostics(rewards, gaps, adv, mask, special, eos, group_size=2).items()}
    assert d["eos/neg_gap_share"] == pytest.approx(2 / 3)  # -1.0, -0.5 of -1.0, -0.5, 0.1
    assert d["content/neg_gap_share"] == pytest.approx(3 / 5)  # -0.3, -0.2, -0.1 of 5 content tokens
    assert d["eos/adv_mean/mixed_correct"] == pytest.approx(-0.8)
    assert d["eos/adv_mean/mixed_wrong"] == pytest.approx(-1.1)
    assert d["eos/adv_mean/all_wrong"] == pytest.approx(-1.2)
    assert d["eos/adv_mean/all_correct"] == 0.0  # no such EOS: 0 by convention


def test_length_drift_rule_by_hand():
    from cast_mlx.training.metrics import length_drift

    # truncation 0.4 for three steps, then 0.7: the last 3-step mean (0.7) is 0.3 above the
    # lowest (0.4), and the reward fell: drift
    hist = [[0.4, 0.1]] * 3 + [[0.7, 0.0]] * 3
    assert length_drift(hist, window=3, rise=0.2)
    assert not length_drift(hist, window=3, rise=0.35)  # not that much
    assert not length_drift(hist[:5], window=3, rise=0.2)  # fewer than 2 windows of steps
    rising_reward = [[0.4, 0.1]] * 3 + [[0.7, 0.2]] * 3
    assert not length_drift(rising_reward, window=3, rise=0.2)  # longer answers that pay are fine
    # the lowest mean so far counts, not the first: down to 0.1, then back to 0.4
    dip = [[0.4, 0.1]] * 3 + [[0.1, 0.1]] * 3 + [[0.4, 0.1]] * 3
    assert length_drift(dip, window=3, rise=0.2)


def test_compiled_loss_pads_rows_to_powers_of_two():
    """Micro-batches cut by cost have any row count: 1..8 rows meet 4 compiled shapes, and
    the zero rows added change neither the loss nor the gradient."""
    from cast_mlx.algorithm.compiled import bucket_rows

    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    compiled = CompiledPolicyLoss(eps_low=0.17, loss_agg="seq-mean-token-mean")  # not used elsewhere
    for rows in range(1, 9):
        logp, old, adv, mask, truncated, _ = (mx.array(x) for x in random_batch(rows, n=rows, length=40))
        norm = loss_norm(mask, truncated, mask_truncated=True)
        eager = lambda lp: policy_loss(lp, old, adv, mask, eps_low=0.17, truncated=truncated, norm=norm)[0]  # noqa: B023,E731
        comp = lambda lp: compiled(lp, old, adv, mask, truncated=truncated, norm=norm)[0]  # noqa: B023,E731
        (e_loss, e_grad), (c_loss, c_grad) = mx.value_and_grad(eager)(logp), mx.value_and_grad(comp)(logp)
        assert c_loss.item() == pytest.approx(e_loss.item(), rel=1e-6, abs=1e-7)
        assert c_grad.shape == e_grad.shape
        np.testing.assert_allclose(np.array(c_grad), np.array(e_grad), rtol=1e-6, atol=1e-7)
    assert compiled.compile_count == 4

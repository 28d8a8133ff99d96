"""The numpy passes of scoring's log-softmax (`hostmath`) against a float64 reference."""

import mlx.core as mx
import numpy as np
import pytest

from cast_mlx.engine import hostmath

VOCAB = 49152  # SmolLM2's: long sums are where float32 reductions drift


@pytest.mark.parametrize("inv_temp", [1.0, 1 / 0.7])
def test_logits_stats_match_float64(inv_temp):
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((6, VOCAB)) * 3).astype(np.float32)
    z[:, :40] += 12  # a few likely tokens, as a model's logits have
    tokens = np.array([0, 5, 39, 100, 30000, VOCAB - 1])
    lp, ent, lse = hostmath.logits_stats(mx.array(z), tokens, inv_temp, with_entropy=True)
    z64 = z.astype(np.float64) * inv_temp
    top = z64.max(axis=1, keepdims=True)
    want_lse = (top + np.log(np.exp(z64 - top).sum(axis=1, keepdims=True)))[:, 0]
    p = np.exp(z64 - want_lse[:, None])
    np.testing.assert_allclose(np.array(lse), want_lse, atol=2e-5)
    np.testing.assert_allclose(np.array(lp), z64[np.arange(6), tokens] - want_lse, atol=2e-5)
    np.testing.assert_allclose(np.array(ent), want_lse - (p * z64).sum(axis=1), atol=2e-5)


def test_leading_axes_and_no_entropy():
    z = mx.random.normal((2, 3, 11), key=mx.random.key(1))
    tokens = np.array([[1, 2, 3], [4, 5, 10]])
    lp, ent, lse = hostmath.logits_stats(z, tokens, 1.0, with_entropy=False)
    assert lp.shape == ent.shape == lse.shape == (2, 3)
    assert float(mx.abs(ent).max()) == 0.0
    want = mx.take_along_axis(z, mx.array(tokens)[..., None], axis=-1)[..., 0] - mx.logsumexp(z, axis=-1)
    np.testing.assert_allclose(np.array(lp), np.array(want), atol=1e-6)
    np.testing.assert_allclose(np.array(lse), np.array(mx.logsumexp(z, axis=-1)), atol=1e-6)


def test_scoring_switch_is_off_by_default_and_restored():
    assert not hostmath.active()
    with hostmath.scoring():
        assert hostmath.active()
        with hostmath.scoring(False):
            assert not hostmath.active()
        assert hostmath.active()
    assert not hostmath.active()


def test_softmax_and_swiglu_match_mlx():
    scores = mx.random.normal((2, 3, 5, 7), key=mx.random.key(2)) * 4
    scores = mx.where(mx.arange(7) < 5, scores, mx.finfo(mx.float32).min)  # masked keys
    np.testing.assert_allclose(np.array(hostmath.softmax(scores)), np.array(mx.softmax(scores, axis=-1)), atol=1e-6)
    dead = mx.full((1, 4), mx.finfo(mx.float32).min)  # no visible key: uniform, not NaN
    np.testing.assert_allclose(np.array(hostmath.softmax(dead)), 0.25, atol=1e-7)
    gate = mx.array([[-200.0, -3.0, 0.0, 0.5, 4.0, 90.0]])
    x = mx.array([[1.0, -2.0, 3.0, 0.5, 1.5, -1.0]])
    got = np.array(hostmath.swiglu(gate, x))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.array(mx.sigmoid(gate) * gate * x), rtol=1e-6, atol=1e-7)

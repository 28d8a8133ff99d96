"""The CPU's fast exponentials: the same values and gradients as MLX's own ops, both paths."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import base as mlx_base

from cast_mlx.engine import fastmath, hostmath


@pytest.mark.parametrize("cpu", [True, False])
def test_exp_matches_mlx_exp_both_ways(cpu):
    x = mx.concatenate([mx.linspace(-87.0, 88.0, 20001), mx.array([0.0, -1e-8, 1e-8, -mx.inf])])
    got, want = np.array(fastmath.exp(x, cpu=cpu)), np.array(mx.exp(x))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert got[-1] == 0.0  # a masked logit stays masked
    if not cpu:
        assert np.array_equal(got, want)  # other backends: MLX's exp itself


def test_swiglu_matches_silu_times_up_in_values_and_gradients():
    gate = mx.random.normal((4, 7, 96), key=mx.random.key(0)) * 6
    up = mx.random.normal((4, 7, 96), key=mx.random.key(1))
    np.testing.assert_allclose(fastmath.swiglu(gate, up), nn.silu(gate) * up, rtol=1e-5, atol=1e-6)
    extreme = mx.array([-200.0, -90.0, 0.0, 90.0, 200.0])
    np.testing.assert_allclose(fastmath.swiglu(extreme, mx.ones(5)), nn.silu(extreme), rtol=1e-6, atol=1e-30)
    fast = mx.grad(lambda g, u: (fastmath.swiglu(g, u) ** 2).sum(), argnums=(0, 1))(gate, up)
    slow = mx.grad(lambda g, u: ((nn.silu(g) * u) ** 2).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _tiny(arch: str):
    from mlx_lm.models import llama, qwen2, qwen3

    module = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}[arch]
    common = dict(
        model_type=arch, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2, rope_theta=10000.0,
    )  # fmt: skip
    if arch == "qwen3":
        common.update(head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    mx.random.seed(3)
    model = module.Model(module.ModelArgs(**common))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_use_fast_swiglu_keeps_the_model_and_its_parameter_names(arch):
    model = _tiny(arch)
    ids = mx.array([[1, 5, 9, 2, 7]])
    names = [k for k, _ in tree_flatten(model.parameters())]
    before = model(ids)
    assert fastmath.use_fast_swiglu(model) == 2
    assert all(type(layer.mlp) is fastmath.SwiGLU for layer in model.model.layers)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    np.testing.assert_allclose(model(ids), before, rtol=1e-4, atol=1e-5)
    assert fastmath.use_fast_swiglu(model) == 0  # already swapped: nothing to do


def test_use_fast_swiglu_leaves_other_models_alone():
    other = nn.Module()
    other.model = nn.Module()
    other.model.layers = [nn.Module()]
    other.model.layers[0].mlp = nn.Linear(4, 4)
    assert fastmath.use_fast_swiglu(other) == 0
    assert type(other.model.layers[0].mlp) is nn.Linear
    assert fastmath.use_fast_swiglu(nn.Linear(2, 2)) == 0


def test_the_embedded_model_loads_with_the_fast_swiglu_on_the_cpu_only(smol):
    model, _ = smol
    kinds = {type(layer.mlp).__name__ for layer in model.model.layers}
    assert kinds == ({"SwiGLU"} if mx.default_device() == mx.cpu else {"MLP"})


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "bool_2d", "bool_4d", "additive", "one_query", "row_without_keys"]
)
def test_attention_matches_mlx_and_hands_back_what_it_does_not_cover(mask_kind):
    """The fast attention equals mlx-lm's (MLX's fused call) in values and gradients for the
    masks it covers, with grouped query heads and a cached prefix (S > L); the others go to
    mlx-lm's function unchanged."""
    b, hq, hk, length, prefix, d = 2, 6, 2, 1 if mask_kind == "one_query" else 5, 3, 8
    span = length + prefix
    keys_ = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((b, hq, length, d), key=keys_[0])
    k = mx.random.normal((b, hk, span, d), key=keys_[1])
    v = mx.random.normal((b, hk, span, d), key=keys_[2])
    visible = mx.arange(prefix, span)[:, None] >= mx.arange(span)[None]
    mask = {
        "none": None,
        "causal": "causal",
        "one_query": None,
        "bool_2d": visible,
        "bool_4d": mx.broadcast_to(visible & (mx.arange(span) > 0)[None], (b, 1, length, span)),
        "additive": mx.where(visible, 0.0, -1e9),
        "row_without_keys": mx.concatenate([mx.zeros((1, 1, length, span), dtype=mx.bool_),
                                            mx.broadcast_to(visible, (1, 1, length, span))]),
    }[mask_kind]  # fmt: skip
    scale = d**-0.5

    def fast(q):
        return fastmath.attention(q, k, v, None, scale=scale, mask=mask)

    def mlx(q):
        return mlx_base.scaled_dot_product_attention(q, k, v, None, scale=scale, mask=mask)

    got = fast(q)
    if mask_kind == "row_without_keys":  # MLX gives NaN there; ours uniform weights, finite
        assert bool(mx.all(mx.isfinite(got)))
        means = np.array(v[0]).mean(axis=1)  # [hk, d]: every key weighted alike
        want = np.repeat(means, hq // hk, axis=0)[:, None, :].repeat(length, axis=1)
        np.testing.assert_allclose(np.array(got[0]), want, atol=1e-5)
        np.testing.assert_allclose(np.array(got[1]), np.array(mlx(q)[1]), atol=1e-5)
        return
    np.testing.assert_allclose(np.array(got), np.array(mlx(q)), atol=1e-5)
    w = mx.random.normal(got.shape, key=mx.random.key(5))
    g_fast = mx.grad(lambda x: (fast(x) * w).sum())(q)
    g_mlx = mx.grad(lambda x: (mlx(x) * w).sum())(q)
    assert float(mx.abs(g_mlx).max()) > 1e-3
    np.testing.assert_allclose(np.array(g_fast), np.array(g_mlx), atol=1e-5)


def test_use_fast_attention_points_the_three_modules_at_it_once():
    import mlx_lm.models.llama as llama
    import mlx_lm.models.qwen3 as qwen3

    fastmath.use_fast_attention()
    assert llama.scaled_dot_product_attention is fastmath.attention
    assert qwen3.scaled_dot_product_attention is fastmath.attention
    assert fastmath.use_fast_attention() == 0  # already done


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_scoring_runs_the_blocks_softmax_and_swiglu_in_numpy_with_the_same_values(arch, monkeypatch):
    """Inside `hostmath.scoring()` (a forward no gradient is taken through) the attention's
    softmax and the SwiGLU are numpy's, and the model's output is unchanged."""
    fastmath.use_fast_attention()
    model = _tiny(arch)
    fastmath.use_fast_swiglu(model)
    ids = mx.array([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]])
    want = model(ids)
    calls = []
    for name in ("softmax", "swiglu"):
        real = getattr(hostmath, name)
        monkeypatch.setattr(hostmath, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    with hostmath.scoring():
        got = model(ids)
    assert calls.count("softmax") == 2 and calls.count("swiglu") == 2  # one of each a block
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)
    model(ids)
    assert len(calls) == 4  # off again outside the block


def test_scoring_leaves_half_precision_swiglu_to_mlx(monkeypatch):
    """Numpy has no bfloat16: a half-precision MLP (a 4-bit model's activations) keeps MLX's op."""
    model = _tiny("llama")
    fastmath.use_fast_swiglu(model)
    model.set_dtype(mx.bfloat16)
    mlp = model.model.layers[0].mlp
    x = mx.random.normal((2, 3, 32), key=mx.random.key(4)).astype(mx.bfloat16)
    want = mlp(x)
    monkeypatch.setattr(hostmath, "swiglu", lambda *a: pytest.fail("numpy got a bfloat16 array"))
    with hostmath.scoring():
        got = mlp(x)
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


# ---------------------------------------------------------------- the decode step's linears


def test_transposes_one_position_at_its_row_counts_without_bias():
    plain, biased = nn.Linear(8, 6, bias=False), nn.Linear(8, 6)
    for rows in (3, 4, 16, 24, 32, 40, 64):
        assert fastmath.transposes(plain, mx.zeros((rows, 1, 8))), rows
    for rows in (1, 2, 5, 8, 12, 15, 17, 20, 36):  # other row counts
        assert not fastmath.transposes(plain, mx.zeros((rows, 1, 8))), rows
    assert not fastmath.transposes(plain, mx.zeros((16, 3, 8)))  # several positions: scoring, prefill
    assert not fastmath.transposes(plain, mx.zeros((16, 8)))
    assert not fastmath.transposes(biased, mx.zeros((16, 1, 8)))


@pytest.mark.parametrize(
    "live, batch, kept",
    [
        (16, 16, 16),
        (12, 16, 16),
        (10, 16, 16),
        (9, 16, 9),
        (4, 16, 4),
        (1, 16, 1),
        (17, 32, 24),
        (20, 32, 24),
        (24, 32, 24),
        (25, 32, 32),
        (14, 32, 16),
        (14, 15, 14),
        (30, 48, 32),
        (33, 48, 40),
        (26, 30, 26),
    ],
)
def test_decode_rows_keeps_a_transposed_size_from_16_while_few_rows_are_finished(monkeypatch, live, batch, kept):
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", True)
    assert fastmath.decode_rows(live, batch) == kept
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", False)
    assert fastmath.decode_rows(live, batch) == live


@pytest.mark.parametrize("rows", [16, 32, 12, 3])
def test_transposed_linear_gives_the_linears_values(rows):
    layer = nn.Linear(576, 192, bias=False)
    x = mx.random.normal((rows, 1, 576), key=mx.random.key(rows))
    got = fastmath._transposed_linear(layer, x)
    assert got.shape == (rows, 1, 192)
    np.testing.assert_allclose(np.array(got), np.array(layer(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on", [True, False])
def test_decode_linears_swaps_the_call_only_inside_and_gives_it_back(monkeypatch, on):
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", on)
    before = nn.Linear.__call__
    with fastmath.decode_linears():
        assert (nn.Linear.__call__ is fastmath._transposed_linear) == on
    assert nn.Linear.__call__ is before
    with pytest.raises(RuntimeError), fastmath.decode_linears():
        raise RuntimeError("a failed step")
    assert nn.Linear.__call__ is before


def test_transposed_decode_by_default_on_the_cpu_with_mkl_only(monkeypatch):
    from cast_mlx.engine import blas

    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", None)
    monkeypatch.setattr(blas, "active_blas", lambda: "MKL (/x/libmkl_rt.so.2)")
    assert fastmath.transposed_decode() == fastmath.on_cpu()
    monkeypatch.setattr(blas, "active_blas", lambda: "OpenBLAS (/x/libopenblas.so)")
    assert not fastmath.transposed_decode()
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", True)
    assert fastmath.transposed_decode()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollout_draws_the_same_streams_with_transposed_decode_linears(monkeypatch, arch):
    """2 prompts x 8 streams: the first steps run 16 rows, transposed; compaction then takes
    the batch to other row counts, which keep the plain product."""
    from mlx_lm.tuner.lora import LoRALinear

    from cast_mlx.engine.rollout import SamplingParams, generate_groups

    model = _tiny(arch)
    layer = model.model.layers[1].self_attn
    layer.o_proj = LoRALinear.from_base(layer.o_proj, r=4)  # a LoRA layer's base goes the same way
    layer.o_proj.lora_b = mx.random.normal(layer.o_proj.lora_b.shape, key=mx.random.key(7)) * 0.1
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=24)
    real, taken = fastmath.transposes, []
    monkeypatch.setattr(fastmath, "transposes", lambda lin, x: taken.append(real(lin, x)) or taken[-1])
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", on)
        outs[on] = generate_groups(model, [[1, 5, 9, 2], [3, 4, 8]], 8, params, {0}, key=11)
        if on:  # 7 linears a block (qwen2's q/k/v have biases: 4), 2 blocks, at the 16-row steps
            assert sum(taken) >= (8 if arch == "qwen2" else 14) and not all(taken)
    assert np.array_equal(np.array(outs[True].tokens), np.array(outs[False].tokens))
    np.testing.assert_allclose(np.array(outs[True].logprobs), np.array(outs[False].logprobs), atol=1e-5)
    assert int(np.array(outs[True].lengths).max()) > 1


def test_compaction_keeps_finished_rows_up_to_decode_rows(monkeypatch):
    from cast_mlx.engine.rollout import _Streams

    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", True)
    out, rows = _Streams(16, 8, np.array([0])), np.arange(16)
    out.done[[1, 4, 6, 9]] = True  # 12 unfinished of 16: the batch stays at 16
    assert out.compaction(rows) is None
    out.done[[0, 2, 3, 5, 7]] = True  # 7 unfinished: those alone
    assert out.compaction(rows).tolist() == [8, 10, 11, 12, 13, 14, 15]
    out = _Streams(32, 8, np.array([0]))
    out.done[:18] = True  # 14 unfinished of 32: 16 rows, the first two finished ones padding
    assert out.compaction(np.arange(32)).tolist() == [0, 1, *range(18, 32)]
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", False)
    assert out.compaction(np.arange(32)).tolist() == list(range(18, 32))


def test_rollout_keeps_16_rows_while_few_have_finished_and_draws_the_same_streams(monkeypatch):
    from cast_mlx.engine import rollout
    from cast_mlx.engine.rollout import SamplingParams, generate_groups

    model = _tiny("llama")
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=24)
    real, batches = rollout.next_logits, []
    monkeypatch.setattr(rollout, "next_logits", lambda m, h, x, *a: batches.append(x.shape[0]) or real(m, h, x, *a))
    monkeypatch.setattr(fastmath, "TRANSPOSED_DECODE", True)
    held = generate_groups(model, [[1, 5, 9, 2], [3, 4, 8]], 8, params, {0, 1, 2}, key=5)
    sizes, batches[:] = list(batches), []
    monkeypatch.setattr(fastmath, "decode_rows", lambda live, batch: live)
    plain = generate_groups(model, [[1, 5, 9, 2], [3, 4, 8]], 8, params, {0, 1, 2}, key=5)
    assert sorted(set(batches)) != sorted(set(sizes))  # the two ran other batch sizes
    assert all(b == 16 or b < 10 for b in sizes) and min(sizes) < 16
    assert np.array_equal(np.array(held.tokens), np.array(plain.tokens))
    assert np.array_equal(np.array(held.lengths), np.array(plain.lengths))
    np.testing.assert_allclose(np.array(held.logprobs), np.array(plain.logprobs), atol=1e-5)

"""Packed scoring (`engine/packed.py`): the same log-probs as the bucketed path, in packs
that respect the budget; the teacher stage uses it for contexts of its own."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from cast_mlx.algorithm import teacher as tmod
from cast_mlx.engine import fastmath, logprobs, models, packed

VOCAB = 50


def _tiny(arch: str, lora: bool = True):
    from mlx_lm.models import llama, qwen2, qwen3

    module = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}[arch]
    common = dict(
        model_type=arch, hidden_size=32, num_hidden_layers=3, intermediate_size=48, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2, rope_theta=10000.0,
    )  # fmt: skip
    if arch == "qwen3":  # q/k norms and its own head_dim
        common.update(head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)
    mx.random.seed(5)
    model = module.Model(module.ModelArgs(**common))
    fastmath.use_fast_swiglu(model)
    fastmath.use_fast_attention()
    if lora:  # adapters with nonzero B, so that they change the forward
        models.attach_lora(model, rank=2, alpha=4, dropout=0.0, num_layers=2, keys=["self_attn.q_proj", "mlp.up_proj"])
        q = model.model.layers[-1].self_attn.q_proj
        q.lora_b = mx.random.normal(q.lora_b.shape) * 0.1
    mx.eval(model.parameters())
    model.eval()
    return model


def _rows(lengths, width=None, seed=0):
    width = width or max(lengths)
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(1, VOCAB, (len(lengths), width)).astype(np.int32))
    mask = mx.array((np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.float32))
    return tokens, mask


CTX_A, CTX_B, CTX_C = [3, 7, 9, 4, 11], [5, 2], [8]


def _bucketed(model, contexts, tokens, mask, numpy_passes, size=3):
    return logprobs.score_in_buckets(
        lambda b: logprobs.token_logprobs(model, b, 0.7, numpy_passes=numpy_passes), contexts, tokens, mask, size, True
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("numpy_passes", [True, False])
def test_packed_scores_what_the_buckets_score(arch, numpy_passes):
    model = _tiny(arch)
    assert packed.supported(model)
    lengths = [6, 1, 3, 6, 2, 0, 5, 4]  # a one-token row (its context's last state only) and an empty one
    tokens, mask = _rows(lengths, width=7)
    contexts = [CTX_A, CTX_A, CTX_B, CTX_A, CTX_B, CTX_C, CTX_C, CTX_B]  # interleaved contexts
    want = _bucketed(model, contexts, tokens, mask, numpy_passes)
    for budget in (1000, 12):  # one pack; and packs of a few rows (some rows alone)
        got = packed.packed_logprobs(model, contexts, tokens, mask, 0.7, budget, numpy_passes=numpy_passes)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-5)
        assert float(mx.abs(got).sum()) > 1.0 and float(mx.abs(got[5]).sum()) == 0.0


def test_a_masked_token_inside_a_row_is_zero_and_the_rest_as_scored():
    model = _tiny("llama")
    tokens, mask = _rows([5, 4])
    holed = mask * mx.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=mx.float32)
    got = np.array(packed.packed_logprobs(model, [CTX_A, CTX_B], tokens, holed, 1.0, 100))
    full = np.array(packed.packed_logprobs(model, [CTX_A, CTX_B], tokens, mask, 1.0, 100))
    assert got[0, 2] == 0.0 and full[0, 2] != 0.0
    np.testing.assert_array_equal(got * np.array(holed), full * np.array(holed))


def test_an_empty_context_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        packed.build_pack([[1, 2], []], np.ones((2, 3), np.int32), [3, 3])


def test_split_rows_keeps_packs_within_the_budget():
    contexts = [CTX_A] * 4 + [CTX_B] * 3 + [CTX_C]
    lengths = [10, 2, 7, 3, 9, 1, 4, 30]
    packs = packed.split_rows(contexts, lengths, budget=24)
    assert sorted(i for p in packs for i in p) == list(range(8))
    for p in packs:
        ctxs = {tuple(contexts[i]) for i in p}
        positions = sum(lengths[i] for i in p) + sum(len(c) for c in ctxs)
        assert positions <= 24 or p == [7]  # row 7 (30 tokens) alone exceeds it
        for c in ctxs:  # a context's rows padded to their longest: a bucket's size at most
            mine = [lengths[i] for i in p if tuple(contexts[i]) == c]
            assert len(mine) * max(mine) <= 24 or p == [7]
    assert [7] in packs
    assert packed.split_rows(contexts, lengths, budget=10**6) == [[0, 2, 3, 1, 4, 6, 5, 7]]  # longest first


def test_supported_only_for_the_backbones_it_reproduces(monkeypatch):
    assert not packed.supported(nn.Linear(2, 2))
    model = _tiny("llama", lora=False)
    monkeypatch.setattr(packed, "enabled", False)  # the memory plan's measurements
    assert not packed.supported(model)
    monkeypatch.setattr(packed, "enabled", True)
    assert packed.supported(model)
    model.args.model_type = "gemma"
    assert not packed.supported(model)


def test_the_teacher_stage_packs_contexts_of_its_own(monkeypatch):
    model = _tiny("qwen2")
    teacher = tmod.Teacher.create(model)
    lengths = [4, 2, 5, 1]
    tokens, mask = _rows(lengths)
    out = SimpleNamespace(tokens=tokens, logprobs=mx.zeros(tokens.shape), frozen=None)
    contexts, student = [CTX_A, CTX_A, CTX_B, CTX_B], [CTX_C] * 4
    calls = []
    real = packed.packed_logprobs
    monkeypatch.setattr(packed, "packed_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(same_context=False, temperature=1.0, micro_batch=2, share_prefix=True)
    gaps, lp_t = tmod.teacher_gaps(model, teacher, contexts, student, out, mask, **common)
    assert calls == [1]
    monkeypatch.setattr(packed, "supported", lambda m: False)  # the buckets, as before
    gaps_b, lp_b = tmod.teacher_gaps(model, teacher, contexts, student, out, mask, **common)
    assert calls == [1]
    np.testing.assert_allclose(np.array(lp_t), np.array(lp_b), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(gaps), np.array(gaps_b), rtol=1e-5, atol=2e-5)

"""The compiled static-shape decode (`generate_groups(compiled=True)`, engine/static_decode.py)
on the tiny random llama: the same ids and log-probs as the batched-cache path for the same
key, with prompts of different lengths (left padding), streams that finish early
(compaction), greedy and filtered sampling on both samplers, cache-capacity buckets crossed
mid-generation, kept frozen-block states, changed weights, LoRA and quantized models, and no
model kept alive."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from cast_mlx.engine import models, rollout, static_decode
from cast_mlx.engine.rollout import SamplingParams, generate_groups

# Prompts of 3, 12 and 29 tokens: rows start at different columns of the batched cache.
PROMPTS = [[5, 9, 30], [7 + (i % 50) for i in range(12)], [11 + (3 * i) % 80 for i in range(29)]]
# Many "EOS" ids, so that random-weight streams end at different steps.
EOS = set(range(40, 52))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, _ = models.load(str(tiny_model_dir))
    return model


@pytest.fixture()
def small_bucket(monkeypatch):
    """A capacity step of 8 positions: every rollout here crosses several buckets."""
    monkeypatch.setattr(static_decode, "CACHE_BUCKET", 8)
    sizes: list[tuple[int, int]] = []
    original = static_decode.StaticDecoder.next_logits

    def spy(self, inputs, keep=None):
        sizes.append((int(inputs.shape[0]), self.size))
        out = original(self, inputs, keep)
        sizes[-1] = (sizes[-1][0], self.size)  # the capacity the step ran with
        return out

    monkeypatch.setattr(static_decode.StaticDecoder, "next_logits", spy)
    return sizes


def rows_of(out: rollout.Rollout) -> list[list[int]]:
    return [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]


def assert_same_rollout(got: rollout.Rollout, want: rollout.Rollout, atol: float = 1e-5) -> None:
    assert rows_of(got) == rows_of(want)
    assert got.finish_reasons == want.finish_reasons
    np.testing.assert_allclose(np.array(got.logprobs), np.array(want.logprobs), atol=atol)


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 20},
        {"temperature": 1.2, "min_p": 0.05, "max_batch": 5},  # waves of one group
    ],
)
def test_compiled_decode_draws_the_batched_caches_ids(tiny, small_bucket, kw, on_device):
    params = SamplingParams(max_new_tokens=30, **kw)
    want = generate_groups(tiny, PROMPTS, 4, params, EOS, key=7, on_device=on_device)
    got = generate_groups(tiny, PROMPTS, 4, params, EOS, key=7, on_device=on_device, compiled=True)
    assert_same_rollout(got, want)
    if kw["temperature"] > 0:
        assert len(set(want.lengths.tolist())) > 2  # streams ended at different steps
        assert len({b for b, _ in small_bucket}) > 2  # so the batch was compacted
    assert len({c for _, c in small_bucket}) > 2  # and the capacity grew mid-generation
    assert all(c % 8 == 0 for _, c in small_bucket)


def test_compiled_decode_keeps_the_same_frozen_states(tiny, small_bucket):
    params = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=24, max_batch=8)
    want = generate_groups(tiny, PROMPTS, 4, params, EOS, key=3, keep_states=1)
    got = generate_groups(tiny, PROMPTS, 4, params, EOS, key=3, keep_states=1, compiled=True)
    assert_same_rollout(got, want)
    assert got.frozen is not None and want.frozen is not None and got.frozen.split == 1
    for a, b in zip(got.frozen.prompts, want.frozen.prompts):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)
    # past a row's last fed-back token: zeros or discarded draws, so compare the kept part
    lengths = np.array(want.lengths)
    keep = np.arange(want.tokens.shape[1])[None, :] < lengths[:, None] - 1
    diff = np.abs(np.array(got.frozen.completions) - np.array(want.frozen.completions))
    assert float(diff[keep].max()) < 1e-5


def test_one_trace_per_shape_reused_across_rollouts_and_changed_weights(tiny_model_dir):
    """The compiled step lives with the model: a second rollout of the same shapes traces
    nothing, yet sees the model's current weights (they are the step's inputs)."""
    model, _ = models.load(str(tiny_model_dir))
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    generate_groups(model, PROMPTS[:2], 2, params, set(), key=0, compiled=True)
    step = static_decode.step_of(model, rollout._step_logits, 0)
    traces = step.traces
    assert traces >= 1
    generate_groups(model, PROMPTS[:2], 2, params, set(), key=1, compiled=True)
    assert step.traces == traces
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight = mlp.up_proj.weight * 3.0
    model.model.norm.weight = model.model.norm.weight * 0.5
    model.model.embed_tokens.weight = model.model.embed_tokens.weight[::-1] * 1.5  # the tied head too
    want = generate_groups(model, PROMPTS[:2], 2, params, set(), key=0)
    got = generate_groups(model, PROMPTS[:2], 2, params, set(), key=0, compiled=True)
    assert_same_rollout(got, want)
    assert step.traces == traces


def test_the_compiled_step_does_not_keep_its_model_alive(tiny_model_dir):
    model, _ = models.load(str(tiny_model_dir))
    generate_groups(model, PROMPTS[:1], 2, SamplingParams(max_new_tokens=3), set(), key=0, compiled=True)
    key = (id(model), 0, rollout._step_logits)
    assert key in static_decode._STEPS
    del model
    gc.collect()
    assert key not in static_decode._STEPS


def test_lora_model_and_unsupported_models(tiny_model_dir, monkeypatch):
    """A LoRA model decodes with its adapters merged, as without `compiled`, also after its
    adapters changed (as a training step changes them); a model type the fixed cache does not
    cover falls back to the batched cache."""
    model, _ = models.load(str(tiny_model_dir))
    models.attach_lora(model, rank=4, alpha=8.0, dropout=0.0, num_layers=1, keys=["self_attn.q_proj", "mlp.up_proj"])
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    for seed in (1, 2):
        for proj in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].mlp.up_proj):
            proj.lora_b = mx.random.normal(proj.lora_b.shape, key=mx.random.key(seed)) * 0.5
        want = generate_groups(model, PROMPTS, 3, params, EOS, key=5, keep_states=1)
        got = generate_groups(model, PROMPTS, 3, params, EOS, key=5, keep_states=1, compiled=True)
        assert_same_rollout(got, want)

    assert static_decode.supported(model)
    monkeypatch.setattr(model.args, "model_type", "phi3")
    assert not static_decode.supported(model)
    made = []
    monkeypatch.setattr(static_decode.StaticDecoder, "__init__", lambda *a, **k: made.append(1))
    assert_same_rollout(generate_groups(model, PROMPTS, 3, params, EOS, key=5, keep_states=1, compiled=True), want)
    assert made == []


def test_quantized_model(tiny_model_dir):
    model, _ = models.load(str(tiny_model_dir))
    nn.quantize(model, group_size=32, bits=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    want = generate_groups(model, PROMPTS, 3, params, EOS, key=4)
    assert_same_rollout(generate_groups(model, PROMPTS, 3, params, EOS, key=4, compiled=True), want)

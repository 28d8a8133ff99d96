"""The decode's KV cache and attention in numpy (`engine/host_kv.py`) against mlx-lm's
`BatchKVCache`: the same logits step by step (left padding, compaction), the same rollouts,
and the cases it leaves to MLX."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache

from cast_mlx.engine import host_kv, kv_forward, rollout
from cast_mlx.engine.rollout import SamplingParams, generate_groups


@pytest.fixture(scope="module")
def setup(smol):
    model, tok = smol
    questions = ["What is 2+3?", "Write a haiku about autumn leaves falling slowly.", "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # left padding differs by row
    return model, tok, prompts, set(tok.eos_token_ids)


def _decode(model, prompts, host: bool, steps: int = 6, drop_at: int = 3):
    """Greedy decode of 2 streams a prompt; at step `drop_at` rows 1 and 4 leave the batch
    (compaction). Returns the logits of every step, and the caches' kind."""
    head = kv_forward.plain_head(model)
    cache, logits, _ = kv_forward.prefill(model, head, prompts, room=steps)
    kv_forward.filter_cache(cache, np.repeat(np.arange(len(prompts)), 2))
    if host:
        assert host_kv.usable(model, cache)
        cache = host_kv.to_host(model, cache, steps)
    ids = np.repeat(logits.argmax(-1), 2)
    out = []
    for t in range(steps):
        if t == drop_at:
            keep = np.array([0, 2, 3, 5])
            kv_forward.filter_cache(cache, keep)
            ids = ids[keep]
        step = kv_forward.next_logits(model, head, mx.array(ids[:, None].astype(np.int32)), cache)
        out.append(step)
        ids = step.argmax(-1)
    return out, {type(c) for c in cache}


def test_host_cache_gives_mlx_caches_logits_with_padding_and_compaction(setup):
    model, _, prompts, _ = setup
    ours, kinds = _decode(model, prompts, host=True)
    theirs, their_kinds = _decode(model, prompts, host=False)
    assert kinds == {host_kv.HostKVCache} and their_kinds == {BatchKVCache}
    assert [a.shape for a in ours] == [b.shape for b in theirs] and ours[-1].shape[0] == 4
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-5)  # logits of magnitude ~20
        assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("on_device", [False, True])
def test_rollouts_with_the_host_cache_equal_mlx_caches(setup, monkeypatch, on_device):
    """Sampled rollouts in waves with compaction, both decode paths, kept states too: the same
    ids, finish reasons and log-probs (to rounding) as on mlx-lm's cache, and the host cache
    did run (its attention was called)."""
    model, _, prompts, eos = setup
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=24, max_batch=4)
    calls = []
    attend = host_kv.HostKVCache.attend
    monkeypatch.setattr(host_kv.HostKVCache, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    ours = generate_groups(model, prompts, 4, params, eos, key=3, on_device=on_device, keep_states=20)
    assert len(calls) > 0
    monkeypatch.setattr(host_kv, "enabled", False)
    theirs = generate_groups(model, prompts, 4, params, eos, key=3, on_device=on_device, keep_states=20)
    assert len(set(theirs.lengths.tolist())) > 1  # streams ended at different steps
    assert ours.tokens.tolist() == theirs.tokens.tolist() and ours.finish_reasons == theirs.finish_reasons
    np.testing.assert_allclose(np.array(ours.logprobs), np.array(theirs.logprobs), atol=1e-4)
    np.testing.assert_allclose(np.array(ours.frozen.completions), np.array(theirs.frozen.completions), atol=1e-3)


def test_cases_left_to_mlx(setup, monkeypatch):
    model, _, prompts, _ = setup
    head = kv_forward.plain_head(model)
    cache, _, _ = kv_forward.prefill(model, head, prompts[:1], room=4)
    assert host_kv.usable(model, cache)
    monkeypatch.setattr(host_kv, "enabled", False)
    assert not host_kv.usable(model, cache) and host_kv.to_host(model, cache, 4) is cache
    monkeypatch.setattr(host_kv, "enabled", True)
    half = [BatchKVCache([0]) for _ in cache]
    for c, h in zip(cache, half):
        h.keys, h.values, h.offset, h._idx = c.keys.astype(mx.bfloat16), c.values.astype(mx.bfloat16), c.offset, c._idx
    assert not host_kv.usable(model, half)  # numpy has no bfloat16
    monkeypatch.setattr(model.args, "model_type", "gemma")
    assert not host_kv.usable(model, cache)


def test_one_position_a_step_and_no_more_than_its_room(setup):
    model, _, prompts, _ = setup
    head = kv_forward.plain_head(model)
    cache, _, _ = kv_forward.prefill(model, head, prompts[:1], room=2)
    host = host_kv.to_host(model, cache, 1)
    k = mx.zeros((1, host[0].host_keys.shape[1], 2, host[0].host_keys.shape[3]))
    with pytest.raises(ValueError, match="one position a row"):
        host[0].update_and_fetch(k, k)
    ids = mx.array([[5]], dtype=mx.int32)
    kv_forward.next_logits(model, head, ids, host)  # fills its one position of room
    with pytest.raises(ValueError, match="full"):
        kv_forward.next_logits(model, head, ids, host)


def test_the_rollout_uses_it_on_the_cpu(setup, monkeypatch):
    model, _, prompts, eos = setup
    seen = []
    real = rollout.host_kv.to_host
    monkeypatch.setattr(rollout.host_kv, "to_host", lambda m, c, room: seen.append(room) or real(m, c, room))
    generate_groups(model, prompts, 2, SamplingParams(temperature=0, max_new_tokens=5), eos, key=0)
    assert seen == [5]

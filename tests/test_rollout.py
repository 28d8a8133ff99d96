"""The rollout engine on the embedded SmolLM2: exact greedy streams, seeded sampling, log-probs
that a plain scoring forward reproduces, finish reasons, waves, LoRA and quantized models."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step

from cast_mlx.engine import kv_forward, models, rollout, sampler
from cast_mlx.engine.rollout import SamplingParams, generate_groups
from cast_mlx.engine.sampler import inverse_cdf, keep_mask, sample_tokens

QUESTIONS = [
    "What is 2+3?",
    "Write a haiku about autumn leaves falling slowly in the quiet park.",
    "Hi",
]


def chat(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def greedy_reference(model, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    """Single-sequence greedy decoding with mlx-lm's own `generate_step` (argmax, one
    sequence, its own KV cache, no padding)."""
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_new):
        out.append(int(token))
        if out[-1] in eos:
            break
    return out


def score(model, prompt: list[int], completion: list[int], temperature: float) -> np.ndarray:
    """`log_softmax(logits / T)` of each completion token from one plain forward pass.

    The normaliser is summed in float64: `mx.logsumexp` over a 49k vocabulary in float32 is
    itself off by up to ~6e-5 (measured), which would eat most of the 1e-4 tolerance."""
    logits = model(mx.array([prompt + completion]))[0].astype(mx.float32)
    z = np.array(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)] / temperature, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    logp = z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
    return logp[np.arange(len(completion)), completion]


def rows_of(out: rollout.Rollout) -> list[list[int]]:
    return [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]


@pytest.fixture(scope="module")
def setup(smol):
    model, tok = smol
    prompts = [chat(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    return model, tok, prompts, set(tok.eos_token_ids)


@pytest.fixture(scope="module")
def greedy(setup):
    model, _, prompts, eos = setup
    return generate_groups(model, prompts, 2, SamplingParams(temperature=0, max_new_tokens=12), eos, key=0)


@pytest.fixture(scope="module")
def sampled(setup):
    model, _, prompts, eos = setup
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12)
    return generate_groups(model, prompts, 3, params, eos, key=2)


# --------------------------------------------------------------------------- engine


def test_greedy_streams_equal_single_sequence_decoding(setup, greedy):
    model, _, prompts, eos = setup
    assert greedy.tokens.shape[0] == 6 and greedy.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for i, prompt in enumerate(prompts):
        ref = greedy_reference(model, prompt, 12, eos)
        for row in (2 * i, 2 * i + 1):
            assert rows_of(greedy)[row] == ref, f"prompt {i} row {row}"
    # The three prompts end differently: EOS inside the budget for the short answers.
    assert greedy.finish_reasons == ["eos", "eos", "length", "length", "eos", "eos"]


def test_greedy_logprobs_are_at_temperature_one(setup, greedy):
    model, _, prompts, _ = setup
    for row, completion in enumerate(rows_of(greedy)):
        ref = score(model, prompts[row // 2], completion, 1.0)
        np.testing.assert_allclose(np.array(greedy.logprobs[row, : len(completion)]), ref, atol=1e-4)


def test_sampled_logprobs_match_a_scoring_forward(setup, sampled):
    model, _, prompts, _ = setup
    worst = 0.0
    for row, completion in enumerate(rows_of(sampled)):
        ref = score(model, prompts[row // 3], completion, 0.8)
        got = np.array(sampled.logprobs[row, : len(completion)])
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < 1e-4
    # Padding positions carry nothing.
    assert float(mx.sum(mx.abs(sampled.logprobs) * (1 - sampled.mask)).item()) == 0.0


def test_finish_reasons_lengths_and_mask_are_consistent(setup, greedy, sampled):
    _, _, prompts, eos = setup
    for out, max_new in ((greedy, 12), (sampled, 12)):
        assert out.tokens.dtype == mx.int32 and out.mask.dtype == mx.float32
        assert out.tokens.shape == out.mask.shape == out.logprobs.shape
        assert out.tokens.shape[1] == max(out.lengths.tolist()) <= max_new
        assert out.mask.sum(axis=1).tolist() == out.lengths.tolist()
        assert out.decode_tokens == sum(out.lengths.tolist())
        assert out.prefill_tokens == sum(len(p) for p in prompts)
        assert out.prompt_ids == prompts
        for row, reason in zip(rows_of(out), out.finish_reasons):
            if reason == "eos":
                assert row[-1] in eos and not eos & set(row[:-1])
            else:
                assert reason == "length" and len(row) == max_new and not eos & set(row)
        padded = np.array(out.tokens) * (1 - np.array(out.mask))
        assert not padded.any()
    assert set(sampled.finish_reasons) == {"eos", "length"}


SMALL = SamplingParams(temperature=1.0, max_new_tokens=6)


def test_same_seed_same_ids_different_seed_differs(setup):
    model, _, prompts, eos = setup
    first = generate_groups(model, prompts[:1], 4, SMALL, eos, key=5)
    again = generate_groups(model, prompts[:1], 4, SMALL, eos, key=mx.random.key(5))
    assert rows_of(again) == rows_of(first)
    assert np.array_equal(np.array(again.logprobs), np.array(first.logprobs))
    other = generate_groups(model, prompts[:1], 4, SMALL, eos, key=6)
    assert rows_of(other) != rows_of(first)
    # Streams of one group are different samples, not copies.
    assert len({tuple(r) for r in rows_of(first)}) > 1


def test_the_filter_order_reaches_both_draw_paths(setup):
    """With top-k 3 and top-p 0.6 the orders keep other sets wherever top-3 holds < 100% of
    the mass: the same key draws other ids; the host and the device path the same ones."""
    model, _, prompts, eos = setup
    kw = dict(temperature=1.0, top_k=3, top_p=0.6, max_new_tokens=16)
    joint = generate_groups(model, prompts[:1], 4, SamplingParams(**kw), eos, key=3)
    params = SamplingParams(**kw, filter_order="sequential")
    sequential = generate_groups(model, prompts[:1], 4, params, eos, key=3)
    assert rows_of(sequential) != rows_of(joint)
    on_device = generate_groups(model, prompts[:1], 4, params, eos, key=3, on_device=True)
    assert rows_of(on_device) == rows_of(sequential)


def test_waves_give_the_same_results(setup, greedy, sampled):
    model, _, prompts, eos = setup
    waves = generate_groups(
        model, prompts, 2, SamplingParams(temperature=0, max_new_tokens=12, max_batch=2), eos, key=0
    )
    assert rows_of(waves) == rows_of(greedy)
    assert waves.finish_reasons == greedy.finish_reasons
    # Sampling too: each stream's random numbers do not depend on its batch.
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12, max_batch=4)  # 1 group per wave
    sampled_waves = generate_groups(model, prompts, 3, params, eos, key=2)
    assert rows_of(sampled_waves) == rows_of(sampled)
    np.testing.assert_allclose(np.array(sampled_waves.logprobs), np.array(sampled.logprobs), atol=1e-4)


def test_a_slice_of_the_streams_reproduces_the_whole_rollout(setup, sampled):
    """Data parallelism: each process samples its prompts as streams [offset, offset + n) of
    the global rollout and must draw exactly what the single-process rollout drew there."""
    model, _, prompts, eos = setup
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12)
    rows = []
    for i, prompt in enumerate(prompts):
        part = generate_groups(model, [prompt], 3, params, eos, key=2, stream_offset=3 * i, total_streams=9)
        rows += rows_of(part)
        np.testing.assert_allclose(
            np.array(part.logprobs), np.array(sampled.logprobs[3 * i : 3 * i + 3, : part.logprobs.shape[1]]), atol=1e-4
        )
    assert rows == rows_of(sampled)
    alone = generate_groups(model, prompts[1:2], 3, params, eos, key=2)  # its own table: other draws
    assert rows_of(alone) != rows_of(sampled)[3:6]
    with pytest.raises(ValueError, match="stream_offset"):
        generate_groups(model, prompts[:1], 3, params, eos, key=2, stream_offset=7, total_streams=9)


def test_max_new_tokens_is_respected_and_one_token_prompts_work(setup):
    model, tok, prompts, eos = setup
    out = generate_groups(model, prompts[1:2], 2, SamplingParams(max_new_tokens=3), eos, key=1)
    assert out.tokens.shape == (2, 3) and out.lengths.tolist() == [3, 3]
    assert out.finish_reasons == ["length", "length"]
    # A one-token prompt has nothing to prefill but its last token; batched with a long one.
    one = tok.encode("Hello", add_special_tokens=False)[:1]
    out = generate_groups(model, [one, prompts[1]], 1, SamplingParams(temperature=0, max_new_tokens=4), eos, key=0)
    assert rows_of(out) == [greedy_reference(model, one, 4, eos), greedy_reference(model, prompts[1], 4, eos)]


def test_too_long_prompt_is_a_clear_error(setup):
    model, _, prompts, eos = setup
    limit = model.args.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1: {limit + 5} tokens .* context of {limit}"):
        generate_groups(model, [prompts[0], [1] * (limit + 5)], 2, SamplingParams(max_new_tokens=4), eos, key=0)
    # Fits alone, but not with the completion budget.
    with pytest.raises(ValueError, match="prompt 0: .*max_new_tokens 8"):
        generate_groups(model, [[1] * (limit - 4)], 2, SamplingParams(max_new_tokens=8), eos, key=0)


def test_bad_settings_are_clear_errors(setup):
    model, _, prompts, eos = setup
    with pytest.raises(ValueError, match="sampling.top_p"):
        generate_groups(model, prompts, 2, SamplingParams(top_p=0.0), eos, key=0)
    with pytest.raises(ValueError, match="sampling.filter_order: must be one of joint, sequential, got 'hf'"):
        generate_groups(model, prompts, 2, SamplingParams(filter_order="hf"), eos, key=0)
    with pytest.raises(ValueError, match="prompt 1: is empty"):
        generate_groups(model, [prompts[0], []], 2, SamplingParams(), eos, key=0)
    with pytest.raises(ValueError, match="group_size"):
        generate_groups(model, prompts, 0, SamplingParams(), eos, key=0)


def test_recipe_sampling_config_is_accepted():
    from cast_mlx.config import SamplingConfig

    cfg = SamplingConfig(
        group_size=4, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=99, max_batch=16
    )
    assert rollout.as_sampling_params(cfg) == SamplingParams(0.7, 0.9, 20, 0.05, 99, 16)
    cfg = SamplingConfig(top_p=0.9, top_k=20, filter_order="sequential")
    assert rollout.as_sampling_params(cfg).filter_order == "sequential"

    class Partial:  # missing attributes take the defaults
        temperature = 0.0

    assert rollout.as_sampling_params(Partial()) == SamplingParams(temperature=0.0)


# --------------------------------------------------------------------------- LoRA / quantized


def test_lora_policy_is_sampled_in_eval_mode(fresh_smol, setup, greedy):
    _, tok, prompts, eos = setup
    model, _ = fresh_smol
    models.attach_lora(
        model, rank=4, alpha=8.0, dropout=0.5, num_layers=4, keys=["self_attn.q_proj", "self_attn.v_proj"], seed=0
    )
    # Non-zero lora_b so the adapted policy differs from the base model.
    params = dict(tree_flatten(model.trainable_parameters()))
    keys = mx.random.split(mx.random.key(3), len(params))
    model.update(
        tree_unflatten(
            [
                (k, mx.random.normal(v.shape, key=s) * 0.05 if k.endswith("lora_b") else v)
                for s, (k, v) in zip(keys, params.items())
            ]
        )
    )
    model.train()  # dropout on: the engine must switch it off while sampling
    out = generate_groups(model, prompts[:2], 2, SamplingParams(temperature=0, max_new_tokens=8), eos, key=0)
    assert model.training
    model.eval()
    rows = rows_of(out)
    for i, prompt in enumerate(prompts[:2]):
        ref = greedy_reference(model, prompt, 8, eos)
        assert rows[2 * i] == rows[2 * i + 1] == ref
        np.testing.assert_allclose(np.array(out.logprobs[2 * i, : len(ref)]), score(model, prompt, ref, 1.0), atol=1e-4)
    # The adapter changed the policy: the base model's greedy answers differ.
    assert [r[:8] for r in rows_of(greedy)[:4:2]] != rows[::2]


def test_lora_layers_are_merged_while_sampling_and_back_after(fresh_smol, setup):
    _, _, prompts, eos = setup
    model, _ = fresh_smol
    models.attach_lora(model, rank=4, alpha=8.0, dropout=0.0, num_layers=2, keys=["self_attn.q_proj"], seed=0)
    seen = []

    def probe(*_):
        seen.append(type(model.model.layers[-1].self_attn.q_proj).__name__)

    generate_groups(model, prompts[:1], 2, SamplingParams(temperature=0, max_new_tokens=3), eos, key=0, progress=probe)
    assert seen and set(seen) == {"Linear"}
    assert type(model.model.layers[-1].self_attn.q_proj).__name__ == "LoRALinear"


def test_quantized_model(smol_dir, setup):
    _, _, prompts, eos = setup
    model, _ = models.load(models.DEFAULT_MODEL, dtype="quantized")
    assert models.is_quantized(model) and kv_forward.plain_head(model) is None
    out = generate_groups(model, prompts[2:], 2, SamplingParams(temperature=0, max_new_tokens=3), eos, key=0)
    ref = greedy_reference(model, prompts[2], 3, eos)
    assert rows_of(out) == [ref, ref]


# --------------------------------------------------------------------------- sampler (pure)

PROBS = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)


def draw_all(logits_row, n=2000, **kw):
    """Sample with n evenly spaced uniforms; returns (ids, logprobs)."""
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    return sample_tokens(np.tile(logits_row, (n, 1)), u, **kw)


def test_inverse_cdf_follows_the_distribution():
    ids, lps = draw_all(np.log(PROBS), temperature=1.0)
    assert ids.dtype == np.int32 and lps.dtype == np.float32
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / len(ids), PROBS, atol=1e-3)
    np.testing.assert_allclose(lps, np.log(PROBS)[ids], atol=1e-6)


def test_inverse_cdf_over_many_blocks():
    # 1000 tokens (4 blocks of 256, the last one padded); all mass in 3 far-apart tokens.
    weights = np.zeros((3, 1000), dtype=np.float32)
    weights[:, [5, 600, 999]] = [0.25, 0.5, 0.25]
    ids = inverse_cdf(weights, np.array([0.1, 0.5, 0.9], dtype=np.float32))
    assert ids.tolist() == [5, 600, 999]
    u = np.array([0.0, 0.99999994], dtype=np.float32)
    assert inverse_cdf(weights[:2], u).tolist() == [5, 999]


def test_temperature_scales_the_distribution_and_the_logprobs():
    ids, lps = draw_all(np.log(PROBS), temperature=0.5)
    want = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / len(ids), want, atol=1e-3)
    np.testing.assert_allclose(lps, np.log(want)[ids], atol=1e-6)


@pytest.mark.parametrize(
    "kw, kept",
    [
        ({"top_k": 2}, [0, 1]),
        ({"top_p": 0.7}, [0, 1]),  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
        ({"top_p": 0.4}, [0]),  # the top token is always kept
        ({"min_p": 0.5}, [0, 1]),  # p >= 0.25
        ({"top_k": 3, "top_p": 0.9, "min_p": 0.4}, [0, 1]),  # the intersection
        # top-3 holds 0.95: jointly top-p 0.82 keeps the third token (0.8 before it < 0.82);
        # in sequence it reads 0.5, 0.3, 0.15 renormalised (0.8 / 0.95 = 0.84 >= 0.82) and not
        ({"top_k": 3, "top_p": 0.82}, [0, 1, 2]),
        ({"top_k": 3, "top_p": 0.82, "filter_order": "sequential"}, [0, 1]),
        ({"top_p": 0.82, "filter_order": "sequential"}, [0, 1, 2]),  # no top-k: the same as joint
        ({"top_k": 2, "min_p": 0.5, "filter_order": "sequential"}, [0, 1]),
    ],
)
def test_filters_sample_renormalised_but_report_unfiltered_logprobs(kw, kept):
    ids, lps = draw_all(np.log(PROBS), temperature=1.0, **kw)
    freq = np.bincount(ids, minlength=4) / len(ids)
    want = np.zeros(4)
    want[kept] = PROBS[kept] / PROBS[kept].sum()
    np.testing.assert_allclose(freq, want, atol=1e-3)
    np.testing.assert_allclose(lps, np.log(PROBS)[ids], atol=1e-6)  # before filtering
    mask = keep_mask(np.log(PROBS)[None], **kw)[0]
    assert np.nonzero(mask)[0].tolist() == kept


def test_greedy_sampler_and_bad_logits():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, -1.0, 2.5]], dtype=np.float32)
    ids, lps = sample_tokens(logits, np.array([0.3, 0.9]), temperature=0)
    assert ids.tolist() == [1, 2]
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lps, [ref[0, 1], ref[1, 2]], atol=1e-6)
    # u = 0 picks the first token with non-zero weight; u just below 1 the last one.
    masked = np.array([[-math.inf, 0.0, 0.0, -math.inf]], dtype=np.float32)
    assert sample_tokens(masked, np.array([0.0]))[0].tolist() == [1]
    assert sample_tokens(masked, np.array([0.99999994]))[0].tolist() == [2]
    with pytest.raises(ValueError, match="logits: row 1"):
        sample_tokens(np.array([[0.0, 1.0], [np.nan, 1.0]], dtype=np.float32), np.array([0.5, 0.5]))


# --------------------------------------------------------------------------- on the device


@pytest.mark.parametrize(
    "kw, most_differing",
    [
        ({"temperature": 0.7, "top_p": 0.95, "top_k": 20}, 0),  # the authors' regime
        ({"temperature": 0.7, "top_p": 0.95, "top_k": 20, "filter_order": "sequential"}, 0),
        ({"temperature": 1.0, "top_p": 0.6, "top_k": 5, "filter_order": "sequential"}, 0),
        ({"temperature": 1.0, "min_p": 0.05, "top_k": 100}, 0),
        ({"temperature": 0}, 0),
        # 49k candidates: float32 prefix sums (GPUs have no float64) land a draw that falls
        # within ~1e-7 of a boundary on the neighbouring token (measured: 0.1-0.2% of draws)
        ({"temperature": 1.0}, 5),
        ({"temperature": 1.3, "top_p": 0.8}, 5),
    ],
)
def test_device_sampler_draws_the_host_samplers_ids(kw, most_differing):
    """`sample_tokens_mx` (MLX ops) against `sample_tokens` (numpy, float64 sums) on 512
    rows of a 49k vocabulary: the same ids (all of them when top-k bounds the candidates),
    the same log-probs."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((512, 49152)) * 3).astype(np.float32)
    logits[:64, 7] += 12.0  # some peaked rows
    u = rng.random(512, dtype=np.float32)
    ids, lps = sample_tokens(logits, u, **kw)
    got_ids, got_lps = sampler.sample_tokens_mx(mx.array(logits), mx.array(u), **kw)
    assert got_ids.dtype == mx.int32
    same = np.array(got_ids) == ids
    assert (~same).sum() <= most_differing
    np.testing.assert_allclose(np.array(got_lps)[same], lps[same], atol=1e-5)


def test_device_inverse_cdf_edges():
    weights = np.zeros((3, 1000), dtype=np.float32)
    weights[:, [5, 600, 999]] = [0.25, 0.5, 0.25]
    u = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    assert np.array(sampler.inverse_cdf_mx(mx.array(weights), mx.array(u))).tolist() == [5, 600, 999]
    edge = np.array([0.0, 0.99999994], dtype=np.float32)
    assert np.array(sampler.inverse_cdf_mx(mx.array(weights[:2]), mx.array(edge))).tolist() == [5, 999]


def test_device_path_gives_the_host_paths_rollout(setup, sampled):
    """The pipelined on-device decode (what a GPU runs) gives the host path's streams: same
    ids, log-probs, lengths and finish reasons, with waves and compaction as well."""
    model, _, prompts, eos = setup
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12)
    device = generate_groups(model, prompts, 3, params, eos, key=2, on_device=True)
    assert rows_of(device) == rows_of(sampled)
    assert device.finish_reasons == sampled.finish_reasons
    np.testing.assert_allclose(np.array(device.logprobs), np.array(sampled.logprobs), atol=1e-4)
    # longer, in waves of one group, where streams finish at different steps (compaction)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=40, max_batch=4)
    host = generate_groups(model, prompts, 4, params, eos, key=3, on_device=False)
    device = generate_groups(model, prompts, 4, params, eos, key=3, on_device=True)
    assert len(set(host.lengths.tolist())) > 1  # streams ended at different steps
    assert rows_of(device) == rows_of(host) and device.finish_reasons == host.finish_reasons
    np.testing.assert_allclose(np.array(device.logprobs), np.array(host.logprobs), atol=1e-4)


@pytest.mark.parametrize("on_device,plain_head", [(False, True), (True, True), (False, False)])
def test_kept_frozen_states_are_the_fresh_forwards_and_change_nothing(setup, monkeypatch, on_device, plain_head):
    """`keep_states=k` (both decode paths, in waves with compaction, with the plain-head
    product or the model's own head) leaves the rollout as it was and keeps, for every prompt
    token and every completion token fed back, the state entering block k that a fresh
    forward of prompt + completion computes (to rounding)."""
    from cast_mlx.engine import logprobs

    model, _, prompts, eos = setup
    if not plain_head:
        monkeypatch.setattr(rollout, "plain_head", lambda m: None)
    split = 20
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=24, max_batch=4)
    plain = generate_groups(model, prompts, 4, params, eos, key=3, on_device=on_device)
    kept = generate_groups(model, prompts, 4, params, eos, key=3, on_device=on_device, keep_states=split)
    assert plain.frozen is None and kept.frozen is not None and kept.frozen.split == split
    assert rows_of(kept) == rows_of(plain) and kept.finish_reasons == plain.finish_reasons
    np.testing.assert_allclose(np.array(kept.logprobs), np.array(plain.logprobs), atol=0 if plain_head else 1e-5)
    assert len(set(kept.lengths.tolist())) > 1  # streams ended at different steps (compaction)
    states = kept.frozen
    assert [s.shape[0] for s in states.prompts] == [len(p) for p in prompts]
    assert states.completions.shape == (*kept.tokens.shape, model.args.hidden_size)
    for i, row in enumerate(rows_of(kept)):
        prompt = prompts[i // 4]
        fresh = logprobs.lower_states(model.model, mx.array([prompt + row]), None, split)[0]
        n = len(row)
        np.testing.assert_allclose(np.array(states.prompts[i // 4]), np.array(fresh[: len(prompt)]), atol=2e-3)
        got = np.array(states.completions[i, : n - 1])
        np.testing.assert_allclose(got, np.array(fresh[len(prompt) : len(prompt) + n - 1]), atol=2e-3)


# --------------------------------------------------------------------------- fast filters


def full_sort_keep_mask(lp, top_p=1.0, top_k=0, min_p=0.0):
    """The filters' definition, the slow way: each one over the fully sorted vocabulary."""
    vocab = lp.shape[-1]
    keep = np.ones(lp.shape, dtype=bool)
    desc = -np.sort(-lp, axis=-1)
    if 0 < top_k < vocab:
        keep &= lp >= desc[:, top_k - 1 : top_k]
    if top_p < 1.0:
        probs = np.exp(desc.astype(np.float64))
        n_keep = np.maximum(((np.cumsum(probs, axis=-1) - probs) < top_p).sum(axis=-1), 1)
        keep &= lp >= desc[np.arange(len(desc)), n_keep - 1][:, None]
    if min_p > 0.0:
        keep &= lp >= lp.max(axis=-1, keepdims=True) + np.log(min_p)
    return keep


def warpers_keep_mask(lp, top_p=1.0, top_k=0, min_p=0.0):
    """The sequential order as Hugging Face's warpers apply it: top-k's scores, softmax over
    them, drop the least likely tokens whose ascending cumulative mass is <= 1 - top_p, then
    min-p against the most likely token."""
    scores = lp.astype(np.float64)
    if top_k:
        scores = np.where(scores < np.sort(scores, axis=-1)[:, -top_k:][:, :1], -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")
        probs = np.exp(np.take_along_axis(scores, order, axis=-1))
        cum = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        removed = np.zeros_like(drop)
        np.put_along_axis(removed, order, drop, axis=-1)
        scores = np.where(removed, -np.inf, scores)
    if min_p > 0.0:
        scores = np.where(scores < scores.max(axis=-1, keepdims=True) + np.log(min_p), -np.inf, scores)
    return np.isfinite(scores)


@pytest.mark.parametrize("vocab", [49152, 1000])
@pytest.mark.parametrize(
    "kw", [{"top_k": 20, "top_p": 0.95}, {"top_k": 3, "top_p": 0.5}, {"top_k": 60, "top_p": 0.7, "min_p": 0.01}]
)
def test_sequential_order_keeps_what_hugging_faces_warpers_keep(vocab, kw):
    rng = np.random.default_rng(vocab + 1)
    z = (rng.standard_normal((24, vocab)) * np.array([0.1, 1.0, 4.0] * 8)[:, None]).astype(np.float32)  # no ties
    lp = z - np.log(np.exp(z.astype(np.float64)).sum(axis=-1, keepdims=True)).astype(np.float32)
    got = keep_mask(lp, **kw, filter_order="sequential")
    want = warpers_keep_mask(lp, **kw)
    assert np.array_equal(got, want)
    joint = keep_mask(lp, **kw)
    assert (joint & ~got).any() and not (got & ~joint).any()  # a subset of the joint set, and a smaller one


@pytest.mark.parametrize("vocab", [49152, 1000, 300])
@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 20},
        {"top_k": 20, "top_p": 0.95},
        {"top_k": 3, "top_p": 0.5},
        {"top_p": 0.9},
        {"top_p": 0.999},  # flat rows: the mass lies far beyond the first candidates
        {"top_k": 60, "top_p": 0.95, "min_p": 0.01},
    ],
)
def test_fast_filters_keep_what_the_full_sort_keeps(vocab, kw):
    rng = np.random.default_rng(vocab)
    z = rng.standard_normal((24, vocab)) * np.array([0.1, 1.0, 4.0] * 8)[:, None]  # flat to peaked
    z[:4] = np.round(z[:4] * 2) / 2  # many ties
    z = z.astype(np.float32)
    lp = z - np.log(np.exp(z.astype(np.float64)).sum(axis=-1, keepdims=True)).astype(np.float32)
    got = keep_mask(lp, **kw)
    assert np.array_equal(got, full_sort_keep_mask(lp, **kw))
    if "top_k" in kw:
        largest = sampler.k_largest(lp, kw["top_k"])
        np.testing.assert_array_equal(np.sort(largest, axis=-1), np.sort(lp, axis=-1)[:, vocab - kw["top_k"] :])


def test_models_without_a_plain_cache_are_refused_and_scored_per_row():
    """A sliding-window (or recurrent) cache cannot be shared or batched as the engine does:
    the rollout refuses it with one clear error, and `plain_cache` says so to the scorer."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from cast_mlx.engine.logprobs import plain_cache

    class Windowed:
        def make_cache(self):
            return [KVCache(), RotatingKVCache(max_size=8)]

    assert plain_cache(Windowed()) is None
    with pytest.raises(
        ValueError, match=r"only plain KVCache layers are supported, got \['KVCache', 'RotatingKVCache'\]"
    ):
        kv_forward.check_cache_kind(Windowed())

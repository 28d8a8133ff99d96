"""Rollout engine: `generate_groups` samples `G` completions for each of `P` prompts in one
batch (a prefill per prompt shared by its group, batched KV-cache decoding, adapters merged
while sampling, waves of whole groups) and returns the exact sampled ids. The sampler is
`cast_mlx.engine.sampler`. How it works: docs/design.md, "The rollout"."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import numpy as np

from cast_mlx.config import FILTER_ORDERS
from cast_mlx.engine import fastmath
from cast_mlx.engine.kv_forward import check_cache_kind, filter_cache, next_logits, next_logits_mx, plain_head, prefill
from cast_mlx.engine.logprobs import FrozenStates
from cast_mlx.engine.models import merged_lora
from cast_mlx.engine.sampler import sample_tokens, sample_tokens_mx, uniform_table

COMPACT_FRACTION = 0.25  # compact the batch once this share of its rows has finished


@dataclass
class SamplingParams:
    """Sampling settings; the same field names as the recipe's `sampling` section
    (`cast_mlx.config.SamplingConfig`, which `generate_groups` also accepts)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    max_new_tokens: int = 256
    max_batch: int = 64  # decode streams per wave
    filter_order: str = "joint"  # `config.FILTER_ORDERS`: joint (mlx-lm's) or sequential (HF's, vLLM's)


@dataclass
class Rollout:
    """`N = P*G` completions; rows are grouped: row `i` belongs to prompt `i // G`.

    tokens:         int32 `[N, L]` completion ids, right-padded with 0 (`L` = longest length).
    mask:           float32 `[N, L]`, 1 on completion tokens (the EOS included), 0 on padding.
    lengths:        int32 `[N]` completion lengths (mask row sums).
    finish_reasons: "eos" (last token is an EOS id) or "length" (`max_new_tokens` reached).
    prompt_ids:     the `P` prompts, as given.
    prompt_index:   int32 `[N]`, the prompt of each row (`i // G`).
    logprobs:       float32 `[N, L]`, `log_softmax(logits / T)` at each sampled id (before
                    any top-p/k/min-p filtering; at `T = 1` when greedy), 0 on padding.
    prefill_tokens: prompt tokens run through the model (each distinct prompt once).
    decode_tokens:  completion tokens kept (`lengths.sum()`).
    seconds:        wall-clock time of the whole call.
    prefill_seconds: the part of `seconds` spent prefilling prompts (all waves).
    frozen:         with `keep_states=k`, the states entering block k of every prompt and
                    completion token (`logprobs.FrozenStates`); else None.
    """

    tokens: mx.array
    mask: mx.array
    lengths: mx.array
    finish_reasons: list[str]
    prompt_ids: list[list[int]]
    prompt_index: mx.array
    logprobs: mx.array
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    prefill_seconds: float = 0.0
    frozen: FrozenStates | None = None

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per second of wall-clock time (prefill included)."""
        return self.decode_tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- settings


def as_sampling_params(params) -> SamplingParams:
    """A validated `SamplingParams` from any object with the same attribute names
    (missing attributes take the defaults); a bad value raises a one-line ValueError."""
    d = SamplingParams()
    p = SamplingParams(
        **{
            name: getattr(params, name, getattr(d, name))
            for name in ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "max_batch", "filter_order")
        }
    )
    checks = [
        ("temperature", p.temperature >= 0, ">= 0"),
        ("top_p", 0 < p.top_p <= 1, "in (0, 1]"),
        ("top_k", p.top_k >= 0, ">= 0"),
        ("min_p", 0 <= p.min_p < 1, "in [0, 1)"),
        ("filter_order", p.filter_order in FILTER_ORDERS, f"one of {', '.join(FILTER_ORDERS)}"),
        ("max_new_tokens", p.max_new_tokens >= 1, ">= 1"),
        ("max_batch", p.max_batch >= 1, ">= 1"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"sampling.{name}: must be {rule}, got {getattr(p, name)!r}")
    return p


def context_limit(model) -> int | None:
    """The model's context length (`args.max_position_embeddings`), or None if unknown."""
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return int(limit) if limit else None


def check_prompts(prompts, max_new_tokens: int, limit: int | None, vocab: int | None) -> None:
    """Raise a ValueError naming the first bad prompt: empty, ids out of range, or too long
    for the context (`limit`) once `max_new_tokens` are added."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i}: is empty")
        if vocab is not None and (min(p) < 0 or max(p) >= vocab):
            raise ValueError(f"prompt {i}: token ids must be in [0, {vocab}), got {min(p)}..{max(p)}")
        if limit is not None and len(p) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} = "
                f"{len(p) + max_new_tokens} exceeds the model's context of {limit} tokens"
            )


# --------------------------------------------------------------------------- decoding


@dataclass
class _Wave:
    """Raw numpy results of one wave: `[n, max_new_tokens]` ids and log-probs, lengths,
    whether each stream ended with an EOS, and the prefill time."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    eos: np.ndarray
    prefill_seconds: float
    prompt_states: list[mx.array] | None = None  # with a split: per prompt [len, H]
    states: mx.array | None = None  # with a split: [n, max_new_tokens, H]


class _Streams:
    """The outputs of one wave's streams, filled step by step (both decode paths)."""

    def __init__(self, n: int, steps: int, eos_ids: np.ndarray):
        self.ids = np.zeros((n, steps), dtype=np.int32)
        self.lps = np.zeros((n, steps), dtype=np.float32)
        self.lengths = np.zeros(n, dtype=np.int32)
        self.done = np.zeros(n, dtype=bool)
        self.eos = np.zeros(n, dtype=bool)
        self.eos_ids = eos_ids
        self.kept: list[tuple[np.ndarray, int, list[mx.array]]] = []  # (rows, token t, [states])

    def record(self, t: int, rows: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> None:
        """Step `t`'s draws of batch rows `rows` (stream numbers); finished streams ignore theirs."""
        live = ~self.done[rows]
        streams = rows[live]
        self.ids[streams, t] = ids[live]
        self.lps[streams, t] = lps[live]
        self.lengths[streams] = t + 1
        hit = streams[np.isin(ids[live], self.eos_ids)]
        self.done[hit] = True
        self.eos[hit] = True

    def compaction(self, rows: np.ndarray) -> np.ndarray | None:
        """The batch rows to keep once `COMPACT_FRACTION` of them have finished, else None: the
        unfinished ones, and finished ones up to `fastmath.decode_rows` (None if that is all)."""
        finished = self.done[rows]
        if finished.sum() < max(1, COMPACT_FRACTION * len(rows)):
            return None
        live = np.nonzero(~finished)[0]
        size = fastmath.decode_rows(len(live), len(rows))
        if size == len(rows):
            return None
        return np.sort(np.concatenate([live, np.nonzero(finished)[0][: size - len(live)]]))

    def keep(self, rows: np.ndarray, t: int) -> list[mx.array]:
        """A list to receive the states of token `t` of batch rows `rows` (`next_logits`)."""
        self.kept.append((rows.copy(), t, []))
        return self.kept[-1][2]

    def states(self, like: mx.array) -> mx.array:
        """`[n, steps, H]`: the kept states of each stream's tokens fed back, zeros where none
        (`like`: a state, for H and dtype). Finished streams that were still in the batch
        keep states of their discarded draws too, past their end."""
        n, steps = self.ids.shape
        pieces = [kept[0][:, 0, :] for _, _, kept in self.kept]
        index = np.full((n, steps), sum(len(rows) for rows, _, _ in self.kept), dtype=np.int32)
        offset = 0
        for rows, t, _ in self.kept:
            index[rows, t] = offset + np.arange(len(rows))
            offset += len(rows)
        flat = mx.concatenate([*pieces, mx.zeros((1, like.shape[-1]), dtype=like.dtype)])
        return flat[mx.array(index)]

    def wave(self, prefill_seconds: float, prompt_states=None) -> _Wave:
        states = None if prompt_states is None else self.states(prompt_states[0])
        return _Wave(self.ids, self.lps, self.lengths, self.eos, prefill_seconds, prompt_states, states)


def _start_wave(model, prompts, group_size: int, steps: int, on_device: bool, split: int = 0):
    """Prefill, then broadcast each prompt's cache row to its `group_size` streams."""
    head = plain_head(model)
    start = time.perf_counter()
    cache, logits, prompt_states = prefill(model, head, prompts, room=steps, on_device=on_device, split=split)
    if on_device:
        mx.eval(logits)
    prefill_seconds = time.perf_counter() - start
    prompt_of_stream = np.repeat(np.arange(len(prompts)), group_size)
    filter_cache(cache, prompt_of_stream)
    return head, cache, logits, prompt_of_stream, prefill_seconds, prompt_states


def decode_wave(
    model,
    prompts,
    group_size: int,
    p: SamplingParams,
    eos_ids: np.ndarray,
    uniforms: np.ndarray,
    progress=None,
    on_device: bool = False,
    split: int = 0,
) -> _Wave:
    """Prefill `prompts` once, broadcast to `group_size` streams each, and decode them all
    together; `uniforms` `[len(prompts) * group_size, max_new_tokens]` drive the draws.
    `progress(tokens, streams_done)`, if given, hears after every decode step. With `split`
    > 0, the states entering block `split` are kept (`_Wave.prompt_states`, `.states`)."""
    if on_device:
        return decode_wave_on_device(model, prompts, group_size, p, eos_ids, uniforms, progress, split)
    steps, n = p.max_new_tokens, len(prompts) * group_size
    head, cache, logits, prompt_of_stream, prefill_seconds, prompt_states = _start_wave(
        model, prompts, group_size, steps, False, split
    )
    rows = np.arange(n)  # rows[j]: the stream (0..n-1) that batch row j decodes

    def draw(logits, t):
        return sample_tokens(logits, uniforms[rows, t], p.temperature, p.top_p, p.top_k, p.min_p, p.filter_order)

    ids, lps = draw(logits[prompt_of_stream], 0)
    out = _Streams(n, steps, eos_ids)
    for t in range(steps):
        out.record(t, rows, ids, lps)
        if progress is not None:
            progress(t + 1, int(out.done.sum()))
        if t + 1 == steps or out.done.all():
            break
        keep = out.compaction(rows)
        if keep is not None:
            filter_cache(cache, keep)
            ids, rows = ids[keep], rows[keep]
        kept = out.keep(rows, t) if split else None
        ids, lps = draw(next_logits(model, head, mx.array(ids[:, None]), cache, split, kept), t + 1)
    if progress is not None:  # the streams cut at the cap are finished too
        progress(int(out.lengths.max()) if n else 0, n)
    return out.wave(prefill_seconds, prompt_states)


def decode_wave_on_device(
    model,
    prompts,
    group_size: int,
    p: SamplingParams,
    eos_ids: np.ndarray,
    uniforms: np.ndarray,
    progress=None,
    split: int = 0,
) -> _Wave:
    """`decode_wave` with the draws on the device, pipelined: step t + 1 is queued
    (`mx.async_eval`) before the host reads step t's ids. Streams that finish at step t are
    in step t + 1's batch too (their tokens are dropped); compaction then filters the cache
    and the queued step's ids alike. Each stream's draws are the same as on the host path."""
    steps, n = p.max_new_tokens, len(prompts) * group_size
    head, cache, logits, prompt_of_stream, prefill_seconds, prompt_states = _start_wave(
        model, prompts, group_size, steps, True, split
    )
    table = mx.array(uniforms)
    rows = np.arange(n)

    def draw(logits, t, rows):
        u = table[mx.array(rows.astype(np.int32)), t]
        return sample_tokens_mx(logits, u, p.temperature, p.top_p, p.top_k, p.min_p, p.filter_order)

    current = draw(logits[mx.array(prompt_of_stream.astype(np.int32))], 0, rows)
    mx.async_eval(current)
    out = _Streams(n, steps, eos_ids)
    for t in range(steps):
        queued = None
        if t + 1 < steps:  # the next step, from this step's ids still on the device
            kept = out.keep(rows, t) if split else None
            queued = draw(next_logits_mx(model, head, current[0][:, None], cache, split, kept), t + 1, rows)
            mx.async_eval(queued)
        ids, lps = np.array(current[0]), np.array(current[1])
        if not np.isfinite(lps).all():
            raise ValueError(f"logits: stream {int(rows[np.argmin(np.isfinite(lps))])} has no finite maximum (NaN/inf)")
        out.record(t, rows, ids, lps)
        if progress is not None:
            progress(t + 1, int(out.done.sum()))
        if queued is None or out.done.all():
            break
        keep = out.compaction(rows)
        if keep is not None:
            filter_cache(cache, keep)
            index = mx.array(keep.astype(np.int32))
            queued = (queued[0][index], queued[1][index])
            rows = rows[keep]
        current = queued
    if progress is not None:
        progress(int(out.lengths.max()) if n else 0, n)
    return out.wave(prefill_seconds, prompt_states)


def generate_groups(
    model,
    prompts: list[list[int]],
    group_size: int,
    params,
    eos_ids,
    key,
    *,
    stream_offset: int = 0,
    total_streams: int | None = None,
    progress=None,
    on_device: bool | None = None,
    keep_states: int = 0,
) -> Rollout:
    """Sample `group_size` completions for each prompt with the model's current weights.

    model:      an mlx-lm model (float, quantized, LoRA layers attached or not); it is put
                in eval mode while sampling (no dropout) and its mode is restored after.
    prompts:    `P` lists of token ids (chat template already applied).
    params:     `SamplingParams` or any object with its attribute names (the recipe's
                `sampling` section).
    eos_ids:    ids that end a completion (the tokenizer's `eos_token_ids`).
    key:        an `mx.random` key or an int seed; the same key gives the same rollout.
    stream_offset, total_streams: these `P*G` streams are rows `[stream_offset,
                stream_offset + P*G)` of a rollout of `total_streams` streams (default:
                the whole rollout), and take those rows of its random-number table. Used
                by data parallelism: each process samples its slice of the global step.
    progress:   optional `progress(tokens, cap, streams_done, streams)`, called after each
                decode step: the tokens of the current wave's longest stream, the token cap,
                and the streams finished so far (earlier waves count as finished).
    on_device:  draw on the device, pipelined (`decode_wave_on_device`); default: on a GPU.
    keep_states: k > 0 keeps the states entering block k (`logprobs.frozen_blocks(model)`,
                the first block with trainable parameters) in `Rollout.frozen`, for the
                update to run the top blocks only.

    Returns a `Rollout` (see its docstring for shapes and conventions).
    """
    start = time.perf_counter()
    p = as_sampling_params(params)
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    prompts = [[int(t) for t in q] for q in prompts]
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    check_prompts(prompts, p.max_new_tokens, context_limit(model), vocab)
    check_cache_kind(model)
    eos = np.array(sorted(int(e) for e in (eos_ids or ())), dtype=np.int32)
    n_streams = len(prompts) * group_size
    total = n_streams if total_streams is None else int(total_streams)
    if stream_offset < 0 or stream_offset + n_streams > total:
        raise ValueError(f"stream_offset: {n_streams} streams from {stream_offset} do not fit in total_streams={total}")
    uniforms = uniform_table(key, total, p.max_new_tokens)[stream_offset : stream_offset + n_streams]

    per_wave = max(1, p.max_batch // group_size)
    device = not fastmath.on_cpu() if on_device is None else on_device
    was_training = model.training
    model.eval()  # no dropout, so the adapters can be merged for decoding
    try:
        waves = []
        with merged_lora(model):
            for first in range(0, len(prompts), per_wave):
                chunk = prompts[first : first + per_wave]
                rows = slice(first * group_size, (first + len(chunk)) * group_size)
                before = first * group_size
                hear = None
                if progress is not None:
                    hear = lambda t, d, before=before: progress(t, p.max_new_tokens, before + d, n_streams)  # noqa: E731
                u = uniforms[rows]
                waves.append(decode_wave(model, chunk, group_size, p, eos, u, hear, device, keep_states))
    finally:
        model.train(was_training)

    lengths = np.concatenate([w.lengths for w in waves])
    width = max(1, int(lengths.max()))
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.concatenate([w.tokens for w in waves])[:, :width]
    lps = np.concatenate([w.logprobs for w in waves])[:, :width]
    eos_end = np.concatenate([w.eos for w in waves])
    frozen = None
    if keep_states:
        frozen = FrozenStates(
            split=keep_states,
            prompts=[s for w in waves for s in cast("list[mx.array]", w.prompt_states)],
            completions=mx.concatenate([cast(mx.array, w.states) for w in waves])[:, :width],
            group_size=group_size,
        )
        mx.eval(frozen.prompts, frozen.completions)
    return Rollout(
        tokens=mx.array(np.where(mask, ids, 0).astype(np.int32)),
        mask=mx.array(mask.astype(np.float32)),
        lengths=mx.array(lengths),
        finish_reasons=["eos" if e else "length" for e in eos_end],
        prompt_ids=prompts,
        prompt_index=mx.array(np.repeat(np.arange(len(prompts), dtype=np.int32), group_size)),
        logprobs=mx.array(np.where(mask, lps, 0).astype(np.float32)),
        prefill_tokens=sum(len(q) for q in prompts),
        decode_tokens=int(lengths.sum()),
        seconds=time.perf_counter() - start,
        prefill_seconds=sum(w.prefill_seconds for w in waves),
        frozen=frozen,
    )


def decode_completions(tokenizer, rollout) -> list[str]:
    """The text of every completion of a `Rollout`, without its final EOS token.

    The EOS id is kept in the rollout (the policy chose to stop), but its text
    (`<|im_end|>`) must not reach the verifier: `#### 42<|im_end|>` would not read as 42.
    """
    texts = []
    for row, n, reason in zip(rollout.tokens.tolist(), rollout.lengths.tolist(), rollout.finish_reasons):
        ids = row[: n - 1] if reason == "eos" else row[:n]
        texts.append(tokenizer.decode(ids))
    return texts


def special_token_ids(tokenizer) -> list[int]:
    """The EOS ids and the tokenizer's other special/template token ids."""
    return sorted(set(tokenizer.eos_token_ids) | set(getattr(tokenizer, "all_special_ids", None) or []))


def special_and_eos(tokens, lengths, truncated, mask, special_ids: list[int]):
    """`[N, L]` masks of the special/template tokens of each completion (EOS included) and
    of its final EOS (the last token of a completion that ended by itself)."""
    special = (tokens[:, :, None] == mx.array(special_ids)[None, None, :]).any(axis=2) * mask
    last = mx.arange(tokens.shape[1])[None, :] == (lengths - 1)[:, None]
    return special, last * (1.0 - truncated)[:, None] * mask

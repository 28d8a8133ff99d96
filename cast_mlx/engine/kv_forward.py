"""The rollout's calls into the model: next-token logits over a batched KV cache (a plain
float head as one `[V, H] @ [H, B]` matmul), the prompts' prefill into one left-padded
cache, and keeping a cache's rows. Apart from `rollout`, which schedules the waves and
samples, so that the decode loop reads without the model's details (why the head is taken
apart: docs/design.md, "The rollout")."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from cast_mlx.engine import fastmath
from cast_mlx.engine.logprobs import backbone_and_head, lower_states, plain_cache, run_blocks, upper_hidden

PREFILL_CHUNK = 512  # prompt positions per prefill forward (bounds the attention memory)
# Model types whose `Model.__call__` is `self.model(...)` then the tied embedding or lm_head.
PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "phi3")


def plain_head(model) -> mx.array | None:
    """The LM head weight `[V, H]` when the logits are `model.model(...) @ W.T` with a plain
    float `W` (why: docs/design.md, "The rollout"); None otherwise."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in PLAIN_HEAD_TYPES or not hasattr(model, "model"):
        return None
    if getattr(args, "tie_word_embeddings", False):
        layer = getattr(model.model, "embed_tokens", None)
        ok = type(layer) is nn.Embedding
    else:
        layer = getattr(model, "lm_head", None)
        ok = type(layer) is nn.Linear and "bias" not in layer
    return layer.weight if ok and layer is not None else None  # (ok implies a layer)


def next_logits_mx(model, head: mx.array | None, inputs: mx.array, cache, split: int = 0, keep=None) -> mx.array:
    """float32 `[B, V]` logits after the last position of `inputs` `[B, n]` (lazy). With
    `split` > 0, the states entering block `split` (`[B, n, H]`) are appended to `keep`.
    The blocks' linears run in the form the CPU's BLAS prefers (`fastmath.decode_linears`)."""
    with fastmath.decode_linears():
        return _next_logits(model, head, inputs, cache, split, keep)


def _next_logits(model, head, inputs, cache, split, keep) -> mx.array:
    if split:
        states = lower_states(model.model, inputs, cache, split)
        keep.append(states)
        hidden = upper_hidden(model.model, states, cache, split)[:, -1, :]
        if head is None:
            return backbone_and_head(model)[1](hidden).astype(mx.float32)
    elif head is None:
        return model(inputs, cache=cache)[:, -1, :].astype(mx.float32)
    else:
        hidden = model.model(inputs, cache=cache)[:, -1, :]
    return (head @ hidden.T).astype(mx.float32).T  # [V, B] product, viewed as [B, V]


def next_logits(model, head: mx.array | None, inputs: mx.array, cache, split: int = 0, keep=None) -> np.ndarray:
    """`next_logits_mx`, as numpy."""
    return np.array(next_logits_mx(model, head, inputs, cache, split, keep))


def check_cache_kind(model) -> None:
    """Only models whose own cache is a plain `KVCache` per layer are supported (llama, qwen,
    ...); sliding-window or recurrent caches raise a ValueError."""
    if plain_cache(model) is None:
        kinds = sorted({type(c).__name__ for c in make_prompt_cache(model)})
        raise ValueError(f"model cache: only plain KVCache layers are supported, got {kinds}")


def prefill(model, head, prompts: list[list[int]], room: int, on_device: bool = False, split: int = 0):
    """Run each prompt through the model once; returns a left-padded `BatchKVCache` per layer
    (one row per prompt), the float32 logits `[P, V]` of each prompt's next token (numpy;
    an `mx.array` with `on_device`) and, with `split` > 0, each prompt's states entering
    block `split` (`[len(prompt), H]`; else None).

    All tokens but the last are run prompt by prompt in chunks of `PREFILL_CHUNK` and only
    their cache is evaluated (MLX is lazy: their logits are never computed). The last tokens
    then run as one batch, which also grows the cache by `room` positions for the decode.
    """
    layers = len(make_prompt_cache(model))
    per_prompt, bodies = [], []
    for p in prompts:
        cache = make_prompt_cache(model)
        body = mx.array([p[:-1]], dtype=mx.int32)
        kept = []
        for start in range(0, len(p) - 1, PREFILL_CHUNK):
            chunk = body[:, start : start + PREFILL_CHUNK]
            if split:
                kept.append(lower_states(model.model, chunk, cache, split)[0])
                run_blocks(model.model, kept[-1][None], cache, split)
            else:
                model(chunk, cache=cache)
            mx.eval([c.state for c in cache], kept)
        per_prompt.append(cache)
        bodies.append(kept)
    batch = [BatchKVCache.merge([c[layer] for c in per_prompt]) for layer in range(layers)]
    for c in batch:
        c.step = room  # the next write allocates all the decode positions at once
    last = mx.array([[p[-1]] for p in prompts], dtype=mx.int32)
    keep: list[mx.array] = []
    logits = next_logits_mx(model, head, last, batch, split, keep)
    states = [mx.concatenate([*kept, keep[0][i]]) for i, kept in enumerate(bodies)] if split else None
    return batch, (logits if on_device else np.array(logits)), states


def filter_cache(cache: list[BatchKVCache], rows: np.ndarray) -> None:
    """Keep (and repeat) the given batch rows of every layer's cache, in place."""
    index = mx.array(rows.astype(np.int32))
    for c in cache:
        c.filter(index)

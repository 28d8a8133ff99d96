"""The decode's KV cache and attention in numpy, for MLX's CPU backend.

A decode step has one query a row. On the CPU mlx-lm's `BatchKVCache` writes each new
position with a slice update and its attention (MLX's fused call, which the CPU composes from
small batched matmuls and a softmax through the slow `exp`) took ~0.9 ms a block at 16 rows
and 250 positions, where numpy takes ~0.2 ms: a third of a 16-row step went to attention and
cache writes. `HostKVCache` holds the keys and values in numpy buffers sized for the whole
decode, writes each step's column in place and does the attention in numpy; the projections,
RoPE, norms and MLP stay MLX's. The price: one evaluation per block per step.

Only for decoding (one position a row) after a prefill into a `BatchKVCache`, for llama /
qwen2 / qwen3 blocks whose attention `fastmath.attention` serves (it hands the attention to
`attend`), in float32, on the CPU (`usable`). What it measured: docs/speed.md, "The decode's
attention in numpy"."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from cast_mlx.engine import fastmath

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")
enabled = True  # False: mlx-lm's BatchKVCache on the CPU too (the memory plan measures MLX's allocations)


def usable(model, cache: list) -> bool:
    """Whether the decode of `model` can run on host caches: on the CPU, unless `enabled` is
    off, for a llama/qwen2/qwen3 model whose blocks' attention goes through
    `fastmath.attention`, with float32 `BatchKVCache`s holding the prefill."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not (enabled and fastmath.on_cpu() and layers):
        return False
    if getattr(getattr(model, "args", None), "model_type", None) not in SUPPORTED_TYPES:
        return False
    attention = getattr(layers[0], "self_attn", None)
    module = importlib.import_module(type(attention).__module__) if attention is not None else None
    if getattr(module, "scaled_dot_product_attention", None) is not fastmath.attention:
        return False
    return all(type(c) is BatchKVCache and c.keys is not None and c.keys.dtype == mx.float32 for c in cache)


class HostKVCache(BatchKVCache):
    """A `BatchKVCache` for decode steps whose keys and values live in numpy: `[B, Hk,
    capacity, D]` buffers, left-padded as the prefill left them. `update_and_fetch` only
    advances the rows' RoPE offsets; `attend` (from `fastmath.attention`) writes the step's
    keys and values and attends over each row's own positions."""

    def __init__(self, prefilled: BatchKVCache, room: int):
        keys, values = (np.array(a) for a in prefilled.keys_and_values())
        b, heads, length, dim = keys.shape
        self.host_keys = np.zeros((b, heads, length + room, dim), np.float32)
        self.host_values = np.zeros((b, heads, length + room, values.shape[-1]), np.float32)
        self.host_keys[:, :, :length] = keys
        self.host_values[:, :, :length] = values
        self.keys = self.values = None  # nothing of MLX's is kept
        self.offset = prefilled.offset
        self.left_padding = prefilled.left_padding
        self._idx = length
        self._right_padding = None
        self._set_bias(np.array(prefilled.left_padding))

    def _set_bias(self, left: np.ndarray) -> None:
        # -inf on each row's left padding, 0 elsewhere: added to the attention scores
        positions = np.arange(self.host_keys.shape[2])
        self.bias = np.where(positions[None, :] < left[:, None], -np.inf, 0.0).astype(np.float32)

    def update_and_fetch(self, keys, values):
        if keys.shape[2] != 1:
            raise ValueError(f"HostKVCache: one position a row per step, got {keys.shape[2]}")
        if self._idx >= self.host_keys.shape[2]:
            raise ValueError(f"HostKVCache: full ({self._idx} positions)")
        self.offset = self.offset + 1
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return None  # `attend` applies the left padding itself

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """`softmax(q k^T * scale) v` for `queries` `[B, H, 1, D]` over every position so
        far and the step's `keys` / `values` `[B, Hk, 1, D]`, which it stores."""
        mx.eval(queries, keys, values)
        at = self._idx
        self.host_keys[:, :, at] = np.asarray(keys)[:, :, 0]
        self.host_values[:, :, at] = np.asarray(values)[:, :, 0]
        self._idx = n = at + 1
        b, heads, _, dim = queries.shape
        kv_heads = self.host_keys.shape[1]
        q = np.asarray(queries).reshape(b, kv_heads, heads // kv_heads, dim) * np.float32(scale)
        scores = np.matmul(q, self.host_keys[:, :, :n].swapaxes(-1, -2))  # [B, Hk, heads per key, n]
        scores += self.bias[:, None, None, :n]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, self.host_values[:, :, :n])
        return mx.array(out.reshape(b, heads, 1, -1))

    def filter(self, batch_indices) -> None:
        rows = np.asarray(batch_indices).astype(np.int64)
        self.host_keys, self.host_values = self.host_keys[rows], self.host_values[rows]
        left = np.array(self.left_padding)[rows]
        self.offset = self.offset[mx.array(rows.astype(np.int32))]
        self.left_padding = mx.array(left)
        self._set_bias(left)

    @property
    def state(self):
        return self.offset, self.left_padding

    @state.setter
    def state(self, v):
        raise NotImplementedError("HostKVCache: not saved or restored")

    def extend(self, other):
        raise NotImplementedError("HostKVCache: decode only")

    def extract(self, idx):
        raise NotImplementedError("HostKVCache: decode only")


def to_host(model, cache: list, room: int) -> list:
    """`cache` (one `BatchKVCache` per layer, after the prefill) as host caches with room for
    `room` more positions, when `usable`; else `cache` itself."""
    if not usable(model, cache):
        return cache
    return [HostKVCache(c, room) for c in cache]

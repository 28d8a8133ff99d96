"""A decode step with static shapes, compiled: the rollout's `compiled` path (issue #29).

After the prefill, each layer's left-padded `BatchKVCache` is copied into a buffer of fixed
capacity (`FixedCache`), a multiple of `CACHE_BUCKET` positions. A decode step writes every
row's new key and value at one column (`mx.slice_update` at a position passed as an array),
attends over the whole buffer with a mask built from each row's left padding and that
position, and rotates each row at its own position (position - left padding), as the
batched cache does. Every shape of the step then depends only on the batch size and the
capacity, so the model's blocks and head run as one `mx.compile`d function, traced once per
(batch size, capacity) for as long as the model lives (`CompiledStep`). Masked columns get
a softmax weight of exactly 0, so the logits are the batched cache's up to the rounding of
longer sums, and the sampler (unchanged) draws the same ids. Measured: docs/speed.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

CACHE_BUCKET = 64  # capacity step of the fixed cache: one compiled step per multiple
# Backbones whose attention layers use the cache as `BatchKVCache` does (`offset`,
# `update_and_fetch`, the mask from `make_mask`) and whose logits `rollout.next_logits_mx` runs.
STATIC_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def supported(model) -> bool:
    """Whether the compiled decode can run `model` (else the rollout takes the batched cache)."""
    return getattr(getattr(model, "args", None), "model_type", None) in STATIC_MODEL_TYPES


def capacity(positions: int, bucket: int = CACHE_BUCKET) -> int:
    """The smallest multiple of `bucket` that holds `positions` positions."""
    return -(-positions // bucket) * bucket


class FixedCache:
    """One layer's cache as the model's attention sees it inside the compiled step: keys and
    values `[B, heads, capacity, D]`, the column this step writes (int32 `[1]`), each row's
    rotary position (`offset`, int32 `[B]`) and the attention mask (bool `[B, 1, 1, capacity]`)."""

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array, offset: mx.array, mask: mx.array):
        self.keys, self.values = keys, values
        self.position, self.offset, self.mask = position, offset, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.position, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.position, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        return self.mask


# forward(model, inputs [B, 1], caches, split, keep) -> float32 logits [B, V], lazy; with a
# split, it appends the states entering block `split` to `keep` (`rollout`'s step logits)
Forward = Callable[[nn.Module, mx.array, list, int, list], mx.array]


class CompiledStep:
    """The compiled decode step of one model (and split and forward), reused by every wave
    and rollout: MLX traces it once per (batch size, capacity, model structure).

    The model's arrays are its captured inputs. They are held (`holder`) only during a call,
    so the compiled function does not keep the model alive (`step_of` caches it by model)."""

    def __init__(self, model: nn.Module, forward: Forward, split: int):
        self.model = weakref.ref(model)
        self.holder: list = [None]  # the model's state during a call, None between calls
        self.traces = 0  # how many shapes the step was traced for

        def step(inputs: mx.array, position: mx.array, left_padding: mx.array, keys: list, values: list):
            self.traces += 1  # Python runs only while MLX traces
            columns = mx.arange(keys[0].shape[2], dtype=mx.int32)
            mask = (left_padding[:, None] <= columns[None, :]) & (columns[None, :] <= position)
            offset = position - left_padding
            layers = [FixedCache(k, v, position, offset, mask[:, None, None, :]) for k, v in zip(keys, values)]
            keep: list[mx.array] = []
            logits = forward(self.holder[0], inputs, layers, split, keep)
            return logits, [c.keys for c in layers], [c.values for c in layers], keep

        self.compiled = mx.compile(step, inputs=self.holder)

    def __call__(self, *args):
        self.holder[0] = self.model()
        try:
            return self.compiled(*args)
        finally:
            self.holder[0] = None


_STEPS: dict[tuple[int, int, Forward], CompiledStep] = {}


def step_of(model: nn.Module, forward: Forward, split: int) -> CompiledStep:
    """The model's `CompiledStep` (made on first use; dropped with the model)."""
    key = (id(model), split, forward)
    step = _STEPS.get(key)
    if step is None or step.model() is not model:
        step = _STEPS[key] = CompiledStep(model, forward, split)
        weakref.finalize(model, _STEPS.pop, key, None)
    return step


class StaticDecoder:
    """The decode state of one wave on the fixed cache; stands in for the rollout's list of
    `BatchKVCache` (`rollout.next_logits_mx` and `rollout.filter_cache` dispatch to it).

    model:   the model (its arrays are the compiled step's captured inputs).
    cache:   the prefilled and broadcast `BatchKVCache` of every layer (one row per stream).
    forward: a step's logits from the model's own layers (`Forward`).
    split:   > 0: each step also keeps the states entering block `split`.
    """

    def __init__(self, model, cache: list, forward: Forward, split: int = 0, bucket: int | None = None):
        first = cache[0]
        self.position = int(first._idx)  # the next column to write, the same for every row
        self.left_padding = first.left_padding.astype(mx.int32)
        self.bucket = bucket or CACHE_BUCKET
        size = capacity(self.position + 1, self.bucket)
        self.keys = [_widen(c.keys[..., : self.position, :], size) for c in cache]
        self.values = [_widen(c.values[..., : self.position, :], size) for c in cache]
        mx.eval(self.keys, self.values, self.left_padding)
        self.split = split
        self.step = step_of(model, forward, split)

    @property
    def size(self) -> int:
        """The capacity of the buffers (positions)."""
        return int(self.keys[0].shape[2])

    def next_logits(self, inputs: mx.array, keep: list | None = None) -> mx.array:
        """float32 `[B, V]` logits after `inputs` `[B, 1]` (lazy); with a split, the states
        entering the split block (`[B, 1, H]`) are appended to `keep`."""
        if self.position >= self.size:  # the next bucket
            grown = self.size + self.bucket
            self.keys = [_widen(k, grown) for k in self.keys]
            self.values = [_widen(v, grown) for v in self.values]
        position = mx.array([self.position], dtype=mx.int32)
        logits, self.keys, self.values, states = self.step(inputs, position, self.left_padding, self.keys, self.values)
        self.position += 1
        if self.split and keep is not None:
            keep.append(states[0])
        return logits

    def filter(self, rows: np.ndarray) -> None:
        """Keep (and repeat) the given batch rows, in place."""
        index = mx.array(rows.astype(np.int32))
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.left_padding = self.left_padding[index]


def _widen(x: mx.array, size: int) -> mx.array:
    """`x` `[B, heads, n, D]` padded with zeros to `size` positions on axis 2."""
    return mx.pad(x, [(0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)])

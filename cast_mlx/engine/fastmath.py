"""Faster `exp`, SwiGLU and attention on MLX's CPU backend (through `power(2, .)`), and the
decode step's linears in the form MKL runs faster; other backends get MLX's own ops.
`use_fast_swiglu` swaps a loaded model's MLP modules, keeping their parameter names;
`use_fast_attention` the attention function of mlx-lm's llama/qwen modules; `decode_linears`
the linears' product while a decode step's graph is built. Why: docs/design.md, "Faster
exponentials" and "The rollout"."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base as mlx_base

from cast_mlx.engine import blas, hostmath

LOG2E = 1.4426950408889634
SWIGLU_MLP_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
ATTENTION_MODULES = SWIGLU_MLP_MODULES  # each calls its module's `scaled_dot_product_attention`


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (the one test of the backend: the CPU-only fast paths
    here, `models.resolve_dtype`'s `auto`, the rollout's on-device sampling on a GPU)."""
    return mx.default_device() == mx.cpu


def exp(x: mx.array, cpu: bool | None = None) -> mx.array:
    """`e ** x`; through `power(2, .)` on the CPU (`cpu`: default, the default device's kind)."""
    if on_cpu() if cpu is None else cpu:
        return mx.power(2.0, x * LOG2E)
    return mx.exp(x)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """`silu(gate) * x` with the sigmoid through `power(2, .)` (the CPU's fast path)."""
    return gate * x / (1 + mx.power(2.0, -LOG2E * gate))


class SwiGLU(nn.Module):
    """An mlx-lm llama/qwen MLP, `down(silu(gate(x)) * up(x))`, with the fast `swiglu`; it
    holds the original projection layers under their names."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name in mlp:  # a Module is a dict: its layers in their order, so names flatten alike
            if name in ("gate_proj", "up_proj", "down_proj"):
                setattr(self, name, mlp[name])

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)  # numpy has no bfloat16: half-precision activations stay in MLX
        act = hostmath.swiglu if hostmath.active() and gate.dtype == mx.float32 else swiglu
        return self.down_proj(act(gate, self.up_proj(x)))


def use_fast_swiglu(model: nn.Module) -> int:
    """Replace every block's MLP of a llama/qwen2/qwen3 mlx-lm model by `SwiGLU`, in place;
    returns how many were replaced (0 for other architectures, which keep theirs)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    replaced = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and type(mlp).__name__ == "MLP" and type(mlp).__module__ in SWIGLU_MLP_MODULES:
            layer.mlp = SwiGLU(mlp)
            replaced += 1
    return replaced


@partial(mx.compile, shapeless=True)
def softmax(scores: mx.array) -> mx.array:
    """`softmax(scores)` over the last axis, with `exp` as `power(2, .)` (the CPU's fast path)."""
    shifted = scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = mx.power(2.0, shifted * LOG2E)
    return e / e.sum(axis=-1, keepdims=True)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention(queries [B, Hq, L, D], keys/values [B, Hk, S, D],
    ...)` with the fast `softmax` on the CPU, for several queries a row (scoring, the update,
    prefill) under no mask, a causal one or a boolean one. Anything else (one query: a decode
    step; a quantized cache, sinks, an additive mask, another backend) goes to mlx-lm's own,
    which on the CPU composes the same ops with MLX's slower `exp`. A packed forward's layout
    (`packed.PackedLayout`, in the cache's place) does its own attention."""
    attend = getattr(cache, "attend", None)
    if attend is not None:
        return attend(queries, keys, values, scale)
    b, heads, length, dim = queries.shape
    if length < 2 or hasattr(cache, "bits") or sinks is not None or not _plain(mask) or not on_cpu():
        return mlx_base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    kv_heads, span = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv_heads, heads // kv_heads, length, dim)  # the heads sharing a key
    scores = (q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)).astype(mx.float32)
    if isinstance(mask, str):  # "causal": the queries are the last `length` positions
        mask = mx.arange(span - length, span)[:, None] >= mx.arange(span)[None]
    elif mask is not None and mask.ndim == 4:  # [B, 1, L, S]
        mask = mx.expand_dims(mask, 2)
    if mask is not None:  # a finite floor: a row with no visible key gets uniform weights, not NaN
        scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
    weights = hostmath.softmax(scores) if hostmath.active() else softmax(scores)
    out = weights.astype(values.dtype) @ mx.expand_dims(values, 2)
    return out.reshape(b, heads, length, dim)


def _plain(mask) -> bool:
    """A mask `attention` handles: none, "causal", or boolean `[L, S]` / `[B, 1, L, S]`."""
    if mask is None or isinstance(mask, str):
        return mask in (None, "causal")
    return mask.dtype == mx.bool_ and (mask.ndim == 2 or (mask.ndim == 4 and mask.shape[1] == 1))


def use_fast_attention() -> int:
    """Point the attention of mlx-lm's llama/qwen2/qwen3 modules at `attention` (process-wide,
    once); returns how many modules changed. `attention` itself hands every case it does not
    cover back to mlx-lm's function (the one in `mlx_lm.models.base`, which stays as it is)."""
    changed = 0
    for name in ATTENTION_MODULES:
        module = importlib.import_module(name)
        if module.scaled_dot_product_attention is not attention:
            module.scaled_dot_product_attention = attention  # type: ignore[attr-defined]
            changed += 1
    return changed


# The decode step's linears as `(W @ x.T).T` at the row counts where MKL's float32 GEMM runs
# that form faster with the weights streaming from memory, as in a decode step: 3-4 rows and
# multiples of 8 from 16; it is slower at 5-15 and at most other counts (docs/speed.md, "The
# decode's row counts").
TRANSPOSED_DECODE: bool | None = None  # None: on the CPU with MKL (where it was measured)
HOLD_FROM = 16  # the smallest batch that `decode_rows` keeps finished rows for
_LINEAR_CALL = nn.Linear.__call__


def transposed_rows(rows: int) -> bool:
    """Whether a decode step of `rows` rows runs its linears transposed."""
    return rows in (3, 4) or (rows >= 16 and rows % 8 == 0)


def transposes(layer: nn.Linear, x: mx.array) -> bool:
    """Whether `_transposed_linear` takes the transposed form for `layer(x)`: one position of
    `transposed_rows` rows, a layer without bias (whose `addmm` rounds its own way)."""
    return x.ndim == 3 and x.shape[1] == 1 and transposed_rows(x.shape[0]) and "bias" not in layer


def decode_rows(live: int, batch: int) -> int:
    """How many rows a decode batch of `batch` rows keeps when `live` of them are unfinished:
    with the transposed form on, the smallest transposed size from 16 up that holds `live`,
    if it fits the batch and at most 3/8 of it would be finished rows (a step of 16 rows
    costs less than one of 13-15, 24 less than 19-23, 32 less than 28-31); else `live`.
    The rows it keeps beyond `live` are finished ones, whose draws are dropped."""
    if transposed_decode():
        for size in range(max(live, HOLD_FROM), batch + 1):
            if transposed_rows(size):
                return size if 8 * (size - live) <= 3 * size else live
    return live


def _transposed_linear(self: nn.Linear, x: mx.array) -> mx.array:
    """`nn.Linear` as `(W @ x.T).T` where `transposes` says so (a view: what reads it copies
    it if it needs to); anything else as `nn.Linear` does it."""
    if transposes(self, x):
        return (self["weight"] @ x[:, 0, :].T).T[:, None, :]
    return _LINEAR_CALL(self, x)


def transposed_decode() -> bool:
    """Whether `decode_linears` transposes: `TRANSPOSED_DECODE`, else on the CPU with MKL."""
    if TRANSPOSED_DECODE is not None:
        return TRANSPOSED_DECODE
    return on_cpu() and blas.active_blas().startswith("MKL")


@contextmanager
def decode_linears():
    """While a decode step's graph is built (MLX is lazy: the product is fixed then), every
    float `nn.Linear` (LoRA's base layers too) computes `_transposed_linear`. Quantized
    layers keep their own call."""
    if not transposed_decode():
        yield
        return
    previous = nn.Linear.__call__
    nn.Linear.__call__ = _transposed_linear
    try:
        yield
    finally:
        nn.Linear.__call__ = previous

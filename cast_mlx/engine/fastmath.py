"""Faster `exp` and SwiGLU on MLX's CPU backend (through `power(2, .)`); other backends get
MLX's own ops. `use_fast_swiglu` swaps a loaded model's MLP modules, keeping their parameter
names. Why: docs/design.md, "Faster exponentials"."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
SWIGLU_MLP_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


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
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


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

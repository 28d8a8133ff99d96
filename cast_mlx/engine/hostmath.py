"""Scoring's elementwise-heavy passes in numpy, for MLX's CPU backend.

On this CPU MLX's elementwise ops take ~13 ns an element for `exp`, ~6.5 ns for `power(2, .)`
and ~2 ns for an add, where numpy's vectorised ufuncs take ~0.5 ns. Scoring's log-softmax
makes several such passes over `[positions, vocabulary]` logits (a 49k vocabulary: 31M
elements for 641 positions), and each block's attention softmax and SwiGLU a few more. Here
they run in numpy on zero-copy views of arrays MLX computed (the matmuls stay MLX's), and the
results come back as MLX arrays. Numpy's pairwise sums are also closer to exact: log-probs
within ~3e-6 of a float64 reference.

Only for forwards no gradient is taken through: a view evaluates its array, which under a
transform keeps the forward's intermediates alive and inside `mx.compile` fails, and numpy's
results carry no gradient. Why and where: docs/design.md, "Faster exponentials"."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx
import numpy as np

enabled = True  # False: scoring keeps MLX's ops on the CPU too (the memory plan's measurements)


def view(a: mx.array) -> np.ndarray:
    """`a`, evaluated, as a numpy array over MLX's own buffer (no copy; never write to it)."""
    return np.asarray(a)


def logits_stats(
    logits: mx.array, tokens: np.ndarray, inv_temp: float, with_entropy: bool
) -> tuple[mx.array, mx.array, mx.array]:
    """`(log-prob of tokens, entropy, logsumexp)` `[...]` under `softmax(logits * inv_temp)`
    for logits `[..., V]` (float32) and token ids `[...]`; the entropy is zeros without
    `with_entropy`."""
    shape = logits.shape[:-1]
    z, tokens = view(logits).reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    if inv_temp != 1.0:
        z = z * np.float32(inv_temp)
    top = z.max(axis=1)
    e = np.subtract(z, top[:, None])
    np.exp(e, out=e)
    total = e.sum(axis=1)
    lse = top + np.log(total)
    lp = z[np.arange(len(tokens)), tokens] - lse
    if with_entropy:  # H = lse - E_p[z] = lse - sum(e z) / sum e
        np.multiply(e, z, out=e)
        entropy = lse - e.sum(axis=1) / total
    else:
        entropy = np.zeros_like(lp)
    return tuple(mx.array(a.reshape(shape)) for a in (lp, entropy, lse))  # type: ignore[return-value]


# --------------------------------------------------------------------------- inside the blocks

_SCORING: ContextVar[bool] = ContextVar("cast_mlx_numpy_scoring", default=False)


@contextmanager
def scoring(on: bool = True) -> Iterator[None]:
    """While `on`: the blocks' attention softmax and SwiGLU (`fastmath`) run in numpy too. Only
    around forwards that no gradient is taken through (as `token_logprobs(numpy_passes=True)`)."""
    token = _SCORING.set(on)
    try:
        yield
    finally:
        _SCORING.reset(token)


def active() -> bool:
    return _SCORING.get()


def softmax(scores: mx.array) -> mx.array:
    """`softmax(scores)` over the last axis, in float32."""
    s = view(scores)
    e = np.subtract(s, s.max(axis=-1, keepdims=True))
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return mx.array(e)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """`silu(gate) * x` = `gate * x / (1 + e^-gate)`."""
    g = view(gate)
    with np.errstate(over="ignore"):  # e^-gate = inf for a very negative gate: the product is then -0
        out = np.exp(-g)
    out += 1
    np.divide(g, out, out=out)
    out *= view(x)
    return mx.array(out)

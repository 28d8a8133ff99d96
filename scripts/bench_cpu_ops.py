"""The CPU backend's cost of the ops a step is made of: why `fastmath` and the thread settings.

Times, in one process, medians of `--repeats` runs after a warm-up:

- elementwise ops on a `[8, 64, 1536]` float32 array (an MLP activation of one micro-batch),
  in ns per element: add, exp, power(2, .), sigmoid, `nn.silu(g) * u` (mlx-lm's SwiGLU) and
  `fastmath.swiglu`, forward and with the gradient;
- the head's exponential pass over `[8, 64, 49152]` logits: `mx.exp` against `fastmath.exp`;
- matmuls, in ms: attention's batched `[8, 3, 3, 64, 64] @ [8, 3, 1, 64, 64]` (hundreds of small
  GEMM calls: where waking BLAS threads costs most), and `[M, 576] @ [576, 1536]` for M = 16
  (a decode step) and 512 (a micro-batch).

Run it under different thread settings to compare them, e.g. `OMP_WAIT_POLICY=PASSIVE python
scripts/bench_cpu_ops.py`; the line records them (`threads`). Prints ONE JSON line.
Usage: python scripts/bench_cpu_ops.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn

from cast_mlx import fastmath
from cast_mlx.blas import active_blas, thread_settings


def median_ms(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    r = args.repeats
    keys = mx.random.split(mx.random.key(0), 6)
    g = mx.random.normal((8, 64, 1536), key=keys[0]) * 3
    u = mx.random.normal((8, 64, 1536), key=keys[1])
    z = mx.random.normal((8, 64, 49152), key=keys[2]) * 3 - 10
    mx.eval(g, u, z)

    def per_element(fn):
        return round(median_ms(fn, r) * 1e6 / g.size, 2)

    slow_grad = mx.grad(lambda a: (nn.silu(a) * u).sum())
    fast_grad = mx.grad(lambda a: fastmath.swiglu(a, u).sum())
    line: dict = {
        "bench": "cpu_ops",
        "device": str(mx.default_device()),
        "blas": active_blas(),
        "threads": thread_settings(),
        "ns_per_element": {
            "add": per_element(lambda: g + u),
            "exp": per_element(lambda: mx.exp(g)),
            "power2": per_element(lambda: mx.power(2.0, g)),
            "sigmoid": per_element(lambda: mx.sigmoid(g)),
            "silu_times_up": per_element(lambda: nn.silu(g) * u),
            "fast_swiglu": per_element(lambda: fastmath.swiglu(g, u)),
            "silu_times_up_grad": per_element(lambda: slow_grad(g)),
            "fast_swiglu_grad": per_element(lambda: fast_grad(g)),
        },
        "head_exp_ms": {
            "mx_exp": round(median_ms(lambda: mx.exp(z).sum(axis=-1), max(3, r // 3)), 1),
            "fastmath_exp": round(median_ms(lambda: fastmath.exp(z, cpu=True).sum(axis=-1), max(3, r // 3)), 1),
        },
    }
    q = mx.random.normal((8, 3, 3, 64, 64), key=keys[3])
    k = mx.random.normal((8, 3, 1, 64, 64), key=keys[4])
    w = mx.random.normal((1536, 576), key=keys[5])
    mx.eval(q, k, w)
    matmul = {"attention_scores_8x9x64x64": round(median_ms(lambda: q @ k.swapaxes(-1, -2), r), 3)}
    for m in (16, 512):
        x = mx.random.normal((m, 576), key=mx.random.key(m))
        mx.eval(x)
        matmul[f"m{m}_576x1536"] = round(median_ms(lambda x=x: x @ w.T, r), 3)
    line["matmul_ms"] = matmul
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

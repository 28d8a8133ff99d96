"""Float32 matmul speed of MLX's CPU backend with and without the fast BLAS.

Runs the same 1024x1024 float32 matmul benchmark in two subprocesses (CAST_MLX_BLAS=none and
the default search), in one run, and prints one JSON line:
{"n": 1024, "stock_gflops": ..., "fast_gflops": ..., "fast_blas": "...", "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import cast_mlx
from cast_mlx.blas import active_blas
import mlx.core as mx
n, seconds = int(sys.argv[1]), float(sys.argv[2])
a = mx.random.normal((n, n), key=mx.random.key(0))
b = mx.random.normal((n, n), key=mx.random.key(1))
mx.eval(a @ b)  # warm-up
reps, t0 = 0, time.perf_counter()
while True:
    mx.eval(a @ b)
    reps += 1
    dt = time.perf_counter() - t0
    if dt >= seconds and reps >= 3:
        break
print(json.dumps({"gflops": 2 * n**3 * reps / dt / 1e9, "blas": active_blas()}))
"""


def run(n: int, seconds: float, blas_env: str | None) -> dict:
    env = dict(os.environ)
    env.pop("CAST_MLX_BLAS", None)
    if blas_env is not None:
        env["CAST_MLX_BLAS"] = blas_env
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timing per variant")
    args = p.parse_args()
    stock = run(args.n, args.seconds, "none")
    fast = run(args.n, args.seconds, None)
    print(
        json.dumps(
            {
                "n": args.n,
                "stock_gflops": round(stock["gflops"], 2),
                "fast_gflops": round(fast["gflops"], 2),
                "fast_blas": fast["blas"],
                "ratio": round(fast["gflops"] / stock["gflops"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()

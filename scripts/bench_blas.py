"""Float32 matmul speed of MLX's CPU backend under each BLAS (and MKL setting) found here.

Each variant runs in its own subprocess, one after the other, in one run: the stock BLAS
(`CAST_MLX_BLAS=none`), the default search (what cast-mlx loads), MKL with
`MKL_ENABLE_INSTRUCTIONS=AVX2` (MKL picks slower code paths on some non-Intel CPUs), and a
system OpenBLAS (Debian `libopenblas0`) with its own CPU detection and with
`OPENBLAS_CORETYPE=Haswell` (AVX2 kernels) when present. Two shapes: a 1024x1024 square and
the 135M model's MLP shape (512 x 576 @ 576 x 1536, what a training forward multiplies).
`--repeats` alternates the order of the variants and keeps each one's best.

Prints ONE JSON line: per variant its GFLOP/s per shape, the fastest variant, and
`fast_vs_stock` (the default search against the stock BLAS, 1024 square).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import cast_mlx
from cast_mlx.engine.blas import active_blas
import mlx.core as mx
seconds = float(sys.argv[1])
out = {"blas": active_blas()}
for name, (m, k, n) in {"square_1024": (1024, 1024, 1024), "mlp_512x576x1536": (512, 576, 1536)}.items():
    a = mx.random.normal((m, k), key=mx.random.key(0))
    b = mx.random.normal((k, n), key=mx.random.key(1))
    mx.eval(a @ b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        mx.eval(a @ b)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            break
    out[name] = 2 * m * k * n * reps / dt / 1e9
print(json.dumps(out))
"""

OPENBLAS = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libopenblas.so*") + glob.glob("/usr/lib64/libopenblas.so*"))


def variants() -> dict[str, dict[str, str]]:
    """name -> environment changes."""
    found = {"stock": {"CAST_MLX_BLAS": "none"}, "default": {}}
    from_default = subprocess.run(
        [sys.executable, "-c", "import cast_mlx.engine.blas as b; print(b.load())"], capture_output=True, text=True
    ).stdout
    if "MKL" in from_default:
        found["mkl_avx2"] = {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    if OPENBLAS:
        found["openblas"] = {"CAST_MLX_BLAS": OPENBLAS[0], "OPENBLAS_CORETYPE": ""}
        found["openblas_haswell"] = {"CAST_MLX_BLAS": OPENBLAS[0], "OPENBLAS_CORETYPE": "Haswell"}
    return found


def run(seconds: float, changes: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CAST_MLX_BLAS", "MKL_ENABLE_INSTRUCTIONS")}
    for k, v in changes.items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)
    if changes.get("OPENBLAS_CORETYPE") == "":  # let OpenBLAS detect the CPU (the loader sets one)
        env["OPENBLAS_CORETYPE"] = ""
    done = subprocess.run([sys.executable, "-c", CHILD, str(seconds)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timing per shape and variant")
    p.add_argument("--repeats", type=int, default=2, help="rounds, alternating the order")
    args = p.parse_args()
    found = variants()
    best: dict[str, dict] = {}
    for round_ in range(args.repeats):
        names = list(found) if round_ % 2 == 0 else list(reversed(found))
        for name in names:
            got = run(args.seconds, found[name])
            if "error" in got:
                best.setdefault(name, got)
                continue
            keep = best.get(name, {})
            best[name] = {
                "blas": got["blas"],
                **{k: round(max(got[k], keep.get(k, 0.0)), 2) for k in got if k != "blas"},
            }
    ok = {k: v for k, v in best.items() if "error" not in v}
    line = {
        "bench": "blas",
        "repeats": args.repeats,
        "variants": best,
        "fastest_square": max(ok, key=lambda k: ok[k]["square_1024"]),
        "fastest_mlp": max(ok, key=lambda k: ok[k]["mlp_512x576x1536"]),
        "fast_vs_stock": round(ok["default"]["square_1024"] / ok["stock"]["square_1024"], 1),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()

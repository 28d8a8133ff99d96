"""Data-parallel step time, N=1 vs N=2 processes on this machine, and what N=2 exchanges.

    python scripts/bench_distributed.py [--recipe recipes/smoke.yaml] [--steps 3]

Runs the recipe for `--steps` steps in one process, then under `mlx.launch -n 2 --backend
ring` on loopback (one MKL thread per rank, so the two ranks split the cores), and reads
the runs' metrics.jsonl. Step times are medians over the steps after the first (which
compiles). It also times the collectives alone (no training) on the same ring: one
all-sum of a gradient-sized float32 buffer, and one small all-sum (the per-step scalar
reductions), medians of 20.

On a 2-core machine expect no speed-up: the point is the communication cost per step and
the bytes per step, which is what matters on real hardware. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback launcher the tests use too

from helpers import launch_loopback  # noqa: E402


def launch(args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` on loopback; stops the benchmark if a rank failed."""
    proc = launch_loopback(args, n=2, timeout=timeout, cwd=ROOT)
    if "Node with rank" in proc.stderr or proc.returncode:
        raise SystemExit(f"mlx.launch failed:\n{proc.stderr[-3000:]}")
    return proc


def train_args(recipe: str, out: Path, steps: int) -> list[str]:
    return [
        "-m",
        "cast_mlx.train",
        "--recipe",
        recipe,
        "--quiet",
        "--no-dashboard",
        "--set",
        f"logging.out_dir={out}",
        "--set",
        f"schedule.steps={steps}",
        "--set",
        f"checkpoint.every={steps}",
        "--set",
        "logging.eval_every=0",
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def median_after_first(lines: list[dict], key: str) -> float:
    values = [m[key] for m in lines[1:]] or [m[key] for m in lines]
    return statistics.median(values)


def measure_collectives(grad_floats: int, repeats: int = 20) -> None:
    """Run under mlx.launch: time the collectives alone; rank 0 prints a JSON line."""
    import cast_mlx  # noqa: F401  (fast BLAS first)

    # isort: split
    import mlx.core as mx

    from cast_mlx.engine import distributed as dist

    world = dist.init_world()
    grads = {"g": mx.ones((grad_floats,))}
    scalars = {k: 1.0 for k in "abcdef"}

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier(world)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    result = {
        "allreduce_grad_s": timed(lambda: dist.sum_tree(world, grads)),
        "small_collective_s": timed(lambda: dist.sum_values(world, scalars)),
    }
    if world.is_main:
        print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="recipes/smoke.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--measure-collectives", type=int, metavar="FLOATS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_collectives:
        measure_collectives(args.measure_collectives)
        return 0
    if args.steps < 2:
        raise SystemExit("--steps: need at least 2 (the first step compiles and is not counted)")

    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        one, two = Path(tmp) / "n1", Path(tmp) / "n2"
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *train_args(args.recipe, one, args.steps)], cwd=ROOT, capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(f"single-process run failed:\n{proc.stderr[-3000:]}")
        wall_one = time.perf_counter() - t
        t = time.perf_counter()
        launch(train_args(args.recipe, two, args.steps))
        wall_two = time.perf_counter() - t
        m1, m2 = read_metrics(one), read_metrics(two)
        import mlx.core as mx

        import cast_mlx  # noqa: F401

        ckpt = next((two / "checkpoints").glob("step_*"))
        grad_floats = sum(v.size for v in mx.load(str(ckpt / "adapters.safetensors")).values())
        pure = json.loads(
            launch([str(Path(__file__).resolve()), "--measure-collectives", str(grad_floats)])
            .stdout.strip()
            .splitlines()[-1]
        )

    n1_step, n2_step = median_after_first(m1, "time/step"), median_after_first(m2, "time/step")
    calls = median_after_first(m2, "comm/calls")
    print(
        json.dumps(
            {
                "bench": "distributed",
                "recipe": args.recipe,
                "steps": args.steps,
                "cpu_cores": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "n1_step_s": round(n1_step, 3),
                "n2_step_s": round(n2_step, 3),
                "ratio_n2_over_n1": round(n2_step / n1_step, 3),
                "n1_run_wall_s": round(wall_one, 1),
                "n2_run_wall_s": round(wall_two, 1),
                "n2_comm_s_per_step": round(median_after_first(m2, "time/comm"), 3),
                "n2_comm_calls_per_step": calls,
                "bytes_per_step": int(median_after_first(m2, "comm/bytes")),
                "grad_bytes": 4 * grad_floats,
                "allreduce_grad_s": round(pure["allreduce_grad_s"], 5),
                "small_collective_s": round(pure["small_collective_s"], 5),
                # the step's collectives: one gradient all-sum, the others small, plus two small ones
                # that comm/calls leaves out (the timing reduction and the agreed stop)
                "pure_comm_s_per_step": round(pure["allreduce_grad_s"] + (calls + 1) * pure["small_collective_s"], 4),
                "notes": "n1: default MKL threads; n2: mlx.launch -n 2 ring on loopback, MKL_NUM_THREADS=1 per rank; "
                "n2_comm_s_per_step includes waiting for the slower rank",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the tests and the benchmarks in scripts/ (not part of the library)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def torch_reference():
    """`tests/reference/torch_cast.py`, imported when a test asks for it, so that importing
    a test module never imports torch and the fast tier (`-m "not model and not torch"`)
    runs without it. Tests that call this carry the `torch` marker."""
    from reference import torch_cast  # tests/ is on sys.path (pytest's rootdir insertion)

    return torch_cast


def smoke_args(out: Path, *extra: str) -> list[str]:
    """`python` arguments that train `recipes/smoke.yaml` into `out`, quietly, plain output."""
    return ["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard",
            "--set", f"logging.out_dir={out}", *extra]  # fmt: skip


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_ports(n: int = 2) -> int:
    """A port p such that p .. p + n - 1 are free on 127.0.0.1 (the ring listens on one
    port per rank; mlx.launch's --starting-port takes the first)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def launch_loopback(args: list[str], n: int = 2, timeout: float = 900, cwd=None) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring` on loopback (free ports, one MKL thread per rank)
    running `python ARGS`; returns its exit code and captured output.

    The launcher gets a stdin that stays open and empty: with an exhausted stdin
    (/dev/null, or a closed pipe) its loop that forwards stdin to the ranks spins on a
    CPU core (mlx 0.32.4), which on a 2-core machine slows the ranks down a lot. Note that
    mlx.launch exits 0 even when a rank fails; it prints `Node with rank R exited ...`."""
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    cmd = [
        launcher,
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(n)),
        "--env",
        "MKL_NUM_THREADS=1",
        "--",
        sys.executable,
        *args,
    ]
    quiet_stdin, keep_open = os.pipe()
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=quiet_stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        os.close(quiet_stdin)
        os.close(keep_open)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def tiny_model(n: int = 3):
    """A stand-in for a LoRA model: two trainable tensors, `lora_a` (n, 2) and `lora_b` (2, n)."""
    import mlx.core as mx
    import mlx.nn as nn

    model = nn.Module()
    model.lora_a = mx.ones((n, 2))
    model.lora_b = mx.zeros((2, n))
    return model


def tiny_checkpoint(run_dir: Path, step: int, run_id: str, keep: int = 2, n: int = 3) -> Path:
    """A real checkpoint (every file, readable) of a two-tensor model, written by
    `checkpoint.save_checkpoint`."""
    import mlx.optimizers as optim

    from cast_mlx import config as cfg
    from cast_mlx.training import checkpoint

    model = tiny_model(n)
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    recipe = cfg.from_dict({"checkpoint": {"keep": keep}})
    state = checkpoint.TrainState(step=step, run_id=run_id)
    return checkpoint.save_checkpoint(
        run_dir, state, model=model, adapter_config={}, optimizer=opt, teacher=None, recipe=recipe
    )

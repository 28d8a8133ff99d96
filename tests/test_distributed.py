"""Data-parallel training over `mx.distributed` (ring backend on loopback, 2 processes).

The ranks are started either by `mlx.launch` (as a user would) or directly with the two
environment variables the ring backend reads (`MLX_RANK`, `MLX_HOSTFILE`): that gives each
rank's exit code and output, and no launcher that kills the survivors for us.

Every multi-process run sets `MKL_NUM_THREADS=1`: two ranks share the 2 cores here, and the
thread count changes MKL's float rounding, so the single-process reference uses it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cast_mlx import config as cfg
from cast_mlx.engine import distributed as dist
from cast_mlx.training import checkpoint

from helpers import ROOT, free_ports, launch_loopback, run_cli, smoke_args

ONE_THREAD = {"MKL_NUM_THREADS": "1"}
VOLATILE = ("time/", "tokens_per_s/", "memory/", "compile_count", "comm/")


def hostfile(tmp_path: Path, n: int = 2) -> Path:
    port = free_ports(n)
    path = tmp_path / "ring.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port + i}"] for i in range(n)]))
    return path


def start_ranks(tmp_path: Path, args: list[str], n: int = 2, env=None) -> list[subprocess.Popen]:
    """Start `python ARGS` as ranks 0..n-1 of a loopback ring; output goes to rank<i>.out/.err."""
    hosts = hostfile(tmp_path, n)
    procs = []
    for rank in range(n):
        full = dict(os.environ) | ONE_THREAD | (env or {}) | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        out = open(tmp_path / f"rank{rank}.out", "w")
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full, stdout=out, stderr=err))
    return procs


def launch(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` on loopback from the repository root."""
    return launch_loopback(args, n=2, timeout=timeout, cwd=ROOT)


def read(tmp_path: Path, rank: int, stream: str = "err") -> str:
    return (tmp_path / f"rank{rank}.{stream}").read_text()


def adapters(run_dir: Path, step: int) -> dict:
    return mx.load(str(run_dir / checkpoint.CHECKPOINTS / f"step_{step:06d}" / "adapters.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- pure helpers


def test_shard_rule_and_slices():
    assert dist.per_rank(8, 2) == 4 and dist.per_rank(3, 1) == 3
    with pytest.raises(cfg.ConfigError, match=r"^sampling\.prompts_per_step: 3 prompts per step .* over 2 processes"):
        dist.per_rank(3, 2)
    assert [dist.shard(list("abcdef"), r, 3) for r in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [dist.shard_uneven(list("abcde"), r, 2) for r in range(2)] == [["a", "b", "c"], ["d", "e"]]
    assert dist.shard_uneven(["a"], 1, 2) == []
    batch = cfg.load_recipe(
        None, ["algorithm.name=grpo", "algorithm.scale_rewards=batch", "sampling.prompts_per_step=4"]
    )
    with pytest.raises(cfg.ConfigError, match="algorithm.scale_rewards"):
        dist.check_recipe(batch, 2)
    dist.check_recipe(batch, 1)  # one process: anything goes


def test_a_world_of_one_passes_everything_through():
    world = dist.init_world()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    tree = {"a": mx.ones((2, 3))}
    assert dist.sum_tree(world, tree) is tree
    assert dist.sum_values(world, {"x": mx.array(2.5), "n": 3}) == {"x": 2.5, "n": 3.0}
    assert dist.max_int(world, 143) == 143 and dist.same_everywhere(world, "anything")
    assert world.comm_calls == 0  # no collective at all


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(dist.TIMEOUT_ENV, "12.5")
    assert dist.timeout_from_env() == 12.5
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(cfg.ConfigError, match=dist.TIMEOUT_ENV):
        dist.timeout_from_env()
    monkeypatch.delenv(dist.TIMEOUT_ENV)
    assert dist.recipe_timeout(cfg.load_recipe(None)) == dist.DEFAULT_TIMEOUT


# --------------------------------------------------------------------------- two processes

COLLECTIVES = """
import json
import cast_mlx
import mlx.core as mx
from cast_mlx.engine import distributed as dist

world = dist.init_world()
r = world.rank
got = dist.gather_rows(world, {"x": mx.arange(2 * (3 + 2 * r), dtype=mx.float32).reshape(2, -1) + 100 * r,
                               "flag": mx.array([r == 0, True]), "n": mx.array([r, 7], dtype=mx.int32)})
total = dist.sum_tree(world, {"g": mx.full((3,), float(r + 1)), "h": [mx.array([0.5 * r])]})
print(json.dumps({"rank": r, "x": got["x"].tolist(), "flag": got["flag"].tolist(), "n": got["n"].tolist(),
                  "g": total["g"].tolist(), "h": total["h"][0].tolist(), "stop": dist.max_int(world, 143 * r),
                  "same": dist.same_everywhere(world, "recipe"), "differ": dist.same_everywhere(world, str(r))}))
if r == 1:
    import time
    time.sleep(60)  # never joins the next collective
dist.barrier(world, "the test barrier")
"""


@pytest.mark.model  # runs the model (or mlx.launch) in subprocesses
def test_collectives_and_the_watchdog(tmp_path):
    """Two ranks: gathered rows, summed trees and agreed values are right on both; then rank
    1 hangs (alive, connections open) and rank 0's watchdog exits within the timeout."""
    procs = start_ranks(tmp_path, ["-c", COLLECTIVES], env={dist.TIMEOUT_ENV: "5"})
    start = time.time()
    code0 = procs[0].wait(timeout=120)
    waited = time.time() - start
    procs[1].kill()
    procs[1].wait()
    lines = [json.loads((tmp_path / f"rank{r}.out").read_text().strip().splitlines()[0]) for r in range(2)]
    for got in lines:
        assert got["x"] == [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0], [100, 101, 102, 103, 104], [105, 106, 107, 108, 109]]
        assert got["flag"] == [True, True, False, True] and got["n"] == [0, 7, 1, 7]
        assert got["g"] == [3.0, 3.0, 3.0] and got["h"] == [0.5]
        assert got["stop"] == 143 and got["same"] is True and got["differ"] is False
    assert code0 == dist.EXIT_TIMEOUT, read(tmp_path, 0)
    assert "rank 0 waited more than 5 s for the other ranks during the test barrier" in read(tmp_path, 0)
    assert waited < 60  # import + start-up + the 5 s timeout


def test_prompts_that_do_not_split_are_a_config_error(tmp_path):
    procs = start_ranks(tmp_path, smoke_args(tmp_path / "bad", "--set", "sampling.prompts_per_step=3"))
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [2, 2]
    assert read(tmp_path, 0).strip() == (
        "error: sampling.prompts_per_step: 3 prompts per step cannot be split evenly over 2 processes; "
        "use a multiple of 2 (each process samples prompts_per_step / N)"
    )
    assert read(tmp_path, 1) == ""  # the same decision everywhere: rank 0 says it once
    assert not (tmp_path / "bad").exists()  # stopped before any model was loaded


def spread_reward(folder: Path) -> list[str]:
    """`--set`s adding a reward plug-in at weight 0 (it changes no reward) whose value differs
    from row to row (the completion's length / 100): its metrics differ between one rank's
    rows and the global batch's."""
    plugin = folder / "spread.py"
    plugin.write_text("def spread(completions, **kw):\n    return [len(c) / 100 for c in completions]\n")
    return ["--set", f"reward.functions=[math, {plugin}:spread]", "--set", "reward.weights=[1, 0]"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, smol_dir):
    """2 steps of the smoke recipe under `mlx.launch -n 2 --backend ring` on loopback."""
    tmp = tmp_path_factory.mktemp("dp")
    out = tmp / "n2"
    sets = ["--set", "optimizer.micro_batch_size=1", "--set", "checkpoint.keep=5", *spread_reward(tmp)]
    proc = launch(smoke_args(out, *sets))
    return out, proc


def test_two_ranks_equal_one_process_with_accumulation(tmp_path, two_rank_run):
    """The adapters after 2 steps with N=2 equal those of one process that runs the same
    global batch (2 prompts x 2 completions) with the same seed, accumulating gradients.

    The reference does its work in the same pieces as the ranks: it samples in waves of one
    rank's share (`sampling.max_batch=2`) and both use per-row micro-batches. Float
    rounding depends on batch shapes (~1e-5 in sampled log-probs), and CAST's first-step
    gaps are themselves float noise (teacher = policy), whose signs pick the advantages; so
    different batching gives different, equally valid, updates. With the same pieces, the
    only difference left is the order in which gradients are summed."""
    n2, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Node with rank" not in proc.stderr  # mlx.launch warns when a rank fails
    assert proc.stdout.count("step 1/2") == 1 and proc.stdout.count("done: 2 steps") == 1  # rank 0 only
    assert "processes: 2" in proc.stdout

    one = tmp_path / "one"
    ref = run_cli(
        *smoke_args(
            one, "--set", "optimizer.micro_batch_size=1", "--set", "sampling.max_batch=2", *spread_reward(tmp_path)
        ),
        env=ONE_THREAD,
        timeout=900,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    for step in (1, 2):
        a, b = adapters(n2, step), adapters(one, step)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=0, atol=1e-5, err_msg=f"{step} {k}")
    moved = max(float(np.abs(np.array(v)).max()) for k, v in adapters(n2, 2).items() if k.endswith("lora_b"))
    assert moved > 1e-4  # lora_b starts at 0: the runs did train

    # the global metrics line is the single-process one, the reward functions' included
    ma, mb = metrics(n2), metrics(one)
    assert [m["step"] for m in ma] == [1, 2]
    assert all(m["rewards/spread/std"] > 0 for m in mb)  # the rows differ: one rank's would not do
    for x, y in zip(ma, mb):
        for k, v in y.items():
            if isinstance(v, bool):
                assert x[k] is v, k
            elif not k.startswith(VOLATILE):
                assert x[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
        assert x["comm/bytes"] > 4 * sum(v.size for v in adapters(n2, 1).values())  # the gradient sum
    state = json.loads((n2 / checkpoint.CHECKPOINTS / "step_000002" / "state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.model  # runs the model (or mlx.launch) in subprocesses
def test_two_ranks_equal_one_process_accumulating_two_micro_batches(tmp_path):
    """The literal form: one process with gradient accumulation 2 (micro-batches of 2 rows,
    decode batch of all 4 streams) against N=2 (one micro-batch of 2 rows per rank).

    With `algorithm.flip=none` the first step's gaps (teacher = policy, so float noise)
    only rescale advantages inside their box by ~1e-5 instead of choosing their signs, so
    different batch shapes give the same update up to rounding. The update runs the whole
    model (`system.reuse_frozen: false`): kept frozen-block states come from each process's
    own decode batch, whose other shape changes them by more rounding than this 1e-5 check of
    the gradient reduction allows (one process with and without them: tests/test_train.py)."""
    sets = ["--set", "algorithm.flip=none", "--set", "system.reuse_frozen=false"]
    n2 = tmp_path / "n2"
    proc = launch(smoke_args(n2, *sets))
    assert proc.returncode == 0 and "Node with rank" not in proc.stderr, proc.stderr[-3000:]
    one = tmp_path / "one"
    ref = run_cli(*smoke_args(one, *sets, "--set", "optimizer.micro_batch_size=2"), env=ONE_THREAD, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for step in (1, 2):
        a, b = adapters(n2, step), adapters(one, step)
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=0, atol=1e-5, err_msg=f"{step} {k}")
    moved = max(float(np.abs(np.array(v)).max()) for k, v in adapters(n2, 2).items() if k.endswith("lora_b"))
    assert moved > 1e-4
    assert [m["reward"] for m in metrics(n2)] == [m["reward"] for m in metrics(one)]


def test_resume_needs_the_same_number_of_processes(tmp_path, two_rank_run):
    n2, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_cli("-m", "cast_mlx.train", "--resume", str(n2), "--quiet", timeout=300)
    assert single.returncode == 2
    assert "written by 2 process(es) and this run has 1; resume it with mlx.launch -n 2" in single.stderr


@pytest.mark.slow
def test_two_ranks_resume_bit_identically(tmp_path, two_rank_run):
    """Resume the N=2 run from its step-1 checkpoint with N=2: step 2 is bit-identical."""
    import shutil

    n2, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = tmp_path / "part"
    shutil.copytree(n2, part)
    shutil.rmtree(part / checkpoint.CHECKPOINTS / "step_000002")
    (part / checkpoint.CHECKPOINTS / checkpoint.LATEST).write_text("step_000001\n")
    resumed = launch(["-m", "cast_mlx.train", "--resume", str(part), "--quiet", "--no-dashboard"])
    assert resumed.returncode == 0 and "Node with rank" not in resumed.stderr, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = adapters(n2, 2), adapters(part, 2)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    assert [m["step"] for m in metrics(part)] == [1, 2]


def test_a_dead_rank_makes_the_other_exit_with_a_clear_error(tmp_path, smol_dir):
    """SIGKILL rank 1 while training: rank 0 stops at its next collective (at most one step
    later) with a clear error and a non-zero exit code, instead of hanging."""
    out = tmp_path / "run"
    procs = start_ranks(tmp_path, smoke_args(out, "--set", "schedule.steps=50", "--set", "checkpoint.every=100"))
    deadline = time.time() + 600
    while time.time() < deadline and "run: smoke" not in read(tmp_path, 0, "out"):
        assert procs[0].poll() is None, read(tmp_path, 0)
        time.sleep(0.2)
    time.sleep(2)  # past the start-up barrier: training
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = procs[0].wait(timeout=300)
    waited = time.time() - killed
    procs[1].wait()
    err = read(tmp_path, 0)
    assert code == 1, err
    assert "error: rank 0 lost contact with another rank during" in err
    assert "resume with the same number of processes" in err
    assert waited < 120, waited  # one step of the smoke recipe is ~10-30 s here

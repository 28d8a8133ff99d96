"""One run per folder at a time (issue #31): the run folder's lock (`run_lock.RunLock`).

Two trainings started together into one folder: one trains, the other is refused in one
line (exit 2) and writes nothing. The lock is released however a run ends (a normal end,
an exception, SIGTERM), and one left behind by a killed run is taken over with a warning.
The CLI is run in subprocesses on the tiny model, as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cast_mlx.errors import EXIT_USAGE
from cast_mlx.training import checkpoint, run_lock

from helpers import ROOT, TINY_SETS, run_cli

TINY = TINY_SETS


def train_args(model_dir: Path, out: Path, *sets: str) -> list[str]:
    """`python` arguments that train recipes/smoke.yaml on the tiny model into `out`."""
    args = ["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard"]
    for s in (f"model.name={model_dir}", *TINY, f"logging.out_dir={out}", *sets):
        args += ["--set", s]
    return args


def resume_args(out: Path, *sets: str) -> list[str]:
    args = ["-m", "cast_mlx.train", "--resume", str(out), "--quiet", "--no-dashboard"]
    for s in sets:
        args += ["--set", s]
    return args


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the verifier's worker goes with it
    )


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def wait_for_steps(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"exited ({proc.poll()}) or timed out before step {at_least}")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- through the CLI


def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    steps = 30  # long enough that the winner still holds the folder when the other asks for it
    args = train_args(tiny_model_dir, out, f"schedule.steps={steps}")
    procs = [start(args), start(args)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, EXIT_USAGE], [r[2][-2000:] for r in results]
    (winner, _, _), (loser, loser_out, loser_err) = sorted(results, key=lambda r: r[0].returncode)
    assert loser_out == ""
    said = lines(loser_err)
    assert len(said) == 1, loser_err
    assert said[0].startswith(f"error: logging.out_dir: {out} is in use by another run (pid {winner.pid}), started ")
    assert said[0].endswith("; wait for it to end or set another logging.out_dir")
    # one run's lines, each once: nothing of the refused one interleaved
    assert steps_of(out / "metrics.jsonl") == list(range(1, steps + 1))
    assert steps_of(out / "samples.jsonl") == list(range(1, steps + 1))
    assert not (out / run_lock.LOCK).exists()  # released at the normal end


def test_sigterm_releases_the_lock_and_sigkill_leaves_one_that_is_taken_over(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc = start(train_args(tiny_model_dir, out, "schedule.steps=400"))
    wait_for_steps(proc, out, 1)
    held = json.loads((out / run_lock.LOCK).read_text())
    assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert not (out / run_lock.LOCK).exists()

    # a run killed outright cannot remove its lock file; the kernel has released its lock
    proc = start(resume_args(out))
    done = len(steps_of(out / "metrics.jsonl"))
    wait_for_steps(proc, out, done + 1)
    assert json.loads((out / run_lock.LOCK).read_text())["pid"] == proc.pid
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((out / run_lock.LOCK).read_text())["pid"] == proc.pid
    last = int(checkpoint.find_checkpoint(out).name.removeprefix("step_"))
    resumed = run_cli(*resume_args(out, f"schedule.steps={last + 1}"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert lines(resumed.stderr) == [
        f"warning: {out / run_lock.LOCK}: took over the stale lock of pid {proc.pid} on {socket.gethostname()} "
        "(that run ended without releasing it)"
    ]
    assert steps_of(out / "metrics.jsonl") == list(range(1, last + 2))
    assert not (out / run_lock.LOCK).exists()


# --------------------------------------------------------------------------- the lock itself


def test_a_lock_held_by_a_live_process_refuses_with_its_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from cast_mlx.training.run_lock import RunLock;"
         f"lock = RunLock(Path({str(tmp_path / 'r')!r})).acquire(); print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(run_lock.RunInUse, match=rf"^logging.out_dir: {tmp_path / 'r'} is in use by another run "
                           rf"\(pid {holder.pid}\), started \S+; wait"):  # fmt: skip
            run_lock.RunLock(tmp_path / "r").acquire()
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0
    # its holder ended without release(): the file stays, nobody holds it, it is taken over
    assert json.loads((tmp_path / "r" / run_lock.LOCK).read_text())["pid"] == holder.pid
    heard: list[str] = []
    lock = run_lock.RunLock(tmp_path / "r").acquire(warn=heard.append)
    assert len(heard) == 1 and f"took over the stale lock of pid {holder.pid} on " in heard[0]
    assert json.loads((tmp_path / "r" / run_lock.LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(run_lock.RunInUse, match=rf"\(pid {os.getpid()}\)"):  # this process holds it already
        run_lock.RunLock(tmp_path / "r").acquire()
    lock.release()
    assert not (tmp_path / "r" / run_lock.LOCK).exists()
    assert (tmp_path / "r").is_dir()  # it existed before this lock: kept


def test_a_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / run_lock.LOCK).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}) + "\n")
    heard: list[str] = []
    with run_lock.RunLock(tmp_path).acquire(warn=heard.append):
        assert heard == [
            f"warning: {tmp_path / run_lock.LOCK}: took over the stale lock of pid {dead.pid} on elsewhere "
            "(that run ended without releasing it)"
        ]
    assert not (tmp_path / run_lock.LOCK).exists()


def test_an_exception_releases_the_lock_and_a_failed_start_leaves_no_folder(tmp_path, monkeypatch, tiny_model_dir):
    from cast_mlx.cli import train as train_cli
    from cast_mlx.training import trainer

    out = tmp_path / "new" / "run"
    seen = {}

    def failing_setup(recipe, out_dir=None, world=None):
        seen["lock"] = json.loads((out / run_lock.LOCK).read_text())
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "setup", failing_setup)
    with pytest.raises(RuntimeError, match="boom"):
        train_cli.main(train_args(tiny_model_dir, out)[2:])
    assert seen["lock"]["pid"] == os.getpid()  # held while the run set up
    assert not (out / run_lock.LOCK).exists()
    assert not (tmp_path / "new").exists()  # the folders the lock made are removed while empty

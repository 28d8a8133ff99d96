"""Nothing lost, nothing confusing (issue #15): one run per folder, strict resume, NaN
that cannot hide, signals to the whole process group, input errors before the model loads.

The promises about the CLI are tested through the CLI, in a subprocess: the exit code, the
one line it prints, and the files it leaves on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from cast_mlx import config as cfg
from cast_mlx.training import callbacks, checkpoint, trainer

from helpers import ROOT, run_cli, smoke_args, tiny_checkpoint, tiny_model


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------- small parts


def test_pruning_keeps_the_checkpoints_of_other_runs(tmp_path):
    for step in (5, 6, 7):
        tiny_checkpoint(tmp_path, step, "old")
    for step in (1, 2, 3):
        tiny_checkpoint(tmp_path, step, "new", keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    # "old" kept its newest two (6, 7) when it wrote; "new" pruned only its own step 1
    assert names == ["step_000002", "step_000003", "step_000006", "step_000007"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_an_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    tiny_checkpoint(tmp_path, 1, "r")
    newest = tiny_checkpoint(tmp_path, 2, "r")
    (newest / "optimizer.safetensors").write_bytes(b"\x00" * 10)  # a bad disk, a copy cut short
    heard: list[str] = []
    found = checkpoint.find_checkpoint(tmp_path, warn=heard.append)
    assert found.name == "step_000001"
    assert len(heard) == 1 and "step_000002" in heard[0] and "optimizer.safetensors" in heard[0]
    # a NaN tensor makes a checkpoint unreadable too, and so does a missing recipe
    mx.save_safetensors(str(found / "adapters.safetensors"), {"lora_a": mx.array([[float("nan")]])})
    assert "holds NaN/inf" in checkpoint.unreadable(found)
    (newest / "recipe.yaml").unlink()
    assert checkpoint.unreadable(newest) == "recipe.yaml is missing"
    with pytest.raises(checkpoint.TrainingError, match="no complete checkpoint"):
        checkpoint.find_checkpoint(tmp_path)


def test_resume_loads_strictly(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, 1, "r")

    def load(model):
        opt = optim.AdamW(learning_rate=1e-3)
        return checkpoint.load_checkpoint(ckpt, 1, model=model, optimizer=opt, teacher=None)

    assert load(tiny_model()).step == 1
    with pytest.raises(
        checkpoint.CheckpointError, match=r"'lora_b' is float32 \(2, 3\), this run has float32 \(2, 4\)"
    ):
        load(tiny_model(4))
    mx.save_safetensors(str(ckpt / "adapters.safetensors"), {"unrelated.weight": mx.ones((2,))})
    with pytest.raises(checkpoint.CheckpointError, match="holds 1 tensor.* this run does not have, e.g. 'unrelated"):
        load(tiny_model())
    mx.save_safetensors(str(ckpt / "adapters.safetensors"), {"lora_a": mx.ones((3, 2))})
    with pytest.raises(checkpoint.CheckpointError, match="lacks 1 tensor.* e.g. 'lora_b'"):
        load(tiny_model())


def test_a_torn_metrics_line_is_dropped_not_fatal(tmp_path, capsys):
    lines = [json.dumps({"step": s, "reward": 0.5}) for s in range(4)]
    text = "\n".join(lines) + '\n{"step": 4, "rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    files = callbacks.MetricsFiles(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == text  # untouched until the run writes
    files.on_metrics({"step": 3, "reward": 1.0}, [])
    assert _steps(tmp_path) == [0, 1, 2, 3]
    assert "dropped 1 unreadable line(s) (line 5" in capsys.readouterr().out


# --------------------------------------------------------------------------- NaN in a real step


def test_a_nan_teacher_is_a_bad_step_not_nothing_to_learn(tmp_path, smol_dir):
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'r'}"])
    with trainer.setup(recipe) as run:
        run.teacher.params = {k: v * float("nan") for k, v in run.teacher.params.items()}
        metrics, _ = trainer.train_step(run)
        assert metrics["update_applied"] is False
        assert np.isnan(metrics["loss"])
        assert run.state.bad_steps == 1
        with pytest.raises(checkpoint.TrainingError, match="non-finite teacher gaps"):
            for _ in range(run.recipe.system.max_bad_steps):
                trainer.train_step(run)


# --------------------------------------------------------------------------- the CLI


def test_two_runs_into_one_folder(tmp_path, smol_dir):
    out = tmp_path / "d"
    first = run_cli(*smoke_args(out, "--set", "schedule.steps=3"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    again = run_cli(*smoke_args(out, "--set", "schedule.steps=1", "--set", "optimizer.lr=1e-3"))
    assert again.returncode == 2
    line = _error_line(again)
    assert "logging.out_dir" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before  # nothing touched
    # --overwrite: the folder becomes the new run's, and the message names its checkpoint
    new = run_cli(*smoke_args(out, "--set", "schedule.steps=1", "--set", "optimizer.lr=1e-3", "--overwrite"))
    assert new.returncode == 0, new.stderr[-2000:]
    assert f"adapters in {out / 'checkpoints' / 'step_000001'}" in new.stdout
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001"]
    assert _steps(out) == [1]
    resumed = run_cli("-m", "cast_mlx.train", "--resume", str(out), "--quiet", "--no-dashboard")
    assert resumed.returncode == 0 and "nothing to do" in resumed.stdout


def test_resume_errors_leave_the_run_as_it_was(tmp_path, smol_dir):
    out = tmp_path / "r"
    first = run_cli(*smoke_args(out, "--set", "schedule.steps=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    resume = ["-m", "cast_mlx.train", "--resume", "--quiet", "--no-dashboard"]

    # nothing left to run from an older checkpoint: no metrics or checkpoints lost
    proc = run_cli(*resume[:3], str(out / "checkpoints" / "step_000001"), *resume[3:], "--set", "schedule.steps=1")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr
    assert _snapshot(out) == before

    # a check that needs the model fails after the load: exit 2, one line, files untouched
    proc = run_cli(
        *resume[:3], str(out), *resume[3:], "--set", "schedule.steps=3", "--set", "sampling.max_new_tokens=9000"
    )
    assert proc.returncode == 2
    assert "sampling.max_new_tokens" in _error_line(proc) and "context" in proc.stderr
    assert _snapshot(out) == before

    # a different --recipe names the fields that differ
    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "recipes/smoke.yaml").read_text().replace("lr: 1.0e-4", "lr: 0.5"))
    proc = run_cli(*resume[:3], str(out), "--recipe", str(other), "--set", f"logging.out_dir={out}")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "optimizer.lr (0.0001 vs 0.5)" in line and "logging" not in line

    # adapters that are not this run's: a one-line error, not a silent fresh start
    latest = checkpoint.find_checkpoint(out)
    mx.save_safetensors(str(latest / "adapters.safetensors"), {"unrelated.weight": mx.ones((2,))})
    proc = run_cli(*resume[:3], str(out), *resume[3:], "--set", "schedule.steps=3")
    assert proc.returncode == 2
    assert "adapters.safetensors holds 1 tensor(s) this run does not have" in _error_line(proc)
    assert _steps(out) == [1, 2]

    # an unreadable newest checkpoint: a warning, and the previous one is resumed
    (latest / "optimizer.safetensors").write_bytes(b"garbage")
    proc = run_cli(*resume[:3], str(out), *resume[3:], "--set", "schedule.steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: skipping checkpoint" in proc.stderr and "step_000002" in proc.stderr
    assert "resumed from" in proc.stdout and "step_000001" in proc.stdout
    assert _steps(out) == [1, 2]


def test_input_errors_are_reported_before_the_model_loads(tmp_path):
    """The home below holds no model: an error reported after a load would be a model
    error, so each of these one-line messages proves the check ran first."""
    home = {"CAST_MLX_HOME": str(tmp_path / "no-models-here")}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, expected in ((blocker, "is a file"), (blocker / "sub", "cannot be written")):
        proc = run_cli(*smoke_args(out), env=home)
        assert proc.returncode == 2
        assert "logging.out_dir" in _error_line(proc) and expected in proc.stderr
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    (tmp_path / "folder").mkdir()
    for path, expected in (
        ("empty.jsonl", "empty (no rows)"),
        ("latin1.jsonl", "line 1 is not UTF-8"),
        ("folder", "no train.jsonl"),
        ("missing.jsonl", "missing.jsonl"),
    ):
        data = ["--set", "data.task=gsm8k", "--set", f"data.path={tmp_path / path}"]
        proc = run_cli(*smoke_args(tmp_path / "out", *data), env=home)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = _error_line(proc)
        assert line.startswith("error: data: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def _popen_in_own_group(args: list[str], env: dict | None = None, sigint=signal.SIG_DFL) -> subprocess.Popen:
    """The CLI in its own process group, as a terminal gives a job, with SIGINT's disposition
    `sigint` (a terminal job's is the default, whatever this test process has)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out or exited ({proc.poll()}) before the condition held")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_stops_cleanly(tmp_path, smol_dir, sig, code):
    """Ctrl-C in a terminal signals the whole group, the verifier's workers included: the
    run still finishes its step, writes the checkpoint and exits with the signal's code."""
    out = tmp_path / "g"
    proc = _popen_in_own_group(smoke_args(out, "--set", "schedule.steps=60", "--set", "checkpoint.every=100"))
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 1, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    if children.exists():  # Linux: the verifier's worker is up and in the same group
        workers = [int(c) for c in children.read_text().split()]
        assert workers and all(os.getpgid(w) == proc.pid for w in workers)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]
    assert f"{sig.name}: stopped after step" in stdout
    steps = _steps(out)
    assert checkpoint.find_checkpoint(out).name == f"step_{steps[-1]:06d}"
    assert steps == list(range(1, steps[-1] + 1))


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN])
def test_ctrl_c_during_start_up_writes_nothing(tmp_path, smol_dir, inherited):
    """Also when the process inherits SIGINT ignored, as a shell's background job does (a test
    run started with `&` passes that on to this child)."""
    out = tmp_path / "s"
    args = ["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard"]
    proc = _popen_in_own_group(
        [*args, "--set", f"logging.out_dir={out}"], env={"PYTHONUNBUFFERED": "1"}, sigint=inherited
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the resolved recipe comes first, then the start-up
        if line.startswith("# recipe hash"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted during start-up (SIGINT); nothing was written" in stderr
    assert "Traceback" not in stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_memory_limit_below_the_weights_is_refused_and_one_over_it_is_reported(tmp_path, tiny_model_dir):
    from cast_mlx.engine import models

    stored = models.stored_weight_bytes(str(tiny_model_dir))
    assert stored and stored == sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    sets = [f"model.name={tiny_model_dir}", "sampling.group_size=4", "sampling.max_new_tokens=8", "lora.num_layers=1",
            "logging.eval_every=0", "schedule.steps=2"]  # fmt: skip

    def train(limit_bytes: float, out):
        args = [*sets, f"system.memory_limit_gb={limit_bytes / 2**30!r}", f"logging.out_dir={out}"]
        return run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                       *(a for s in args for a in ("--set", s)))  # fmt: skip

    # below the weights on disk: one line before anything loads or is written
    refused = train(stored / 2, tmp_path / "low")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: system.memory_limit_gb: ") and "weights alone" in refused.stderr
    assert not (tmp_path / "low").exists()
    # above the weights, below what a step needs (MLX's limit is soft on the CPU): one warning.
    # The memory plan refuses such a limit before loading a model it knows (test_memory_plan.py),
    # so the step runs on the same model under a type the plan does not know (mlx-lm: a llama).
    unplanned = tmp_path / "unplanned"
    shutil.copytree(tiny_model_dir, unplanned)
    config = json.loads((unplanned / "config.json").read_text())
    (unplanned / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    sets[0] = f"model.name={unplanned}"
    over = train(stored * 1.01, tmp_path / "over")
    assert over.returncode == 0, over.stderr
    assert over.stdout.count("above system.memory_limit_gb") == 1
    assert "warning: step 1 peaked at" in over.stdout and "lower optimizer.micro_batch_size" in over.stdout
    # no limit: no warning
    free = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                   *(a for s in [*sets, f"logging.out_dir={tmp_path / 'free'}"] for a in ("--set", s)))  # fmt: skip
    assert free.returncode == 0 and "memory_limit_gb" not in free.stdout

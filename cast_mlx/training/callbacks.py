"""Where a run's metrics go: `TrainingCallback` and `CallbackList` (after mlx-lm's), and the sinks
(metrics/samples/eval files, wandb, TensorBoard, trackio). The hooks and when the loop calls them:
docs/design.md, "Callbacks"."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable

from cast_mlx import config as cfg
from cast_mlx.errors import disk_full

PHASES = ("sampling", "verifying", "teacher", "update", "eval", "checkpoint")


class TrainingCallback:
    """Does nothing; a callback overrides what it needs."""

    def on_train_begin(self, info: dict) -> None:
        pass

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        pass

    def on_message(self, text: str) -> None:
        pass

    def on_phase(self, phase: str, done: int, total: int, note: str = "") -> None:
        pass

    def on_train_end(self) -> None:
        pass


class CallbackList(TrainingCallback):
    """Several callbacks called as one, in order; an empty list is a valid silent run."""

    def __init__(self, callbacks: list[TrainingCallback]) -> None:
        self.callbacks = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def on_train_begin(self, info: dict) -> None:
        for c in self.callbacks:
            c.on_train_begin(info)

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        for c in self.callbacks:
            c.on_metrics(metrics, samples)

    def on_message(self, text: str) -> None:
        for c in self.callbacks:
            c.on_message(text)

    def on_phase(self, phase: str, done: int, total: int, note: str = "") -> None:
        for c in self.callbacks:
            c.on_phase(phase, done, total, note)

    def on_train_end(self) -> None:
        for c in self.callbacks:
            c.on_train_end()


EVAL_FILE = "eval.jsonl"
PER_PROBLEM = "eval/per_problem"  # a metrics key whose value goes to eval.jsonl, not metrics.jsonl


class MetricsFiles(TrainingCallback):
    """`metrics.jsonl` (one line per metrics line), `samples.jsonl`, and `eval.jsonl` (the
    per-problem 0/1 results of each eval, for paired tests) in the run folder.

    Nothing is touched until the first line is written (a start-up that fails, or a resume
    with nothing left to run, leaves the files as they were). Then a fresh run starts the
    files anew and a resumed one keeps the lines up to the step it resumes from; a line that
    does not parse (a write torn by a crash) is dropped with a warning. Each write is whole
    or nothing (`append_text`, `replace_text`); a full disk is a `DiskFullError` naming the
    file, which stops the run with its last checkpoint intact. With a `label` (an oracle
    run's), every metrics line carries it."""

    def __init__(self, run_dir: Path, resume_step: int | None, label: str | None = None):
        self.run_dir, self.resume_step, self.started, self.label = run_dir, resume_step, False, label
        self.metrics_path, self.samples_path = run_dir / "metrics.jsonl", run_dir / "samples.jsonl"
        self.eval_path = run_dir / EVAL_FILE

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in (self.metrics_path, self.samples_path, self.eval_path):
            if self.resume_step is None:
                p.unlink(missing_ok=True)
            elif p.exists():
                keep, torn = kept_lines(p.read_text(errors="replace"), self.resume_step)
                if torn:
                    print(f"warning: {p}: dropped {len(torn)} unreadable line(s) (line {torn[0]}: a torn write?)")
                replace_text(p, "".join(line + "\n" for line in keep))
        self.started = True

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        if not self.started:
            self._start()
        per_problem = metrics.get(PER_PROBLEM)
        if per_problem is not None:
            append_text(self.eval_path, json.dumps({"step": metrics["step"], **per_problem}) + "\n")
        line = {k: v for k, v in metrics.items() if k != PER_PROBLEM}
        append_text(self.metrics_path, json.dumps(line | ({"label": self.label} if self.label else {})) + "\n")
        append_text(self.samples_path, "".join(json.dumps(s) + "\n" for s in samples))


def append_text(path: Path, text: str) -> None:
    """Append `text` (whole lines) to `path`, all of it or nothing: a write that fails (a
    full disk) is cut back to the file's length before it, so no torn line stays, and a full
    disk is a `DiskFullError` naming the file, the free space and the bytes it needed."""
    data = text.encode("utf-8")
    start = None
    fd = -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.fstat(fd).st_size
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        if fd >= 0 and start is not None:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
        full = disk_full(exc, path, needed=len(data))
        if full is None:
            raise
        raise full from exc
    finally:
        if fd >= 0:
            os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a temp file renamed over it): a write that
    fails (a full disk: a `DiskFullError`) leaves the file as it was and no temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full(exc, path, needed=len(text.encode("utf-8")))
        if full is None:
            raise
        raise full from exc


class MemoryLimitWatch(TrainingCallback):
    """MLX's memory limit is soft on the CPU: the first step whose measured peak went over
    `system.memory_limit_gb` gets one warning naming the fields that lower it."""

    def __init__(self, limit_gb: float, tell: Callable[[str], None] = print):
        self.limit_gb, self.tell, self.warned = limit_gb, tell, False

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        peak = metrics.get("memory/peak_gb")
        if self.warned or not isinstance(peak, (int, float)) or peak <= self.limit_gb:
            return
        self.warned = True
        self.tell(
            f"warning: step {metrics['step']} peaked at {peak:.2f} GB, above system.memory_limit_gb = "
            f"{self.limit_gb:g} (MLX's limit is soft on this backend); lower optimizer.micro_batch_size, "
            "sampling.group_size, sampling.max_new_tokens or lora.num_layers, or raise the limit"
        )


def kept_lines(text: str, last_step: int) -> tuple[list[str], list[int]]:
    """The JSON lines of `text` with `step <= last_step`, and the (1-based) numbers of the
    lines that do not parse or are not an object with an integer `step`."""
    keep, torn = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            torn.append(n)
        elif step <= last_step:
            keep.append(line)
    return keep, torn


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class WandbLogger(TrainingCallback):
    def __init__(self, run):
        self.run = run

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        self.run.log(_numeric(metrics), step=metrics["step"])

    def on_train_end(self) -> None:
        self.run.finish()


class TensorBoardLogger(TrainingCallback):
    def __init__(self, writer):
        self.writer = writer

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        for k, v in _numeric(metrics).items():
            self.writer.add_scalar(k, v, metrics["step"])

    def on_train_end(self) -> None:
        self.writer.close()


class TrackioLogger(TrainingCallback):
    """A trackio run in trackio's local store (`TRACKIO_DIR`, default `$HF_HOME/trackio`): each
    metrics line's numbers at its step (`step` itself is the x axis, a name trackio reserves)."""

    def __init__(self, trackio, run):
        self.trackio, self.run = trackio, run

    def on_metrics(self, metrics: dict, samples: list[dict]) -> None:
        self.run.log({k: v for k, v in _numeric(metrics).items() if k != "step"}, step=metrics["step"])

    def on_train_end(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # its "Uploading logs" line: nothing is uploaded
            self.trackio.finish()


TRACKIO_PROJECT = "cast-mlx"
# What would send a trackio run elsewhere than the local store: a Space, a server, a webhook.
TRACKIO_REMOTE_ENV = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_WEBHOOK_URL")


def _trackio_logger(recipe: cfg.Recipe, resumed: bool) -> TrackioLogger | None:
    """A local-only trackio run named after the recipe (a resumed run continues the newest
    run of that name), or None when trackio is not installed. Nothing goes to the network:
    no Space, server or webhook (their environment variables are ignored) and no Hub user
    lookup (trackio asks the Hub who the token belongs to; the name is left out instead)."""
    try:
        import trackio
    except ImportError:
        return None
    from unittest import mock

    local_env = {k: v for k, v in os.environ.items() if k not in TRACKIO_REMOTE_ENV}
    with (
        mock.patch.dict(os.environ, local_env, clear=True),
        mock.patch.object(trackio.Run, "_get_username", return_value=None, create=True),
        contextlib.redirect_stdout(io.StringIO()),  # its banner; the line below says where the run is
    ):
        run = trackio.init(
            project=TRACKIO_PROJECT,
            name=recipe.name,
            config=cfg.to_dict(recipe),
            resume="allow" if resumed else "never",
            space_id=None,
            server_url=None,
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
    from trackio.utils import TRACKIO_DIR

    print(f"trackio: run {recipe.name} in {TRACKIO_DIR} (to view: trackio show --project {TRACKIO_PROJECT})")
    return TrackioLogger(trackio, run)


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]  # the fallback of the same name
        except ImportError:
            return None
    return SummaryWriter(str(log_dir))


def sinks(recipe: cfg.Recipe, run_dir: Path, resume_step: int | None) -> list[TrainingCallback]:
    """The recipe's sinks: the metrics files, and wandb / TensorBoard / trackio when asked for
    and installed (a warning otherwise)."""
    out: list[TrainingCallback] = [MetricsFiles(run_dir, resume_step, cfg.run_label(recipe))]
    if recipe.system.memory_limit_gb:
        out.append(MemoryLimitWatch(recipe.system.memory_limit_gb))
    log = recipe.logging
    if log.wandb:
        try:
            import wandb

            out.append(WandbLogger(wandb.init(project="cast-mlx", name=recipe.name, config=cfg.to_dict(recipe))))
        except ImportError:
            print("warning: logging.wandb is on but wandb is not installed; skipping it")
    if log.tensorboard:
        writer = _summary_writer(run_dir / "tensorboard")
        if writer is None:
            print("warning: logging.tensorboard is on but no SummaryWriter is installed; skipping it")
        else:
            out.append(TensorBoardLogger(writer))
    if log.trackio:
        try:
            logger = _trackio_logger(recipe, resumed=resume_step is not None)
        except Exception as exc:  # noqa: BLE001 - its store (not the run folder) could not be opened
            print(f"warning: logging.trackio: trackio did not start ({type(exc).__name__}: {exc}); skipping it")
        else:
            if logger is None:
                print("warning: logging.trackio is on but trackio is not installed; skipping it (pip install trackio)")
            else:
                out.append(logger)
    return out

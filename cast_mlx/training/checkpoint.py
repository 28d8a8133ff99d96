"""Checkpoints: what a run writes so that `--resume` continues it bit-identically (adapters,
optimizer state, teacher snapshot, `TrainState`, the recipe), written atomically, one run per
folder (`RunLock` keeps two processes apart), loaded strictly. A leaf module. Layout and
rules: docs/design.md, "Checkpoints"."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, cast

import mlx.core as mx
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx import config as cfg
from cast_mlx.engine import models
from cast_mlx.errors import DiskFullError, TrainingError, disk_full, no_space

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # file in the checkpoints folder naming the newest complete checkpoint
TMP_PREFIX = ".tmp-"  # a checkpoint being written: `.tmp-step_NNNNNN-PID`, renamed into place when complete


class CheckpointError(TrainingError):
    """A checkpoint does not fit the run it is loaded into (an input error: exit 2)."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # next index into this epoch's order
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    recipe_hash: str = ""
    world_size: int = 1  # processes that trained it; a resume must use as many
    history: list = field(default_factory=list)  # [truncation rate, reward] of every step (drift guard)
    run_id: str = ""  # which run wrote it ("" in checkpoints older than the field)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(
    run_dir: Path, state: TrainState, *, model, adapter_config: dict, optimizer, teacher, recipe: cfg.Recipe
) -> Path:
    """Write `checkpoints/step_NNNNNN` atomically (temp dir + rename), then point `latest`
    at it; older checkpoints beyond `checkpoint.keep` are removed afterwards.

    A write that fails leaves no `.tmp-*` folder and `latest` as it was (the previous
    checkpoint stays the one a resume uses); a full disk is a `DiskFullError` naming the
    checkpoint, the free space and about what it needs."""
    root = checkpoint_root(run_dir)
    name = f"step_{state.step:06d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        models.save_adapters(model, tmp, adapter_config)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if teacher is not None:
            mx.save_safetensors(str(tmp / "teacher.safetensors"), teacher.params)
        meta = asdict(state) | {
            "teacher_version": teacher.version if teacher else 0,
            "has_teacher": teacher is not None,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(cfg.to_yaml(recipe))
    except BaseException as exc:  # a full disk, a second Ctrl-C, ...: no half-written folder stays
        kind = no_space(exc, root)  # before the removal frees what the write took
        shutil.rmtree(tmp, ignore_errors=True)
        if kind is None:
            raise
        needed = _checkpoint_bytes(model, optimizer, teacher)
        raise DiskFullError(final, "the checkpoint", needed, quota=kind == "quota") from exc
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        _write_pointer(root, LATEST, name)
    except BaseException:  # `latest` still names the previous checkpoint: that one stays the newest
        shutil.rmtree(final, ignore_errors=True)
        raise
    kept = best_checkpoint(run_dir)
    mine = [p for p in sorted(root.glob("step_*")) if p.is_dir() and _run_id(p) == state.run_id and p != kept]
    for old in mine[: -recipe.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_bytes(model, optimizer, teacher) -> int | None:
    """About what a checkpoint of these takes on disk (its tensors, and 64 KiB for the rest)."""
    try:
        tensors = [*models.lora_state(model).values(), *dict(tree_flatten(optimizer.state)).values()]
        if teacher is not None:
            tensors += list(teacher.params.values())
        return sum(int(t.nbytes) for t in tensors if isinstance(t, mx.array)) + (64 << 10)
    except Exception:  # noqa: BLE001 - only the message's estimate
        return None


def _write_pointer(root: Path, pointer: str, name: str) -> None:
    """Point `root/pointer` (`latest`, `best`) at checkpoint `name` atomically; a write that
    fails leaves the pointer as it was and no temp file."""
    tmp = root / f".{pointer}.tmp"
    try:
        tmp.write_text(name + "\n")
        os.replace(tmp, root / pointer)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full(exc, root, f"the `{pointer}` pointer")
        if full is None:
            raise
        raise full from exc


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Remove the `.tmp-*` checkpoint folders that runs which ended while writing them left
    in `run_dir/checkpoints` (a crash, SIGKILL, a full disk before this version); returns
    them. While this process holds the folder's run lock (`run_lock.RunLock`: the holder is
    its only writer) every one is stale; otherwise those whose pid (the name's last part)
    is this process's or no live process's."""
    from cast_mlx.training import run_lock

    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    held = run_lock.holds(Path(run_dir))
    stale = [p for p in sorted(root.glob(f"{TMP_PREFIX}*")) if p.is_dir() and (held or _dead_writer(p))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p for p in stale if not p.exists()]


def _dead_writer(tmp: Path) -> bool:
    """Whether the process named by a `.tmp-step_N-PID` folder is this one or gone."""
    try:
        pid = int(tmp.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False  # not a name this module writes: left alone
    if pid == os.getpid():
        return True  # this process writes its checkpoints one at a time, after this check
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


BEST = "best"  # file in the checkpoints folder naming the checkpoint with the best eval


def mark_best(run_dir: Path, ckpt: Path) -> None:
    """Point `checkpoints/best` at `ckpt`; pruning keeps it besides the newest ones."""
    _write_pointer(checkpoint_root(run_dir), BEST, Path(ckpt).name)


def best_checkpoint(run_dir: Path) -> Path | None:
    name = _pointer(checkpoint_root(run_dir) / BEST)
    if name is None:
        return None
    ckpt = checkpoint_root(run_dir) / name
    return ckpt if ckpt.is_dir() else None


def _pointer(path: Path) -> str | None:
    """The checkpoint name a `latest`/`best` file holds, or None (no file, or not a name:
    a damaged pointer is ignored, the folders themselves are what counts)."""
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name.startswith("step_") and "/" not in name and "\0" not in name else None


def _run_id(ckpt: Path) -> str | None:
    try:
        return str(json.loads((ckpt / "state.json").read_text()).get("run_id", ""))
    except (OSError, ValueError, AttributeError):
        return None


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")  # what a run writes besides its checkpoints
RUN_FOLDERS = (CHECKPOINTS, "tensorboard")


def run_artifacts(run_dir: Path) -> list[Path]:
    """The files and folders of a run in `run_dir` (other files there are not a run's)."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / n).exists()]


def clear_run(run_dir: Path) -> None:
    """Remove an earlier run's artefacts from `run_dir`, so a fresh run does not mix with
    it (the train CLI refuses such a folder unless --overwrite is given)."""
    for p in run_artifacts(run_dir):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_later(run_dir: Path, step: int) -> list[Path]:
    """Remove the checkpoints after `step`: a run resumed from an older checkpoint replaces
    the steps that came after it (their metrics lines are dropped too)."""
    later = [p for p in checkpoint_root(run_dir).glob("step_*") if p.is_dir() and _step_of(p) > step]
    for p in later:
        shutil.rmtree(p, ignore_errors=True)
    return later


def _step_of(ckpt: Path) -> int:
    try:
        return int(ckpt.name.removeprefix("step_"))
    except ValueError:
        return -1


REQUIRED_FILES = ("state.json", models.ADAPTER_WEIGHTS, models.ADAPTER_CONFIG, "optimizer.safetensors", "recipe.yaml")
STATE_EXTRA = {"teacher_version": int, "has_teacher": bool}  # in state.json besides TrainState's fields


def read_json(path: Path):
    """The JSON value of `path`; ValueError naming the file and line when it is not UTF-8
    JSON (OSError when it cannot be read)."""
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path.name} is not UTF-8 (line {line})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({type(exc).__name__})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def state_problem(state) -> str | None:
    """Why a parsed `state.json` cannot be resumed from (a field missing, unknown, or of the
    wrong type or range), or None."""
    if not isinstance(state, dict) or not _is_int(state.get("step")) or state["step"] < 0:
        return "state.json has no step"
    kinds = {f.name: {"int": int, "str": str, "list": list}[str(f.type)] for f in fields(TrainState)} | STATE_EXTRA
    unknown = set(state) - set(kinds)
    if unknown:
        return f"state.json has unknown field(s) {sorted(unknown)}"
    for name, value in state.items():
        if kinds[name] is int:
            ok = _is_int(value) and value >= (1 if name == "world_size" else 0)
        else:
            ok = isinstance(value, kinds[name])
        if ok and name == "history":
            ok = all(isinstance(h, list) and len(h) == 2 and all(map(_is_number, h)) for h in value)
        if not ok:
            return f"state.json: {name} is {json.dumps(value)[:40]}"
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def adapter_config_problem(config) -> str | None:
    """Why a parsed `adapter_config.json` cannot be loaded by mlx-lm (`load_adapters`), or None."""
    if not isinstance(config, dict):
        return f"{models.ADAPTER_CONFIG} is not a JSON object"
    if config.get("fine_tune_type", "lora") == "full":
        return None
    if not _is_int(config.get("num_layers")) or not isinstance(config.get("lora_parameters"), dict):
        return f"{models.ADAPTER_CONFIG} has no num_layers or lora_parameters"
    return None


def unreadable(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a file missing, unparsable, or a tensor with
    NaN/inf), or None. Reads every file; the tensors are the small LoRA ones."""
    missing = [f for f in REQUIRED_FILES if not (ckpt / f).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    try:
        state = read_json(ckpt / "state.json")
        read_json(ckpt / models.ADAPTER_CONFIG)  # a resume does not use it; `--adapter` does
    except ValueError as exc:  # it names the file and the line
        return str(exc)
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc.strerror})"
    why = state_problem(state)
    if why:
        return why
    try:
        yaml.safe_load((ckpt / "recipe.yaml").read_text())
        files = [models.ADAPTER_WEIGHTS, "optimizer.safetensors"]
        if state.get("has_teacher"):
            files.append("teacher.safetensors")
        for f in files:
            if not (ckpt / f).is_file():
                return f"{f} is missing"
            bad = _nonfinite(cast("dict[str, mx.array]", mx.load(str(ckpt / f))))
            if bad:
                return f"{f}: {bad} holds NaN/inf"
    except (OSError, ValueError, RuntimeError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _dtype(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def _nonfinite(tensors: dict[str, mx.array]) -> str | None:
    for k, v in tensors.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            return k
    return None


def _candidates(path: Path) -> list[Path]:
    """`path` itself if it is a checkpoint, else its checkpoints newest first (`latest`
    first). Half-written `.tmp-*` folders are never candidates."""
    if (path / "state.json").is_file():
        return [path]
    for root in (path / CHECKPOINTS, path):
        steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of, reverse=True)
        name = _pointer(root / LATEST)
        named = root / name if name is not None else None
        if named is not None and named in steps:
            steps.remove(named)
            steps.insert(0, named)
        if steps:
            return steps
    return []


def find_checkpoint(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """The newest complete, readable checkpoint of a run dir or checkpoints dir (or the
    folder itself). A newer one that is not (a crash, a copy cut short, a bad disk) is
    skipped, and `warn` hears why; an older complete one is used instead."""
    path = Path(path)
    for ckpt in _candidates(path):
        why = unreadable(ckpt)
        if why is None:
            return ckpt
        if warn is not None:
            warn(f"warning: skipping checkpoint {ckpt}: {why}")
    raise TrainingError(f"--resume {path}: no complete checkpoint found under {path}/{CHECKPOINTS}")


def checkpoint_world_size(ckpt: Path) -> int:
    """How many processes trained the checkpoint (1 for checkpoints older than that field)."""
    return int(json.loads((Path(ckpt) / "state.json").read_text()).get("world_size", 1))


def check_world_size(ckpt: Path, size: int) -> None:
    """A TrainingError unless the checkpoint was written by a run of `size` processes: the
    data slices, the random streams and the float summation order depend on it."""
    saved = checkpoint_world_size(ckpt)
    if saved != size:
        how = (
            "in one process (without mlx.launch)"
            if saved == 1
            else f"with mlx.launch -n {saved} (or a hostfile of {saved} hosts)"
        )
        raise TrainingError(
            f"--resume {ckpt}: the checkpoint was written by {saved} process(es) and this run has "
            f"{size}; resume it {how}"
        )


def check_tensors(where: str, got: dict[str, mx.array], want: dict[str, mx.array], partial=()) -> None:
    """CheckpointError (its message starts with `where`, e.g. "--resume X: adapters.safetensors")
    unless `got` has the names, shapes and dtypes of `want` and is finite. Names under a
    prefix in `partial` may be absent all together (an optimizer that has not stepped yet
    has no moments)."""
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"{where} holds {len(extra)} tensor(s) this run does not have, e.g. {extra[0]!r}")
    missing = sorted(set(want) - set(got))
    optional = [k for k in want if any(k.startswith(p) for p in partial)]
    if missing and not (set(missing) == set(optional) and not set(got) & set(optional)):
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) of this run, e.g. {missing[0]!r}")
    for k, v in got.items():
        w = want[k]
        if v.shape != w.shape or v.dtype != w.dtype:
            raise CheckpointError(
                f"{where}: {k!r} is {_dtype(v)} {tuple(v.shape)}, this run has {_dtype(w)} {tuple(w.shape)}"
            )
    bad = _nonfinite(got)
    if bad:
        raise CheckpointError(f"{where}: {bad!r} holds NaN/inf")


def load_checkpoint(ckpt: Path, world_size: int, *, model, optimizer, teacher) -> TrainState:
    """Restore adapters, optimizer and teacher in place, strictly (see `check_tensors`);
    returns the counters."""
    check_world_size(ckpt, world_size)
    state = json.loads((ckpt / "state.json").read_text())
    teacher_version = state.pop("teacher_version", 0)
    state.pop("has_teacher", None)
    lora = dict(tree_flatten(model.trainable_parameters()))
    weights = cast("dict[str, mx.array]", mx.load(str(ckpt / models.ADAPTER_WEIGHTS)))  # safetensors: a dict
    check_tensors(f"--resume {ckpt}: {models.ADAPTER_WEIGHTS}", weights, lora)
    optimizer_state = cast("dict[str, mx.array]", mx.load(str(ckpt / "optimizer.safetensors")))
    optimizer.init(model.trainable_parameters())  # the layout a checkpoint of this run has
    layout = dict(tree_flatten(optimizer.state))
    scalars = [k for k in layout if "." not in k]  # step, learning_rate
    check_tensors(
        f"--resume {ckpt}: optimizer.safetensors",
        optimizer_state,
        layout,
        partial=tuple(k for k in layout if k not in scalars),
    )
    teacher_params = None
    if teacher is not None:
        if not (ckpt / "teacher.safetensors").is_file():
            raise CheckpointError(f"--resume {ckpt}: teacher.safetensors is missing (the run had no teacher)")
        teacher_params = cast("dict[str, mx.array]", mx.load(str(ckpt / "teacher.safetensors")))
        check_tensors(f"--resume {ckpt}: teacher.safetensors", teacher_params, lora)
    model.load_weights(list(weights.items()), strict=False)  # names checked above; the base is not in the file
    optimizer.state = tree_unflatten(list(optimizer_state.items()))
    if teacher is not None:
        teacher.params = teacher_params
        teacher.version = teacher_version
    mx.eval(model.trainable_parameters(), optimizer.state)
    return TrainState(**state)

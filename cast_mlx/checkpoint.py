"""Checkpoints: what a run writes so that `--resume` continues it bit-identically.

`checkpoints/step_NNNNNN/` holds the adapters in mlx-lm's format (`adapters.safetensors`
+ `adapter_config.json`), the optimizer state, the teacher snapshot, `state.json` (the
`TrainState` counters) and the resolved `recipe.yaml`. A checkpoint is written to a
temporary folder and renamed into place; `checkpoints/latest` names the newest.

A leaf module: it knows the parts of a run, not the trainer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx import config as cfg
from cast_mlx import models

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # file in the checkpoints folder naming the newest complete checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many NaN steps); the message says why."""


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


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(
    run_dir: Path, state: TrainState, *, model, adapter_config: dict, optimizer, teacher, recipe: cfg.Recipe
) -> Path:
    """Write `checkpoints/step_NNNNNN` atomically (temp dir + rename), then point `latest`
    at it; older checkpoints beyond `checkpoint.keep` are removed afterwards."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    models.save_adapters(model, tmp, adapter_config)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    if teacher is not None:
        mx.save_safetensors(str(tmp / "teacher.safetensors"), teacher.params)
    meta = asdict(state) | {"teacher_version": teacher.version if teacher else 0}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "recipe.yaml").write_text(cfg.to_yaml(recipe))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: -recipe.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in ("state.json", models.ADAPTER_WEIGHTS, "optimizer.safetensors"))


def find_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint of a run dir or checkpoints dir (or the folder itself).

    `latest` names it; if that is missing or points at something incomplete, the newest
    complete `step_*` folder is used. Half-written `.tmp-*` folders are never candidates.
    """
    path = Path(path)
    if _complete(path):
        return path
    for root in (path / CHECKPOINTS, path):
        pointer = root / LATEST
        if pointer.is_file() and _complete(root / pointer.read_text().strip()):
            return root / pointer.read_text().strip()
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))
        if complete:
            return complete[-1]
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


def load_checkpoint(ckpt: Path, world_size: int, *, model, optimizer, teacher) -> TrainState:
    """Restore adapters, optimizer and teacher in place; returns the counters."""
    check_world_size(ckpt, world_size)
    state = json.loads((ckpt / "state.json").read_text())
    teacher_version = state.pop("teacher_version", 0)
    weights = cast("dict[str, mx.array]", mx.load(str(ckpt / models.ADAPTER_WEIGHTS)))  # safetensors: a dict
    model.load_weights(list(weights.items()), strict=False)
    optimizer_state = cast("dict[str, mx.array]", mx.load(str(ckpt / "optimizer.safetensors")))
    optimizer.state = tree_unflatten(list(optimizer_state.items()))
    if teacher is not None:
        teacher.params = mx.load(str(ckpt / "teacher.safetensors"))
        teacher.version = teacher_version
    mx.eval(model.trainable_parameters(), optimizer.state)
    return TrainState(**state)

"""Start-up input checks, run before (or right after) the model loads, so that a bad recipe,
data file or warm-start adapter costs no training time: each is a one-line ConfigError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import mlx.core as mx

from cast_mlx import config as cfg
from cast_mlx.engine import models
from cast_mlx.tasks import custom, data
from cast_mlx.training import checkpoint as ckpt_io


def task_problems(recipe: cfg.Recipe, which: str) -> list:
    """The recipe's `train` or held-out `eval` problems: the arithmetic eval split never
    overlaps the train split; gsm8k/math use their test split, a custom task its
    `data.eval_split` with the same field mapping."""
    d = recipe.data
    train = which == "train"
    n, seed = (d.train_size, recipe.seed) if train else (d.eval_size, 0)
    if d.task == "custom":
        return custom.load_custom(d, d.train_split if train else d.eval_split, n, seed)
    split = "train" if train else ("eval" if d.task == "arithmetic" else "test")
    return data.load_task(d.task, split, path=d.path, n=n, level=d.level, seed=seed)


def eval_problems(recipe: cfg.Recipe) -> list:
    """The fixed held-out set for in-training eval."""
    return task_problems(recipe, "eval")


def load_data(recipe: cfg.Recipe) -> tuple[list, list]:
    """The training problems and the held-out eval problems; a data problem (a missing or
    empty file, rows that do not parse, bytes that are not UTF-8) is a ConfigError."""
    try:
        problems = task_problems(recipe, "train")
        held_out = eval_problems(recipe) if recipe.logging.eval_every else []
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise cfg.ConfigError(f"data: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return problems, held_out


def check_warm_start(recipe: cfg.Recipe) -> Path | None:
    """`model.adapter_path`'s folder, after checking (before any model loads) that its
    adapter_config.json describes the recipe's LoRA: the same rank, scale, layers and keys."""
    path = recipe.model.adapter_path
    if path is None:
        return None
    folder = Path(path)
    where = f"model.adapter_path: {folder}"
    if not (folder / models.ADAPTER_WEIGHTS).is_file() or not (folder / models.ADAPTER_CONFIG).is_file():
        raise cfg.ConfigError(
            f"{where} is not an mlx-lm adapter folder (needs {models.ADAPTER_CONFIG} and {models.ADAPTER_WEIGHTS})"
        )
    try:
        saved = json.loads((folder / models.ADAPTER_CONFIG).read_text())
        params = saved.get("lora_parameters", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise cfg.ConfigError(f"{where}: {models.ADAPTER_CONFIG} is unreadable ({exc})") from exc
    lo = recipe.lora
    if saved.get("fine_tune_type", "lora") != "lora":
        raise cfg.ConfigError(f"{where}: a {saved.get('fine_tune_type')!r} adapter; only LoRA adapters can start a run")
    checks = [
        ("lora.num_layers", saved.get("num_layers"), lo.num_layers),
        ("lora.rank", params.get("rank"), lo.rank),
        ("lora.alpha (scale = alpha / rank)", params.get("scale"), lo.alpha / lo.rank),
        ("lora.keys", sorted(params["keys"]) if params.get("keys") else None, sorted(lo.keys)),
    ]
    for name, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise cfg.ConfigError(
                f"{name}: the recipe has {ours!r}, the adapter in {folder} {theirs!r}; make them match"
            )
    return folder


def load_warm_start(model, folder: Path) -> None:
    """Load the adapter tensors into the freshly attached LoRA layers, strictly (the names
    and shapes of this model; a key list mlx-lm left implicit is checked here)."""
    weights = cast("dict[str, mx.array]", mx.load(str(folder / models.ADAPTER_WEIGHTS)))
    try:
        ckpt_io.check_tensors(
            f"model.adapter_path: {folder / models.ADAPTER_WEIGHTS}", weights, models.lora_state(model)
        )
    except ckpt_io.CheckpointError as exc:
        raise cfg.ConfigError(str(exc)) from exc
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())


def context_length(model) -> int | None:
    """The model's context window, when its config says (mlx-lm models keep it in `args`)."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def machine_memory() -> int:
    """What this machine has for MLX, in bytes: Metal's recommended working set on a Mac GPU
    (what MLX allows itself by default), else the physical memory."""
    import os

    from cast_mlx.engine import fastmath

    if not fastmath.on_cpu():
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size"):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(recipe: cfg.Recipe) -> tuple[int, str]:
    """The bytes a run may use and how to name them: `system.memory_limit_gb` when set, else
    what the machine has (`machine_memory`). The one place that decides it, for the weights
    check below and the memory plan (`memory_plan.plan_run`)."""
    limit = recipe.system.memory_limit_gb
    if limit:
        return int(limit * 2**30), f"system.memory_limit_gb = {limit:g} GB"
    have = machine_memory()
    return have, f"this machine's {have / 2**30:.3g} GB (system.memory_limit_gb unset)"


def check_memory_limit(recipe: cfg.Recipe) -> None:
    """The memory budget (`memory_budget`) must hold at least the model's weights: their
    files on disk are a lower bound (on the CPU the weights are dequantized to float32, larger
    still). ConfigError before the model loads otherwise. The memory plan (`memory_plan`) then
    checks a whole step's peak, once the data is read. (MLX's limit is soft on the CPU: a step
    that goes over it is reported after the step, see `callbacks.MemoryLimitWatch`.)"""
    limit, name = recipe.system.memory_limit_gb, recipe.model.name
    stored = models.stored_weight_bytes(name)
    budget, label = memory_budget(recipe)
    if stored and stored > budget:
        raise cfg.ConfigError(
            f"system.memory_limit_gb: {limit:g} GB is less than {name}'s weights alone "
            f"({stored / 2**30:.2f} GB on disk, more in memory); raise it or leave it unset"
            if limit
            else f"model.name: {name}'s weights alone ({stored / 2**30:.2f} GB on disk) exceed {label}"
        )


def check_context(recipe: cfg.Recipe, model, tokenizer, problems: list) -> None:
    """The longest prompt plus `sampling.max_new_tokens` must fit the model's context (a
    ConfigError otherwise; it needs the tokenizer, so it runs right after the load)."""
    limit = context_length(model)
    if limit is None or not problems:
        return
    d = recipe.data
    longest = max(
        len(tokenizer.encode(data.build_prompt(tokenizer, p, d.system_prompt, d.answer_format))) for p in problems
    )
    if longest + recipe.sampling.max_new_tokens > limit:
        raise cfg.ConfigError(
            f"sampling.max_new_tokens: the longest prompt ({longest} tokens) plus {recipe.sampling.max_new_tokens} "
            f"new tokens exceed {recipe.model.name}'s context of {limit} tokens"
        )

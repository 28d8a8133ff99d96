"""`python -m cast_mlx.diagnose`: will CAST's teacher help here? The measurements are in
`cast_mlx.training.diagnose`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cast_mlx.cli import OneLineParser
from cast_mlx.errors import EXIT_ERROR, EXIT_USAGE
from cast_mlx.tasks import data
from cast_mlx.training import diagnose as dg
from cast_mlx.training import diagnose_batch as batch
from cast_mlx.training import memory_plan
from cast_mlx.training.diagnose import DEFAULT_CONTEXTS, TOKEN_CLASSES, report


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m cast_mlx.diagnose", description=dg.__doc__.split("\n")[0])
    p.add_argument("--model", help="embedded name, local mlx-lm folder or hub id (default: the adapter's recipe model)")
    p.add_argument("--adapter", help="run dir, checkpoints dir, checkpoint or mlx-lm adapter folder")
    p.add_argument(
        "--recipe",
        help="recipe whose model, data, sampling and algorithm are the defaults "
        "(default: the adapter's recipe, else recipes/smollm2-135m-arith.yaml)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field (repeatable), e.g. --set algorithm.name=cast",
    )  # fmt: skip
    p.add_argument(
        "--teacher-adapter",
        help="the teacher's LoRA (a lagged snapshot): run dir, checkpoint or adapter folder, or 'base' "
        "(adapters off); default: the policy itself, as right after a refresh. Allows --contexts same",
    )
    p.add_argument(
        "--vs-grpo",
        action="store_true",
        help="also: the cosine between the recipe algorithm's LoRA gradient and GRPO's on the same batch",
    )
    p.add_argument("--task", help=f"one of {', '.join(data.TASKS)} (default: the recipe's)")
    p.add_argument("--split", default="train", help="which split's prompts (default: train, as in training)")
    p.add_argument("--path", help="local .jsonl file or folder (gsm8k/math)")
    p.add_argument("--level", type=int, help="arithmetic level (default: the recipe's)")
    p.add_argument("--n", type=int, default=64, help="prompts (default 64)")
    p.add_argument("--group-size", type=int, help="completions per prompt (default: the recipe's)")
    p.add_argument("--temperature", type=float, help="default: the recipe's")
    p.add_argument("--top-p", type=float, help="default: the recipe's")
    p.add_argument("--top-k", type=int, help="default: the recipe's")
    p.add_argument("--max-new-tokens", type=int, help="default: the recipe's")
    p.add_argument(
        "--contexts", default=",".join(DEFAULT_CONTEXTS), help="teacher contexts to measure, comma-separated"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="diagnose.json", help="JSON file with every number (default: diagnose.json)")
    return p


def resolve_args(args) -> dict:
    """Validate the arguments; defaults come from --recipe, else the adapter's recipe, else
    the embedded default recipe. Raises UsageError (one line) before any model loads."""
    from cast_mlx import config as cfg
    from cast_mlx.algorithm.facts import RENAMED_CONTEXTS
    from cast_mlx.algorithm.teacher import TEACHER_CONTEXTS
    from cast_mlx.training.evaluation import UsageError, adapter_recipe, resolve_adapter

    adapter = resolve_adapter(args.adapter) if args.adapter else None
    teacher = args.teacher_adapter
    if teacher is not None and teacher != "base":
        try:
            teacher = str(resolve_adapter(teacher))
        except UsageError as exc:
            raise UsageError(str(exc).replace("--adapter", "--teacher-adapter", 1)) from None
    try:
        default = cfg.load_recipe(cfg.DEFAULT_RECIPE if cfg.DEFAULT_RECIPE.is_file() else None)
        recipe = cfg.load_recipe(args.recipe) if args.recipe else adapter_recipe(adapter) or default
    except cfg.ConfigError as exc:
        raise UsageError(str(exc)) from None
    contexts = [RENAMED_CONTEXTS.get(c.strip(), c.strip()) for c in args.contexts.split(",") if c.strip()]
    allowed = [c for c in TEACHER_CONTEXTS if c != "same" or teacher is not None]
    if "same" in contexts and teacher is None:
        raise UsageError(
            "--contexts same: the teacher here is the policy itself, so its gap on the same prompt is 0 "
            "(give --teacher-adapter to measure a lagged teacher)"
        )
    if not contexts or any(c not in allowed for c in contexts):
        raise UsageError(f"--contexts {args.contexts!r}: choose from {', '.join(allowed)}")
    task = args.task or recipe.data.task
    if task not in data.TASKS:
        raise UsageError(f"--task {task!r}: expected one of {', '.join(data.TASKS)}")
    given = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "group_size": args.group_size,
    }
    overrides = [*args.overrides, *(f"sampling.{k}={v}" for k, v in given.items() if v is not None)]
    try:
        recipe = cfg.from_dict(cfg.apply_overrides(cfg.to_dict(recipe), overrides))
    except cfg.ConfigError as exc:
        raise UsageError(str(exc)) from None
    recipe = memory_plan.with_micro_batch(recipe, None)  # `auto`: diagnose's batches are small
    sampling = recipe.sampling
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    same_task = task == recipe.data.task
    return {
        "model": args.model or recipe.model.name,
        "adapter": str(adapter) if adapter else None,
        "task": task,
        "split": args.split,
        "path": args.path or (recipe.data.path if same_task else None),
        "level": args.level or (recipe.data.level if same_task else data.DEFAULT_ARITHMETIC_LEVEL),
        "n": args.n,
        "sampling": sampling,
        "answer_format": recipe.data.answer_format,
        "system_prompt": recipe.data.system_prompt,
        "reward": recipe.data.reward,
        "contexts": contexts,
        "teacher_adapter": teacher,
        "vs_grpo": args.vs_grpo,
        "recipe": recipe,
        "default": dg.describe_default(default, "recipes/smollm2-135m-arith.yaml")
        if cfg.DEFAULT_RECIPE.is_file()
        else None,
        "seed": args.seed,
        "dtype": args.dtype,
        "out": args.out,
    }


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(doc: dict, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sp = s["sampling"]
    mix = doc["groups"]
    console.print(
        f"[bold]{s['model']}[/]{' + ' + s['adapter'] if s['adapter'] else ''} on {s['task']}: {s['n']} prompts x "
        f"{sp.group_size}, T={sp.temperature}, top-p {sp.top_p}, top-k {sp.top_k}"
        f"{' (top-p over top-k, sequential)' if sp.filter_order == 'sequential' else ''}, {sp.max_new_tokens} tokens; "
        f"accuracy {doc['accuracy']:.1%}, truncated {doc['truncated_share']:.1%}; groups all-correct "
        f"{mix['all_correct']:.0%} / all-wrong {mix['all_wrong']:.0%} / mixed {mix['mixed']:.0%}"
    )
    table = Table(title="teacher gap g = lp_T - lp_old, per context")
    table.add_column("")
    names = list(doc["contexts"])
    for name in names:
        table.add_column(name, justify="right")
    ctx = doc["contexts"]

    def row(label, get):
        table.add_row(label, *[get(ctx[n]) for n in names])

    def two(a, b):
        return f"{_f(a)} / {_f(b)}"

    def ci(m):
        mark = {"separates": " +", "anti-separates": " ANTI", "none": ""}[dg.separation(m)]
        return f"{_f(m['auc'])} [{_f(m['ci_low'])}, {_f(m['ci_high'])}]{mark}"

    for c in ("correct_pos", "correct_neg", "wrong_pos", "wrong_neg"):
        row(
            f"{c.replace('_', ' g')} share / |g|", lambda r, c=c: two(r["table"][c]["share"], r["table"][c]["abs_mean"])
        )
    row("P(g>0 | correct) / P(g>0 | wrong)", lambda r: two(r["p_pos_given_correct"], r["p_pos_given_wrong"]))
    for name in ("mean_gap", "pos_share", "answer_gap", "answer_gap_centred"):
        row(f"AUC {name} [95% CI]", lambda r, n=name: ci(r["separation"][n]))
    row(
        "|g| CV correct g- / wrong g+",
        lambda r: two(r["table"]["correct_neg"]["noise"]["cv"], r["table"]["wrong_pos"]["noise"]["cv"]),
    )
    row(
        "|g| mass / tokens in last 5%",
        lambda r: two(r["tail_mass"]["share_of_abs_gap"], r["tail_mass"]["share_of_tokens"]),
    )
    row("EOS: share g<0 / median g", lambda r: two(r["eos"]["neg_share"], r["eos"]["median_gap"]))
    row("content tokens: share g<0", lambda r: _f(r["content_neg_share"]))
    for cls in TOKEN_CLASSES:
        row(f"{cls}: share / mean g", lambda r, c=cls: two(r["by_class"][c]["share"], r["by_class"][c]["mean_gap"]))
    console.print(table)
    console.print(
        "AUC > 0.5: the teacher prefers correct completions (+: CI above 0.5; ANTI: CI below, harmful under the "
        "flip rule). answer_gap: the gap at the tokens of the final number; _centred: minus the row's mean gap."
    )
    v = doc.get("vs_grpo")
    if v:
        console.print(
            f"[bold]vs GRPO[/] ({v['algorithm']}, teacher.context={v['context']}, same batch): gradient cosine "
            f"{_f(v['cosine'], '.4f')}, |difference| / |GRPO's| {_f(v['relative_difference'], '.3f')}; mean token "
            f"weight against GRPO's: correct {_f(v['weight_correct'], '.3f')}, wrong {_f(v['weight_wrong'], '.3f')}; "
            f"flipped: correct {_f(v['flipped_correct'])}, wrong {_f(v['flipped_wrong'])}"
        )
    console.print(f"[bold]verdict:[/] {doc['verdict']}")
    console.print(f"every number: {s['out']}")


def main(argv=None) -> int:
    from cast_mlx.training.evaluation import UsageError

    try:
        s = resolve_args(build_parser().parse_args(argv))
        problems = data.load_task(s["task"], s["split"], path=s["path"], n=s["n"], level=s["level"], seed=s["seed"])
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from cast_mlx.engine import models
    from cast_mlx.training.evaluation import load_policy

    try:
        model, tokenizer = load_policy(s["model"], s["adapter"], s["dtype"])
    except (models.ModelLoadError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    sp = s["sampling"]
    teacher_params = None
    if s["teacher_adapter"] or s["vs_grpo"]:
        try:
            teacher_params = batch.lora_views(model, s["recipe"], s["adapter"], s["teacher_adapter"])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    collected = batch.collect(
        model,
        tokenizer,
        problems,
        contexts=s["contexts"],
        group_size=sp.group_size,
        sampling=sp,
        answer_format=s["answer_format"],
        system_prompt=s["system_prompt"],
        reward=s["reward"],
        seed=s["seed"],
        teacher_params=teacher_params,
    )
    doc = report(collected, sp.group_size, seed=s["seed"], default=s["default"])
    if s["vs_grpo"]:
        doc["vs_grpo"] = batch.gradient_comparison(model, s["recipe"], collected, sp.group_size)
    settings = {k: v for k, v in s.items() if k not in ("sampling", "recipe")} | {"sampling": vars(sp)}
    out = Path(s["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, **doc}, indent=1) + "\n")
    print_report(doc, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

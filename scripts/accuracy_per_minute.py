"""Accuracy per minute of training (issue #30's study): what a run reaches within a budget of
training minutes, not within a number of steps.

A run's training minutes at step s are the sum of its steps' `time/step` (sampling, judging,
teacher, update: evals and checkpoint writes excluded). The accuracy within a budget of T
minutes is the held-out eval of the last checkpoint whose training minutes are <= T (the run
keeps a checkpoint every step), evaluated exactly as the run's own evals are.

    # evaluate each run's checkpoint at each budget (appends to RUN/budget_evals.jsonl)
    python scripts/accuracy_per_minute.py evaluate RUN [RUN ...] --minutes 4 8
    # the table, the seed-level comparison against a baseline, the curves
    python scripts/accuracy_per_minute.py report ROOT --minutes 4 8 --baseline grpo-mu1

ROOT holds runs named VARIANT-seedN (the metrics, eval and budget-eval files suffice: the
committed study folder has no checkpoints). One JSON line per run and budget on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS_FILE = "budget_evals.jsonl"
EVAL_KEYS = ("eval/accuracy", "eval/accuracy_ci_low", "eval/accuracy_ci_high")


def step_lines(run: Path) -> list[dict]:
    """The run's training-step lines (step >= 1), last occurrence of each step."""
    by_step: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict) and m.get("step", 0) >= 1 and "time/step" in m:
            by_step[m["step"]] = m
    return [by_step[s] for s in sorted(by_step)]


def training_minutes(run: Path) -> dict[int, float]:
    """Step -> cumulative training minutes at its end (step 0: 0)."""
    out, total = {0: 0.0}, 0.0
    for m in step_lines(run):
        total += m["time/step"] / 60
        out[m["step"]] = total
    return out


def step_within(minutes: dict[int, float], budget: float) -> int:
    """The last step whose training minutes are within `budget`."""
    return max(s for s, t in minutes.items() if t <= budget + 1e-9)


def run_evals(run: Path) -> dict[int, dict]:
    """Step -> the run's own eval metrics (accuracy, CI, per-problem lenient)."""
    evals: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict) and "eval/accuracy" in m:
            evals[m["step"]] = {k: m[k] for k in EVAL_KEYS}
    if (run / "eval.jsonl").is_file():
        for line in (run / "eval.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["step"] in evals:
                evals[e["step"]]["lenient"] = e["lenient"]
    return evals


def budget_evals(run: Path) -> dict[float, dict]:
    path = run / BUDGETS_FILE
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["minutes"]: r for r in rows}


def evaluate(run: Path, budgets: list[float]) -> None:
    """Evaluate the checkpoint within each budget that the run's own evals do not cover."""
    from cast_mlx import config as cfg
    from cast_mlx.training import checkpoint, trainer
    from cast_mlx.training.evaluation import evaluate_held_out

    minutes, own, done = training_minutes(run), run_evals(run), budget_evals(run)
    todo = []
    for b in budgets:
        if b in done:
            continue
        step = step_within(minutes, b)
        row = {"minutes": b, "step": step, "train_minutes": minutes[step]}
        if step in own and "lenient" in own[step]:
            row |= {"source": "run's eval"} | own[step]
            _append(run, row)
        else:
            todo.append(row)
    for row in todo:
        ckpt = run / checkpoint.CHECKPOINTS / f"step_{row['step']:06d}"
        recipe = cfg.load_recipe(ckpt / "recipe.yaml")
        if not recipe.logging.eval_every:  # a run continued without evals: the same held-out problems
            recipe = cfg.load_recipe(ckpt / "recipe.yaml", ["logging.eval_every=1"])
        with trainer.setup(recipe, out_dir=run) as r:
            trainer.resume(r, ckpt)
            m = evaluate_held_out(r.model, r.tokenizer, r.held_out, recipe, r.verifier, r.world)
        row |= {"source": "checkpoint"} | {
            k: m[k] for k in ("eval/accuracy", "eval/accuracy_ci_low", "eval/accuracy_ci_high")
        }
        row["lenient"] = m["eval/per_problem"]["lenient"]
        _append(run, row)


def _append(run: Path, row: dict) -> None:
    with open(run / BUDGETS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({"run": run.name, **{k: v for k, v in row.items() if k != "lenient"}}), flush=True)


# --------------------------------------------------------------------------- the report


def runs_of(root: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"(.+)-seed(\d+)", d.name)
        if m and (d / "metrics.jsonl").is_file():
            out.setdefault(m.group(1), {})[int(m.group(2))] = d
    return out


def points(run: Path, budgets: list[float]) -> dict[str, dict]:
    """The run's accuracy at fixed steps ("step N") and within budgets ("N min")."""
    minutes, own = training_minutes(run), run_evals(run)
    out = {f"step {s}": own[s] | {"train_minutes": minutes.get(s, 0.0)} for s in sorted(own)}
    got = budget_evals(run)
    for b in budgets:
        if b in got:
            out[f"{b:g} min"] = got[b]
    return out


def report(root: Path, budgets: list[float], baseline: str, out: Path) -> None:
    from cast_mlx.training.eval_stats import mcnemar_exact

    runs = runs_of(root)
    steps = sorted({k for v in runs.values() for d in v.values() for k in points(d, budgets) if k.startswith("step")},
                   key=lambda k: int(k.split()[1]))  # fmt: skip
    columns = steps + [f"{b:g} min" for b in budgets]
    table = ["| variant | seed | steps | training min | s/step | " + " | ".join(columns) + " |"]
    table.append("|" + "---|" * (5 + len(columns)))
    summary: dict = {"budgets": budgets, "baseline": baseline, "variants": {}}
    for name, seeds in runs.items():
        per_seed = {}
        for seed, d in sorted(seeds.items()):
            lines = step_lines(d)
            minutes = training_minutes(d)
            pts = points(d, budgets)
            last = max(minutes)
            cells = [f"{pts[c]['eval/accuracy']:.3f}" if c in pts else "" for c in columns]
            per_seed[seed] = {
                "steps": last,
                "training_minutes": minutes[last],
                "seconds_per_step": float(np.median([m["time/step"] for m in lines])),
                **{c: pts[c]["eval/accuracy"] for c in columns if c in pts},
                **{f"{c} step": pts[c]["step"] for c in columns if c in pts and "step" in pts[c]},
            }
            s = per_seed[seed]
            head = f"| {name} | {seed} | {last} | {minutes[last]:.1f} | {s['seconds_per_step']:.1f} | "
            table.append(head + " | ".join(cells) + " |")
        summary["variants"][name] = per_seed
    # seed-level differences against the baseline, and a pooled exact McNemar over (seed, problem)
    lines = ["", f"Against {baseline} (same seeds): mean difference over seeds, each seed's, pooled exact McNemar.", ""]
    lines.append("| variant | point | mean diff | per seed | only variant / only baseline | p |")
    lines.append("|---|---|---|---|---|---|")
    comparisons = {}
    for name, seeds in runs.items():
        if name == baseline:
            continue
        for c in columns:
            diffs, only_new, only_base, used = [], 0, 0, []
            for seed, d in sorted(seeds.items()):
                if seed not in runs.get(baseline, {}):
                    continue
                a, b = points(runs[baseline][seed], budgets).get(c), points(d, budgets).get(c)
                if a is None or b is None or "lenient" not in a or "lenient" not in b:
                    continue
                diffs.append(b["eval/accuracy"] - a["eval/accuracy"])
                used.append(seed)
                only_new += sum(1 for x, y in zip(a["lenient"], b["lenient"]) if y and not x)
                only_base += sum(1 for x, y in zip(a["lenient"], b["lenient"]) if x and not y)
            if not diffs:
                continue
            p = mcnemar_exact(only_new, only_base)
            comparisons[f"{name} {c}"] = {
                "diffs": diffs,
                "seeds": used,
                "only_new": only_new,
                "only_base": only_base,
                "p": p,
            }
            per = ", ".join(f"{x:+.3f}" for x in diffs)
            lines.append(f"| {name} | {c} | {np.mean(diffs):+.3f} | {per} | {only_new} / {only_base} | {p:.3f} |")
    summary["comparisons"] = comparisons
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(table + lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    curves(runs, budgets, out / "accuracy-per-minute.png")
    print((out / "report.md").read_text())


def curves(runs: dict, budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, seeds) in enumerate(runs.items()):
        for j, (seed, d) in enumerate(sorted(seeds.items())):
            pts = sorted(points(d, budgets).values(), key=lambda p: p["train_minutes"])
            xs = [p["train_minutes"] for p in pts]
            ys = [p["eval/accuracy"] for p in pts]
            ax.plot(xs, ys, marker="o", color=f"C{i}", linestyle="-" if j == 0 else "--",
                    label=f"{name} seed {seed}")  # fmt: skip
    ax.set_xlabel("training minutes (evals excluded)")
    ax.set_ylabel("held-out greedy accuracy (lenient)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="evaluate each run's checkpoint within each budget")
    e.add_argument("runs", nargs="+", type=Path)
    e.add_argument("--minutes", nargs="+", type=float, required=True)
    r = sub.add_parser("report", help="the table, the comparison against a baseline and the curves")
    r.add_argument("root", type=Path)
    r.add_argument("--minutes", nargs="+", type=float, required=True)
    r.add_argument("--baseline", default="grpo-mu1")
    r.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.command == "evaluate":
        for run in args.runs:
            evaluate(run, args.minutes)
    else:
        report(args.root, args.minutes, args.baseline, args.out or args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

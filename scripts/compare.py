"""Compare GRPO and CAST (and optionally RLSD and CAST ablations) from one recipe.

    python scripts/compare.py --recipe recipes/smollm2-135m-arith.yaml --out runs/compare \
        --seeds 0 1 [--steps 60] [--rlsd] [--ablations] [--set key=value ...] \
        [--variant NAME key=value ... ] [--jobs N]

Every variant trains from the same recipe with the same seeds, so the data order, the
LoRA initialisation, the sampling keys and the compute per step are identical; only the
`--set` overrides of the variant differ. Each run is one subprocess

    python -m cast_mlx.train --recipe R [--set USER ...] --set schedule.steps=N \
        --set algorithm.name=X [--set VARIANT ...] --set logging.out_dir=OUT/V-seedS \
        --set seed=S --no-dashboard --quiet

(the comparison's own overrides come last, so a passthrough `--set` cannot change them),
with its output in `OUT/logs/V-seedS.log`. Then `OUT/report.md` and `OUT/curves.png` are
written from the runs' `metrics.jsonl`. `--report-only` skips training and rewrites both
from the runs already in OUT.

The report: eval accuracy (`eval/accuracy`, logged every `logging.eval_every` steps; set
it > 0 in the recipe) at fixed steps, mean over seeds with the per-seed values; for every
variant the first eval step at which its seed-mean accuracy reaches GRPO's final
seed-mean accuracy; the mean wall time per step (`time/step`) and its ratio to GRPO's;
and the exact command lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cast_mlx.cli import EXIT_USAGE, OneLineParser  # noqa: E402
from cast_mlx.config import ORACLE_LABEL  # noqa: E402
from cast_mlx.training.eval_stats import paired_comparison  # noqa: E402
from cast_mlx.training.plot import PlotError, plot_runs, read_jsonl, read_metrics, series, skipped_note  # noqa: E402

REWARD_WINDOW = 5  # steps averaged at each end of a run for the training-reward change
COMMANDS_FILE = "commands.json"
RUN_DIR = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# variant name -> the --set overrides that define it
# CAST as in the paper, whatever the recipe says: its rule, its answer-free context (the
# question with the task's instruction), its zero-variance base, truncated completions masked.
# (Before 2026-12-04 this variant read the question-only context and kept the recipe's
# mask_truncated; the committed runs' commands.json hold the exact commands they ran.)
PAPER_CAST = [
    "algorithm.name=cast",
    "algorithm.special_tokens=teacher",
    "algorithm.zero_var_base=1",
    "teacher.context=instructed",
    "loss.mask_truncated=true",
]
BASE_VARIANTS = {"grpo": ["algorithm.name=grpo"], "cast": PAPER_CAST}
RLSD_VARIANT = {"rlsd": ["algorithm.name=rlsd"]}
ABLATIONS = {
    "cast-noflip": [*PAPER_CAST, "algorithm.flip=none"],
    "cast-mixedonly": [*PAPER_CAST, "algorithm.zero_var_base=0"],
    "cast-fixedteacher": [*PAPER_CAST, "teacher.kind=base"],
}
ORDER = ["grpo", "cast", "rlsd", *ABLATIONS]


# --------------------------------------------------------------------------- running


def variants(rlsd: bool, ablations: bool, extra: list[list[str]] | None = None) -> dict[str, list[str]]:
    """Variant name -> its overrides: GRPO and CAST, then RLSD, the ablations and the
    `--variant NAME KEY=VALUE...` ones asked for."""
    out = dict(BASE_VARIANTS)
    if rlsd:
        out.update(RLSD_VARIANT)
    if ablations:
        out.update(ABLATIONS)
    for name, *sets in extra or []:
        out[name] = sets
    return out


def check_variants(extra: list[list[str]], taken: set[str]) -> None:
    """ValueError naming the first bad `--variant`."""
    for name, *sets in extra:
        if not VARIANT_NAME.match(name) or RUN_DIR.match(name):
            raise ValueError(
                f"--variant {name}: a name takes letters, digits, '.', '_' and '-' and does not end in -seedN"
            )
        if name in taken:
            raise ValueError(f"--variant {name}: that name is already a variant")
        taken.add(name)
        if not sets:
            raise ValueError(f"--variant {name}: give its overrides, e.g. algorithm.flip=none")
        for s in sets:
            if "=" not in s:
                raise ValueError(f"--variant {name}: {s!r} is not KEY=VALUE")


def first_bad_recipe(args) -> str | None:
    """Load the recipe with every variant's overrides before anything runs; the first
    error (an unknown key, a bad value), naming its variant, or None."""
    from cast_mlx import config as cfg

    for name, sets in variants(args.rlsd, args.ablations, args.variant).items():
        try:
            cfg.load_recipe(args.recipe, [*args.overrides, *sets])
        except cfg.ConfigError as exc:
            return f"variant {name}: {exc}"
    return None


def train_command(
    recipe: str, run_dir: Path, seed: int, variant_sets: list[str], user_sets: list[str], steps: int | None
) -> list[str]:
    """The `cast_mlx.train` command line of one run."""
    sets = list(user_sets)
    if steps is not None:
        sets.append(f"schedule.steps={steps}")
    sets += [*variant_sets, f"logging.out_dir={run_dir}", f"seed={seed}"]
    cmd = [sys.executable, "-m", "cast_mlx.train", "--recipe", recipe]
    for s in sets:
        cmd += ["--set", s]
    return cmd + ["--no-dashboard", "--quiet"]


def final_step(args, sets: list[str]) -> int:
    from cast_mlx import config as cfg

    return args.steps or cfg.load_recipe(args.recipe, [*args.overrides, *sets]).schedule.steps


def finished(run_dir: Path, steps: int) -> bool:
    """Whether `run_dir` holds a run that reached `steps` (its final checkpoint is there), so
    that a comparison cut short (a session's end) can be rerun without redoing it; a run
    with an earlier checkpoint is resumed from it."""
    return (run_dir / "checkpoints" / f"step_{steps:06d}" / "adapters.safetensors").is_file()


def run_command(args, run_dir: Path, seed: int, sets: list[str]) -> list[str] | None:
    """The command that trains (variant, seed) into `run_dir`: a fresh run, the resume of one
    cut short (a session's end: it has a checkpoint; the resume is bit-identical), or None
    when it already finished."""
    steps = final_step(args, sets)
    if finished(run_dir, steps):
        return None
    if (run_dir / "checkpoints").is_dir():
        return [sys.executable, "-m", "cast_mlx.train", "--resume", str(run_dir), "--set", f"schedule.steps={steps}",
                "--no-dashboard", "--quiet"]  # fmt: skip
    return train_command(args.recipe, run_dir, seed, sets, args.overrides, args.steps)


def run_one(args, out: Path, seed: int, name: str, sets: list[str], env: dict) -> dict:
    """Train one (variant, seed) in a subprocess, its output in `OUT/logs/V-seedS.log`; a run
    that already finished is kept as it is."""
    run_dir = out / f"{name}-seed{seed}"
    cmd = run_command(args, run_dir, seed, sets)
    if cmd is None:
        print(f"[compare] {name}-seed{seed}: finished before, kept", flush=True)
        fresh = train_command(args.recipe, run_dir, seed, sets, args.overrides, args.steps)
        return {"run": run_dir.name, "command": shlex.join(["python", *fresh[1:]]), "exit": 0, "seconds": None}
    shown = shlex.join(["python", *cmd[1:]])
    print(f"[compare] {shown}", flush=True)
    start = time.perf_counter()
    with open(out / "logs" / f"{name}-seed{seed}.log", "a") as log:  # a resumed run adds to its log
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    print(f"[compare] {name}-seed{seed}: exit {rc}, {seconds:.0f}s", flush=True)
    return {"run": run_dir.name, "command": shown, "exit": rc, "seconds": round(seconds, 1)}


def run_all(args, compare_command: str) -> list[dict]:
    """Train every (variant, seed), `--jobs` at a time; returns what was run.

    Runs go seed-major (a cut-short comparison still has every variant), so with
    `--jobs 2` GRPO and CAST of the same seed share the machine at the same time and their
    step times stay comparable. Each job gets an equal share of the BLAS threads."""
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    todo = [
        (seed, name, sets)
        for seed in args.seeds
        for name, sets in variants(args.rlsd, args.ablations, args.variant).items()
    ]
    env = dict(os.environ)
    if args.jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        env.update(MKL_NUM_THREADS=threads, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    done = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args, out, seed, name, sets, env) for seed, name, sets in todo]
        for fut in futures:
            done.append(fut.result())
            write_commands(out, compare_command, done)
    return done


def write_commands(out: Path, compare_command: str, runs: list[dict]) -> None:
    record = {"compare": compare_command, "runs": runs}
    (out / COMMANDS_FILE).write_text(json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------- reading runs


def find_runs(out: Path) -> dict[str, dict[int, list[dict]]]:
    """{variant: {seed: metrics rows}} of the `V-seedS` folders of `out` with metrics."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        m = RUN_DIR.match(d.name)
        if not m:
            continue
        try:
            rows = read_metrics(d, warn=lambda text: print(text, file=sys.stderr))
        except PlotError as exc:  # no readable metrics: say so, and report the others
            print(f"warning: {exc}", file=sys.stderr)
            continue
        runs.setdefault(m["variant"], {})[int(m["seed"])] = rows
    order = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], len(ORDER)), kv[0])))


def eval_curve(rows: list[dict]) -> dict[int, float]:
    steps, values = series(rows, "eval/accuracy")
    return {int(s): v for s, v in zip(steps, values)}


def mean_curve(seed_rows: dict[int, list[dict]]) -> dict[int, float]:
    """Seed-mean eval accuracy at the steps every seed has evaluated."""
    curves = [eval_curve(rows) for rows in seed_rows.values()]
    common = set.intersection(*(set(c) for c in curves)) if curves else set()
    return {s: sum(c[s] for c in curves) / len(curves) for s in sorted(common)}


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    """First step whose accuracy is >= target, or None."""
    return next((s for s, v in sorted(curve.items()) if v >= target - 1e-12), None)


def mean_step_time(seed_rows: dict[int, list[dict]]) -> float | None:
    """Mean `time/step` over all seeds, without each run's first step (compilation)."""
    times = []
    for rows in seed_rows.values():
        _, step_times = series(rows, "time/step")  # training steps only, not the step-0 eval line
        times += list(step_times[1:] if len(step_times) > 1 else step_times)
    return sum(times) / len(times) if times else None


def table_steps(curves: list[dict[int, float]], wanted: list[int] | None, most: int = 6) -> list[int]:
    """The eval steps shown in the table: `wanted`, else up to `most` evenly spaced ones
    of those all variants have (always the first and the last)."""
    if not curves:
        return []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if wanted:
        return [s for s in wanted if s in common]
    if len(common) <= most:
        return common
    picks = {common[round(i * (len(common) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)


# --------------------------------------------------------------------------- uncertainty


def eval_points(rows: list[dict]) -> list[dict]:
    """The eval lines of one run, in step order (the last line of a repeated step wins)."""
    by_step = {int(r["step"]): r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))}
    return [by_step[s] for s in sorted(by_step)]


def with_ci(row: dict) -> str:
    """`0.250 [0.195, 0.310]` from an eval line (its bootstrap CI when it has one)."""
    acc, lo, hi = row["eval/accuracy"], row.get("eval/accuracy_ci_low"), row.get("eval/accuracy_ci_high")
    return fmt(acc) if lo is None or hi is None else f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"


def pooled_change(pairs: list[tuple[float, int, float, int]]) -> tuple[float, float, float]:
    """Seed-pooled change of a proportion, first -> last, with a 95% normal-approximation CI.

    `pairs` holds (first, n_first, last, n_last) per seed. The two evals score the same
    problems, so treating them as independent samples makes the interval conservative."""
    n0 = sum(p[1] for p in pairs)
    n1 = sum(p[3] for p in pairs)
    p0 = sum(p[0] * p[1] for p in pairs) / n0
    p1 = sum(p[2] * p[3] for p in pairs) / n1
    half = 1.96 * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    return p1 - p0, p1 - p0 - half, p1 - p0 + half


def per_problem(run_dir: Path, step: int) -> list[float] | None:
    """The lenient 0/1 results of the run's eval at `step` (eval.jsonl), or None."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return None
    rows, bad = read_jsonl(path)  # any bytes: unreadable lines are left out, with a warning
    if bad:
        print(skipped_note(path, bad), file=sys.stderr)
    found = None
    for row in rows:
        lenient = row.get("lenient")
        if row["step"] == step and isinstance(lenient, list) and all(v in (0, 1) for v in lenient):
            found = lenient
    return found


def paired_against(out: Path, runs: dict, name: str, step: int, baseline: str = "grpo", seeds=None):
    """Seed-pooled exact McNemar of `name` against `baseline` at `step`: each seed's two runs
    answered the same held-out problems, so the pairs are (seed, problem); over `seeds`
    (default: those both have); None when a seed lacks either side."""
    base_all: list[float] = []
    new_all: list[float] = []
    if seeds is None:
        seeds = sorted(set(runs[name]) & set(runs.get(baseline, {})))
    for seed in seeds:
        a = per_problem(out / f"{baseline}-seed{seed}", step)
        b = per_problem(out / f"{name}-seed{seed}", step)
        if a is None or b is None or len(a) != len(b):
            return None
        base_all += a
        new_all += b
    return paired_comparison(base_all, new_all) if new_all else None


MECHANISM = (
    ("completions/clipped_ratio", "truncation"),
    ("completions/mean_length", "mean length"),
    ("cast/eos/neg_gap_share", "EOS g<0"),
    ("cast/content/neg_gap_share", "content g<0"),
    ("entropy", "entropy"),
)


def window_mean(seed_rows: dict[int, list[dict]], key: str, first: bool, k: int = 3) -> float | None:
    values = []
    for rows in seed_rows.values():
        _, v = series(rows, key)
        values += [float(x) for x in (v[:k] if first else v[-k:])]
    return sum(values) / len(values) if values else None


def first_drift(rows: list[dict]) -> int | None:
    return next((int(r["step"]) for r in rows if r.get("health/drift")), None)


def reward_window(rows: list[dict], first: bool, k: int) -> list[float]:
    _, rewards = series(rows, "reward")
    return [float(v) for v in (rewards[:k] if first else rewards[-k:])]


# --------------------------------------------------------------------------- the report


def oracle_label(seed_rows: dict[int, list[dict]]) -> str | None:
    """The label an oracle run's metrics lines carry (`teacher.oracle`), or None."""
    return next(
        (r["label"] for rows in seed_rows.values() for r in rows if str(r.get("label", "")).startswith("oracle")), None
    )


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


SHARED_CPU_FILE = "shared-cpu.txt"  # written by --shared-cpu: the report labels the times


def report(out: Path, wanted_steps: list[int] | None = None) -> str:
    """Markdown report of the runs in `out` (see the module docstring)."""
    runs = find_runs(out)
    if not runs:
        raise ValueError(f"{out}: no runs with metrics (folders named VARIANT-seedS)")
    curves = {name: mean_curve(seed_rows) for name, seed_rows in runs.items()}
    steps = table_steps([c for c in curves.values() if c], wanted_steps)
    lines = [f"# CAST vs GRPO: {out.name}", ""]
    seeds = sorted({s for seed_rows in runs.values() for s in seed_rows})
    lines += [
        f"Runs: {', '.join(runs)}; seeds {', '.join(map(str, seeds))}. "
        "Eval accuracy is `eval/accuracy` (greedy, lenient) on the held-out set, the mean "
        "over seeds (per-seed values in parentheses).",
        "",
    ]
    labelled = {name: oracle_label(seed_rows) for name, seed_rows in runs.items()}
    labelled = {name: label for name, label in labelled.items() if label}
    for name, label in labelled.items():
        lines += [f"**{name}: {label}.** Its teacher saw the gold answer: a bound, not a CAST result.", ""]

    lines += ["## Eval accuracy at fixed steps", ""]
    if steps:
        lines.append("| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for name, seed_rows in runs.items():
            cells = []
            for s in steps:
                per_seed = [eval_curve(rows).get(s) for _, rows in sorted(seed_rows.items())]
                mean = curves[name].get(s)
                cells.append(f"{fmt(mean)} ({', '.join(fmt(v, 2) for v in per_seed)})")
            shown = f"{name} ({ORACLE_LABEL})" if name in labelled else name
            lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    else:
        lines.append("No `eval/accuracy` in the runs' metrics (set `logging.eval_every` > 0).")
    lines.append("")

    lines += ["## First and last eval with 95% CIs", ""]
    lines += [
        "Per run: the first and the last eval with their bootstrap 95% CIs. Per variant: "
        "the change pooled over seeds, with a 95% normal-approximation CI that treats "
        "the two evals as independent samples (they share their problems, so it is "
        "conservative). Training reward: the mean sampled accuracy (the reward) of the "
        f"first and last {REWARD_WINDOW} steps, pooled over seeds.",
        "",
    ]
    lines.append("| run | first eval | last eval |")
    lines.append("|---|---|---|")
    for name, seed_rows in runs.items():
        for seed, rows in sorted(seed_rows.items()):
            pts = eval_points(rows)
            if pts:
                lines.append(
                    f"| {name}-seed{seed} | step {pts[0]['step']}: {with_ci(pts[0])} "
                    f"| step {pts[-1]['step']}: {with_ci(pts[-1])} |"
                )
    lines += [
        "",
        "| variant | eval change, seed-pooled [95% CI] | training reward, first "
        f"{REWARD_WINDOW} -> last {REWARD_WINDOW} steps |",
        "|---|---|---|",
    ]
    for name, seed_rows in runs.items():
        pairs = []
        for rows in seed_rows.values():
            pts = eval_points(rows)
            if len(pts) >= 2:
                n0, n1 = int(pts[0].get("eval/n", 0)), int(pts[-1].get("eval/n", 0))
                if n0 and n1:
                    pairs.append((pts[0]["eval/accuracy"], n0, pts[-1]["eval/accuracy"], n1))
        change = "—"
        if pairs:
            d, lo, hi = pooled_change(pairs)
            change = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        early = [v for rows in seed_rows.values() for v in reward_window(rows, True, REWARD_WINDOW)]
        late = [v for rows in seed_rows.values() for v in reward_window(rows, False, REWARD_WINDOW)]
        rew = "—" if not early else f"{sum(early) / len(early):.3f} -> {sum(late) / len(late):.3f}"
        lines.append(f"| {name} | {change} | {rew} |")
    lines.append("")

    lines += ["## Steps to reach GRPO's final accuracy", ""]
    grpo = curves.get("grpo") or {}
    if grpo:
        last = max(grpo)
        target = grpo[last]
        lines.append(f"GRPO's final seed-mean eval accuracy: {target:.3f} (step {last}).")
        lines.append("")
        lines.append("| variant | first eval step with seed-mean accuracy >= that |")
        lines.append("|---|---:|")
        for name, curve in curves.items():
            reached = steps_to_reach(curve, target)
            lines.append(f"| {name} | {'not reached' if reached is None else reached} |")
    else:
        lines.append("No GRPO eval curve: nothing to compare against.")
    lines.append("")

    lines += ["## Paired test against GRPO at the last common eval step", ""]
    if "grpo" in runs:
        lines += [
            "Per variant, its last eval step that GRPO has too (seed-mean curves), greedy lenient "
            "accuracy on the same held-out problems, pooled over the seeds both have (pairs: seed x "
            "problem). p: exact two-sided McNemar test on the discordant pairs; CI: 95% normal "
            "approximation of the paired difference.",
            "",
            "| variant | step | n pairs | only variant right | only GRPO right | difference [95% CI] | McNemar p |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for name in runs:
            common = set(curves.get(name) or {}) & set(curves.get("grpo") or {})
            if name == "grpo" or not common:
                continue
            step = max(common)
            pc = paired_against(out, runs, name, step)
            if pc is None:
                lines.append(f"| {name} | {step} | — | — | — | no per-problem results (eval.jsonl) | — |")
            else:
                lines.append(
                    f"| {name} | {step} | {pc.n} | {pc.only_new} | {pc.only_baseline} | "
                    f"{pc.difference:+.3f} [{pc.ci_low:+.3f}, {pc.ci_high:+.3f}] | {pc.p_value:.3g} |"
                )
        grpo_curve = curves.get("grpo") or {}
        if grpo_curve and max(grpo_curve):
            last = max(grpo_curve)
            lines += [
                "",
                f"Steps to GRPO's final seed-mean accuracy ({grpo_curve[last]:.3f} at step {last}) as a share "
                "of GRPO's steps (the target is <= 75%):",
                "",
            ]
            for name, curve in curves.items():
                reached = steps_to_reach(curve, grpo_curve[last])
                share = "not reached" if reached is None else f"step {reached}"
                if reached is not None and last:
                    share += f" = {reached / last:.0%}"
                lines.append(f"- {name}: {share}")
    else:
        lines.append("No GRPO runs or no common eval step.")
    lines.append("")

    lines += ["## Mechanism: first 3 vs last 3 training steps (seed-pooled means)", ""]
    lines.append("| variant | " + " | ".join(label for _, label in MECHANISM) + " | drift flagged (step, per seed) |")
    lines.append("|---|" + "---|" * (len(MECHANISM) + 1))
    for name, seed_rows in runs.items():
        cells = []
        for key, _ in MECHANISM:
            a, b = window_mean(seed_rows, key, True), window_mean(seed_rows, key, False)
            cells.append("—" if a is None or b is None else f"{a:.2f} -> {b:.2f}")
        drift = ", ".join(str(first_drift(rows) or "no") for _, rows in sorted(seed_rows.items()))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {drift} |")
    lines.append("")

    lines += ["## Wall time per step", ""]
    shared = out / SHARED_CPU_FILE
    if shared.is_file():
        lines += [
            f"**These runs shared the CPU** ({shared.read_text().strip()}), so the times below are not "
            "a clean measurement of any variant; compare step times from a quiet run "
            "(`scripts/bench_step.py`, `scripts/bench_peers.py`).",
            "",
        ]
    lines.append("| variant | mean `time/step` (s; without each run's first step) | ratio to GRPO | steps logged |")
    lines.append("|---|---:|---:|---:|")
    grpo_time = mean_step_time(runs["grpo"]) if "grpo" in runs else None
    for name, seed_rows in runs.items():
        t = mean_step_time(seed_rows)
        ratio = t / grpo_time if t is not None and grpo_time else None
        n_steps = sum(len(series(rows, "time/step")[0]) for rows in seed_rows.values())
        lines.append(f"| {name} | {fmt(t, 2)} | {fmt(ratio, 2)} | {n_steps} |")
    if "cast" in runs and grpo_time:
        cast_time = mean_step_time(runs["cast"])
        if cast_time is not None:
            lines += ["", f"CAST/GRPO step-time ratio: **{cast_time / grpo_time:.2f}**."]
    lines.append("")

    lines += ["## Commands", ""]
    record_path = out / COMMANDS_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        lines += ["The whole comparison:", "", "```", record["compare"], "```", "", "Each run:", "", "```"]
        lines += [f"{r['command']}  # exit {r['exit']}, {run_seconds(r)}" for r in record["runs"]]
        lines.append("```")
    else:
        lines.append(f"Not recorded ({COMMANDS_FILE} is missing from {out}).")
    lines += ["", "![learning curves](curves.png)", ""]
    return "\n".join(lines)


def run_seconds(r: dict) -> str:
    return "finished in an earlier invocation" if r.get("seconds") is None else f"{r['seconds']:.0f}s"


def write_outputs(out: Path, wanted_steps: list[int] | None) -> None:
    text = report(out, wanted_steps)
    (out / "report.md").write_text(text)
    run_dirs = [out / f"{name}-seed{seed}" for name, seed_rows in find_runs(out).items() for seed in sorted(seed_rows)]
    plot_runs(run_dirs, out / "curves.png")
    print(f"[compare] wrote {out / 'report.md'} and {out / 'curves.png'}")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python scripts/compare.py", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="recipes/smollm2-135m-arith.yaml")
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, help="schedule.steps of every run (default: the recipe's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override passed to every run (repeatable)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at the same time (each gets cores/jobs BLAS threads)"
    )
    p.add_argument("--rlsd", action="store_true", help="also run RLSD")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also run CAST without flips, with mixed groups only, with a fixed teacher",
    )
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME KEY=VALUE",
        help="also run a variant of your own: its name, then its overrides "
        "(repeatable), e.g. --variant cast-db1 algorithm.flip_deadband=1.0",
    )
    p.add_argument("--table-steps", type=int, nargs="+", help="eval steps shown in the table")
    p.add_argument(
        "--report-only", action="store_true", help="do not train: rewrite the report and plot from the runs in --out"
    )
    p.add_argument(
        "--shared-cpu",
        metavar="NOTE",
        help="label the runs in --out as having shared the CPU (kept in the folder; the report says so)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.steps is not None and args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_variants(args.variant, set(variants(args.rlsd, args.ablations)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failed = []
    if not args.report_only:
        if not Path(args.recipe).is_file():
            print(f"error: --recipe {args.recipe}: no such file", file=sys.stderr)
            return EXIT_USAGE
        bad = first_bad_recipe(args)
        if bad:
            print(f"error: {bad}", file=sys.stderr)
            return EXIT_USAGE
        argv = sys.argv[1:] if argv is None else list(argv)
        command = shlex.join(["python", "scripts/compare.py", *argv])
        failed = [r["run"] for r in run_all(args, command) if r["exit"] != 0]
    elif not out.is_dir():
        print(f"error: --out {out}: no such folder (nothing to report)", file=sys.stderr)
        return EXIT_USAGE
    if args.shared_cpu:
        out.mkdir(parents=True, exist_ok=True)
        (out / SHARED_CPU_FILE).write_text(args.shared_cpu.strip() + "\n")
    try:
        write_outputs(out, args.table_steps)
    except (ValueError, PlotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if failed:
        print(f"error: runs failed: {', '.join(failed)} (see {out / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

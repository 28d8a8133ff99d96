"""Seed-level paired comparison of the variants of a `scripts/compare.py` folder against a baseline.

    python scripts/seed_paired.py RUNS_DIR [--baseline grpo] [--step 24] [--mean-steps 12 24] [--json FILE]

A study's primary endpoint is at the seed level (seed variance is larger than the eval's
binomial error). For every variant other than the baseline, over the seeds both have
(folders `V-seedS`, `eval/accuracy` in metrics.jsonl):

- d_s = acc(variant, seed s) - acc(baseline, seed s) at `--step` (default: the last eval step
  every run has), their mean and two-sided 95% t-interval, mean ± t_{0.975,n-1}·sd/√n (none
  for one seed);
- the same for each seed's mean accuracy over the `--mean-steps` (a seed lacking one is left out);
- secondary: the exact McNemar test at `--step`, pooled over those seeds (pairs: seed x problem,
  the lenient results of eval.jsonl);
- both sides' seed means at the step.

Prints a markdown table; `--json FILE` writes every number. Bad input: `error: ...`, exit 2.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare import eval_curve, find_runs, paired_against  # noqa: E402

from cast_mlx.cli import EXIT_USAGE, OneLineParser  # noqa: E402


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 (exact; Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= 2 * j / (2 * j + 1) * c2
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= (2 * j - 1) / (2 * j) * c2
    return math.sin(theta) * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` critical value t_{(1+level)/2, df}, by bisection on the exact CDF."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of the 95% t-interval of the mean; no interval for fewer than 2 values."""
    if not values:
        return None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def seed_values(seed_rows: dict[int, list[dict]], steps: list[int]) -> dict[int, float]:
    """{seed: mean eval accuracy over `steps`} of the seeds that evaluated at all of them."""
    out = {}
    for seed, rows in seed_rows.items():
        curve = eval_curve(rows)
        if all(s in curve for s in steps):
            out[seed] = sum(curve[s] for s in steps) / len(steps)
    return out


def seed_differences(runs: dict, name: str, baseline: str, steps: list[int]) -> dict:
    """The paired endpoint of `name` against `baseline`: seeds both have at all `steps`, their
    values, the differences d (variant minus baseline) and their mean with its t-interval."""
    new, base = seed_values(runs[name], steps), seed_values(runs[baseline], steps)
    seeds = sorted(set(new) & set(base))
    d = [new[s] - base[s] for s in seeds]
    mean, low, high = t_interval(d)
    return {
        "steps": steps,
        "seeds": seeds,
        "d": d,
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "variant_mean": statistics.fmean(new[s] for s in seeds) if seeds else None,
        "baseline_mean": statistics.fmean(base[s] for s in seeds) if seeds else None,
    }


def pooled_mcnemar(out: Path, name: str, baseline: str, seeds: list[int], step: int) -> dict | None:
    """Exact McNemar at `step`, the per-problem results of `seeds` concatenated (baseline first);
    None when a seed lacks them on either side or its two lists differ in length."""
    pc = paired_against(out, {}, name, step, baseline, seeds=seeds)
    return None if pc is None else {"difference": pc.difference, "p_value": pc.p_value, "n": pc.n}


def is_oracle(seed_rows: dict[int, list[dict]]) -> bool:
    """Whether a run's metrics lines carry a `label` starting with "oracle"."""
    return any(
        isinstance(r.get("label"), str) and r["label"].startswith("oracle") for rows in seed_rows.values() for r in rows
    )


def analyse(out: Path, baseline: str, step: int | None, mean_steps: list[int] | None) -> dict:
    """Every number of the report; ValueError on unusable input."""
    if not out.is_dir():
        raise ValueError(f"{out}: no such folder")
    runs = find_runs(out)
    if not runs:
        raise ValueError(f"{out}: no runs with metrics (folders named VARIANT-seedS)")
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} has no runs in {out} (variants: {', '.join(runs)})")
    curves = [set(eval_curve(rows)) for seed_rows in runs.values() for rows in seed_rows.values()]
    if step is None:
        common = set.intersection(*curves)
        if not common:
            raise ValueError("the runs have no eval step in common; give --step")
        step = max(common)
    for s in [step, *(mean_steps or [])]:
        if not any(s in c for c in curves):
            raise ValueError(f"step {s}: no run has an eval (eval/accuracy) at that step")
    variants = {}
    for name, seed_rows in runs.items():
        if name == baseline:
            continue
        at_step = seed_differences(runs, name, baseline, [step])
        variants[name] = {
            "oracle": is_oracle(seed_rows),
            "step": at_step,
            "mean_steps": seed_differences(runs, name, baseline, mean_steps) if mean_steps else None,
            "mcnemar": pooled_mcnemar(out, name, baseline, at_step["seeds"], step),
        }
    return {"runs_dir": str(out), "baseline": baseline, "baseline_oracle": is_oracle(runs[baseline]),
            "step": step, "mean_steps": mean_steps, "variants": variants}  # fmt: skip


def fmt_endpoint(e: dict | None, with_n: bool = False) -> str:
    """`+0.040 [-0.010, +0.090]` (`+0.040 —` for one seed), with ` (n seeds)` if asked."""
    if e is None or e["mean"] is None:
        return "—"
    interval = "—" if e["ci_low"] is None else f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"
    return f"{e['mean']:+.3f} {interval}" + (f" (n {len(e['seeds'])})" if with_n else "")


def table(result: dict) -> str:
    base, step, ms = result["baseline"], result["step"], result["mean_steps"]
    oracle = " (oracle: not CAST)"
    ms_text = f"the mean of steps {', '.join(map(str, ms))}" if ms else "no --mean-steps"
    lines = [
        f"Seed-paired differences against {base}{oracle if result['baseline_oracle'] else ''} at step {step} "
        f"(d = variant - baseline eval accuracy per seed, mean [95% t-interval over seeds]; {ms_text}); "
        "secondary: exact McNemar pooled over seeds x problems.",
        "",
        f"| variant | seeds | d per seed | mean d [95% t-CI] | mean d over steps [95% t-CI] | McNemar diff, p "
        f"| variant / {base} mean |",
        "|---|---:|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        e = v["step"]
        per_seed = ", ".join(f"s{s} {d:+.3f}" for s, d in zip(e["seeds"], e["d"])) or "—"
        mc = v["mcnemar"]
        mc_text = "—" if mc is None else f"{mc['difference']:+.3f}, p {mc['p_value']:.3g} (n {mc['n']})"
        means = "—" if not e["seeds"] else f"{e['variant_mean']:.3f} / {e['baseline_mean']:.3f}"
        label = name + (oracle if v["oracle"] else "")
        lines.append(
            f"| {label} | {len(e['seeds'])} | {per_seed} | {fmt_endpoint(e)} | {fmt_endpoint(v['mean_steps'], True)} "
            f"| {mc_text} | {means} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python scripts/seed_paired.py", description=__doc__.split("\n")[0])
    p.add_argument("runs_dir", help="a scripts/compare.py output folder (VARIANT-seedS run folders)")
    p.add_argument("--baseline", default="grpo")
    p.add_argument("--step", type=int, help="the eval step of the endpoint (default: the last one all runs have)")
    p.add_argument("--mean-steps", type=int, nargs="+", help="eval steps whose mean accuracy is a second endpoint")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = p.parse_args(argv)
    try:
        result = analyse(Path(args.runs_dir), args.baseline, args.step, args.mean_steps)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as exc:
            print(f"error: --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

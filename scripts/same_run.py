"""Did two runs of a recipe do exactly the same thing? Compares two run folders: every
metrics line of the steps both logged (wall times, throughput and memory left out, and the
`eval/cached` flag), eval.jsonl's per-problem results where both evaluated, and the sha256
of every tensor file of each checkpoint both wrote. Prints one JSON line; exits 1 on any
difference (2 on unusable input).

    python scripts/same_run.py runs/before runs/after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

VARYING = ("time/", "tokens_per_s/", "memory/", "eval/cached")  # differ between identical runs
TENSORS = ("adapters.safetensors", "optimizer.safetensors", "teacher.safetensors")


def lines(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r for r in rows}


def compare(a: Path, b: Path) -> dict:
    ma, mb = lines(a / "metrics.jsonl"), lines(b / "metrics.jsonl")
    steps = sorted(set(ma) & set(mb))
    differing = {}
    for s in steps:
        keys = {k for k in set(ma[s]) | set(mb[s]) if not k.startswith(VARYING)}
        if ma[s].get("eval/accuracy") is None or mb[s].get("eval/accuracy") is None:
            keys = {k for k in keys if not k.startswith("eval/")}  # only one of them evaluated
        diff = sorted(k for k in keys if ma[s].get(k) != mb[s].get(k))
        if diff:
            differing[s] = diff
    ea, eb = lines(a / "eval.jsonl"), lines(b / "eval.jsonl")
    eval_steps = sorted(set(ea) & set(eb))
    eval_differing = [s for s in eval_steps if ea[s] != eb[s]]
    checkpoints = {}
    names = {p.name for p in (a / "checkpoints").glob("step_*")} & {p.name for p in (b / "checkpoints").glob("step_*")}
    for name in sorted(names):
        for f in TENSORS:
            fa, fb = a / "checkpoints" / name / f, b / "checkpoints" / name / f
            if fa.is_file() and fb.is_file():
                ha, hb = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (fa, fb))
                checkpoints[f"{name}/{f}"] = ha if ha == hb else f"differs: {ha[:16]} vs {hb[:16]}"
    same_tensors = all(not v.startswith("differs") for v in checkpoints.values())
    return {
        "steps_compared": steps,
        "metric_lines_differing": differing,
        "eval_steps_compared": eval_steps,
        "eval_steps_differing": eval_differing,
        "checkpoint_sha256": checkpoints,
        "identical": bool(steps) and not differing and not eval_differing and same_tensors,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "metrics.jsonl").is_file():
            print(f"error: {run}: no metrics.jsonl", file=sys.stderr)
            return 2
    result = compare(args.run_a, args.run_b)
    print(json.dumps(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

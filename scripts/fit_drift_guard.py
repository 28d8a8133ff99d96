"""Where the length-drift guard (`cast_mlx.training.metrics.length_drift`) fires on the committed runs.

`python scripts/fit_drift_guard.py [--window 3] [--rise 0.2]` reads every
`docs/runs/**/metrics.jsonl`, calls a run *drifting* when its truncation rate rose by more
than 0.3 from its first to its last step, and prints one JSON line: how many drifting runs
the rule flags (and at which steps) and which other runs it flags (false alarms). The
recipe defaults (`system.drift_window`, `system.drift_rise`) were chosen with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cast_mlx.training.metrics import length_drift

ROOT = Path(__file__).resolve().parents[1]


def first_firing(lines: list[dict], window: int, rise: float) -> int | None:
    history = []
    for m in lines:
        history.append([m["completions/clipped_ratio"], m["reward"]])
        if length_drift(history, window, rise):
            return m["step"]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--rise", type=float, default=0.2)
    args = p.parse_args()
    drifting, others = {}, {}
    for path in sorted((ROOT / "docs" / "runs").glob("**/metrics.jsonl")):
        if "layout-check" in path.parts:  # repeats of one default run, kept to check determinism
            continue
        lines = [m for m in map(json.loads, path.read_text().splitlines()) if "reward" in m]
        name = str(path.parent.relative_to(ROOT / "docs" / "runs"))
        rose = lines[-1]["completions/clipped_ratio"] - lines[0]["completions/clipped_ratio"] > 0.3
        (drifting if rose else others)[name] = first_firing(lines, args.window, args.rise)
    print(
        json.dumps(
            {
                "window": args.window,
                "rise": args.rise,
                "drifting_runs": len(drifting),
                "drifting_flagged": sum(s is not None for s in drifting.values()),
                "flagged_at_steps": sorted(s for s in drifting.values() if s is not None),
                "missed": [n for n, s in drifting.items() if s is None],
                "other_runs": len(others),
                "false_alarms": {n: s for n, s in others.items() if s is not None},
            }
        )
    )


if __name__ == "__main__":
    main()

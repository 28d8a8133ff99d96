"""Learning curves of one or more training runs, side by side in one PNG.

`python -m cast_mlx.plot RUN_DIR [RUN_DIR ...] -o curves.png`

Four panels against the optimizer step, one colour per run (named after its folder, in
one legend for the whole figure); inside a panel the line style says which series it is,
and the panel title spells that out, so no legend hunt is needed:

- reward: the per-step mean reward (thin) and its trailing rolling mean (thick);
- eval accuracy: `eval/accuracy` (lenient, solid) and `eval/accuracy_strict` (dashed: the
  answer in the format the prompt asks for, `####` or `\\boxed{}`; a run evaluates only then);
- group mix: the share of groups that are mixed (solid), all correct (dashed), all
  wrong (dotted): only mixed groups carry a GRPO signal;
- flip shares: the share of tokens whose advantage sign CAST flips down (solid) or up
  (dashed); empty for GRPO.

A run dir must hold a `metrics.jsonl` (written by `cast_mlx.train`) with at least one
readable line; lines that are not UTF-8 JSON objects with an integer `step` (a torn write,
a damaged disk) are skipped, and the command line says how many with a `warning:`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

METRICS = "metrics.jsonl"
ROLLING = 10  # steps in the reward's rolling mean

# (title, y label, [(metric key, line style, series name)])
PANELS = [
    ("reward (thin: per step, thick: rolling mean)", "mean reward", [("reward", "-", "reward")]),
    (
        "eval accuracy (solid: lenient, dashed: strict, in the format the prompt asks for)",
        "accuracy",
        [("eval/accuracy", "-", "lenient"), ("eval/accuracy_strict", "--", "strict")],
    ),
    (
        "group mix (solid: mixed, dashed: all correct, dotted: all wrong)",
        "share of groups",
        [
            ("cast/groups/mixed", "-", "mixed"),
            ("cast/groups/all_correct", "--", "all correct"),
            ("cast/groups/all_wrong", ":", "all wrong"),
        ],
    ),
    (
        "CAST flip shares (solid: down, dashed: up)",
        "share of tokens",
        [("cast/flip/down_share", "-", "down"), ("cast/flip/up_share", "--", "up")],
    ),
]


class PlotError(ValueError):
    """A run dir cannot be plotted; the message names it."""


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of the lines of `path` that have an integer `step`, and the
    (1-based) numbers of the non-blank lines that do not (not UTF-8, not JSON, not an
    object, no integer step). Reads bytes: any file content is fine."""
    rows, bad = [], []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            rows.append(row)
        else:
            bad.append(n)
    return rows, bad


def skipped_note(path: Path, bad: list[int]) -> str:
    """`warning: PATH: skipped N unreadable line(s) (line K, ...)`."""
    shown = ", ".join(map(str, bad[:3])) + (", ..." if len(bad) > 3 else "")
    return f"warning: {path}: skipped {len(bad)} unreadable line(s) (line {shown}: a torn write or a damaged file?)"


def read_metrics(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The lines of `RUN_DIR/metrics.jsonl` (see `read_jsonl`). Lines that do not parse (e.g.
    one being written right now) are skipped, and `warn` hears how many; a missing file
    or one without any readable line is a PlotError naming it."""
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise PlotError(f"{run_dir}: no such run dir")
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS} (not a training run dir?)")
    try:
        rows, bad = read_jsonl(path)
    except OSError as exc:
        raise PlotError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not rows:
        if bad:
            raise PlotError(f"{path}: no readable metrics line (line {bad[0]} is not a JSON object with a step)")
        raise PlotError(f"{run_dir}: {METRICS} has no metrics lines yet")
    if bad and warn is not None:
        warn(skipped_note(path, bad))
    return rows


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a numeric `key` (eval keys appear only every
    `eval_every` steps; a resumed run may repeat a step: the last line wins). A value too
    large for a float counts as missing."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                by_step[row["step"]] = float(value)
            except OverflowError:
                continue
    steps = sorted(by_step)
    return np.array(steps, dtype=float), np.array([by_step[s] for s in steps], dtype=float)


def rolling_mean(values: np.ndarray, window: int = ROLLING) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def run_name(run_dir: str | Path) -> str:
    return Path(run_dir).resolve().name


def plot_runs(
    run_dirs: list[str | Path],
    out: str | Path,
    width: float = 12.0,
    height: float = 8.0,
    dpi: int = 100,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write the 2x2 panel figure of `run_dirs` to `out` (PNG of `width*dpi` x
    `height*dpi` pixels). Raises PlotError naming the first run dir that has no metrics;
    `warn` hears about skipped lines."""
    runs = [(run_name(d), read_metrics(d, warn)) for d in run_dirs]  # check all before plotting

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(width, height), dpi=dpi)
    handles = []
    for (title, ylabel, keys), ax in zip(PANELS, axes.flat):
        drawn = False
        for i, (_name, rows) in enumerate(runs):
            color = colors[i % len(colors)]
            for key, style, _ in keys:
                steps, values = series(rows, key)
                if len(steps) == 0:
                    continue
                drawn = True
                if key == "reward":
                    ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.35)
                    values = rolling_mean(values)
                marker = "o" if key.startswith("eval/") and len(steps) < 30 else None
                ax.plot(steps, values, color=color, linestyle=style, linewidth=1.8, marker=marker, markersize=3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if keys[0][0].startswith("cast/flip/"):
            ax.set_ylim(bottom=0)  # flip shares are small: let them fill the panel
        else:
            ax.set_ylim(-0.03, 1.03)  # rewards and accuracies are in [0, 1]
        ax.grid(alpha=0.3)
    for i, (name, _) in enumerate(runs):
        handles.append(plt.Line2D([], [], color=colors[i % len(colors)], linewidth=2.5, label=name))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 6), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out

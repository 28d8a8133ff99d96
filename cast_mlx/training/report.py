"""One self-contained HTML page about one training run, from its folder's files only.

`python -m cast_mlx.report RUN_DIR [--out FILE] [--samples-per-step N]`

The page (default `RUN_DIR/report.html`) needs no model, no MLX, no server and no network:
its learning curves are inline PNGs (`data:` URIs), its CSS is inline, and it has no
script. It holds

- a header: run, algorithm, model, task, steps done, wall time (the sum of `time/step`),
  from `metrics.jsonl` and the newest checkpoint's `recipe.yaml` (`checkpoints/latest`
  names it; a run without checkpoints just says "not recorded");
- learning curves, one image per panel: reward, eval accuracy with its confidence band,
  completion length and truncation rate, group mix, CAST's gap shares, step-time split.
  A panel whose metrics appear in no line is left out (the gap shares also when they are
  all zero, as GRPO logs them);
- the eval table: every eval step with accuracy, CI, strict accuracy (`data.strict_label`) and n;
- sampled completions from `samples.jsonl`, up to N per step, one `<details>` per step.

`write_report(run_dir)` is the library call (the trainer makes one at the end of a run).
A missing run dir or `metrics.jsonl`, or one without a readable line, is a `PlotError`,
one `error: ...` line naming the file and exit 2 on the command line. Lines of
`metrics.jsonl` or `samples.jsonl` that do not parse (a torn write, a damaged file: any
bytes) are skipped with a `warning:` line each file; a damaged `recipe.yaml` or
`checkpoints/latest` only costs the header its recipe.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeGuard

import numpy as np

from cast_mlx.config import ORACLE_LABEL
from cast_mlx.tasks.data import strict_label
from cast_mlx.training.plot import METRICS, read_jsonl, read_metrics, rolling_mean, series, skipped_note

SAMPLES = "samples.jsonl"
REPORT = "report.html"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # the file in checkpoints/ that names the newest checkpoint (checkpoint.LATEST)
PANEL_SIZE = (6.4, 3.4)  # inches
PANEL_DPI = 100
NOT_RECORDED = "not recorded"

GAP_KEYS = ("cast/flip/down_share", "cast/flip/up_share", "cast/eos/neg_gap_share", "cast/content/neg_gap_share")
TIME_KEYS = ("time/sample", "time/verify", "time/teacher", "time/update")


# --------------------------------------------------------------------------- panels


def _draw_reward(ax, rows: list[dict]) -> None:
    steps, values = series(rows, "reward")
    ax.plot(steps, values, color="C0", linewidth=0.8, alpha=0.35, label="per step")
    ax.plot(steps, rolling_mean(values), color="C0", linewidth=2.0, label="rolling mean")


def _draw_eval(ax, rows: list[dict], strict: str | None = "strict") -> None:
    by_step: dict[float, tuple[float, float]] = {}
    lo_steps, lo = series(rows, "eval/accuracy_ci_low")
    hi_steps, hi = series(rows, "eval/accuracy_ci_high")
    highs = dict(zip(hi_steps.tolist(), hi.tolist()))
    for s, v in zip(lo_steps.tolist(), lo.tolist()):
        if s in highs:
            by_step[s] = (v, highs[s])
    if by_step:
        band = sorted(by_step)
        ax.fill_between(
            band, [by_step[s][0] for s in band], [by_step[s][1] for s in band], color="C0", alpha=0.2, label="95% CI"
        )
    steps, values = series(rows, "eval/accuracy")
    ax.plot(steps, values, color="C0", linewidth=1.8, marker="o" if len(steps) < 30 else None, ms=3, label="lenient")
    steps, values = series(rows, "eval/accuracy_strict")
    if len(steps) and strict is not None:
        ax.plot(steps, values, color="C1", linestyle="--", linewidth=1.4, label=strict)


def _draw_length(ax, rows: list[dict]) -> None:
    steps, values = series(rows, "completions/mean_length")
    handles = []
    if len(steps):
        handles += ax.plot(steps, values, color="C0", linewidth=1.6, label="mean length (tokens)")
    ax.set_ylabel("tokens")
    steps, values = series(rows, "completions/clipped_ratio")
    if len(steps):
        right = ax.twinx()
        handles += right.plot(steps, values, color="C3", linestyle="--", linewidth=1.4, label="truncated share")
        right.set_ylim(-0.03, 1.03)
        right.set_ylabel("truncated share")
    ax.legend(handles=handles, fontsize=8, loc="upper left")


def _draw_lines(specs: list[tuple[str, str, str]]) -> Callable[[Any, list[dict]], None]:
    def draw(ax, rows: list[dict]) -> None:
        for key, style, label in specs:
            steps, values = series(rows, key)
            if len(steps):
                ax.plot(steps, values, linestyle=style, linewidth=1.6, label=label)

    return draw


def _draw_time(ax, rows: list[dict]) -> None:
    parts = [(key, dict(zip(*(a.tolist() for a in series(rows, key))))) for key in TIME_KEYS]
    parts = [(key, values) for key, values in parts if values]
    steps = sorted(set().union(*(values for _, values in parts))) if parts else []
    if steps:
        ax.stackplot(
            steps,
            [[values.get(s, 0.0) for s in steps] for _, values in parts],
            labels=[key.split("/", 1)[1] for key, _ in parts],
            alpha=0.8,
        )
    total_steps, total = series(rows, "time/step")
    if len(total_steps):
        ax.plot(total_steps, total, color="black", linewidth=1.0, linestyle=":", label="whole step")


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    keys: tuple[str, ...]  # the panel is drawn when one of these has a value in some line
    draw: Callable[[Any, list[dict]], None]
    unit_range: bool = False  # y in [0, 1]
    nonzero: bool = False  # ... and left out when every value is 0 too
    legend: bool = True


PANELS = [
    Panel("reward (thin: per step, thick: rolling mean)", "mean reward", ("reward",), _draw_reward),
    Panel("eval accuracy (band: 95% CI)", "accuracy", ("eval/accuracy",), _draw_eval, unit_range=True),
    Panel(
        "completion length and truncation rate",
        "tokens",
        ("completions/mean_length", "completions/clipped_ratio"),
        _draw_length,
        legend=False,
    ),
    Panel(
        "group mix (only mixed groups carry a GRPO signal)",
        "share of groups",
        ("cast/groups/mixed", "cast/groups/all_correct", "cast/groups/all_wrong"),
        _draw_lines(
            [
                ("cast/groups/mixed", "-", "mixed"),
                ("cast/groups/all_correct", "--", "all correct"),
                ("cast/groups/all_wrong", ":", "all wrong"),
            ]  # fmt: skip
        ),
        unit_range=True,
    ),
    Panel(
        "CAST gap shares",
        "share",
        GAP_KEYS,
        _draw_lines(
            [
                ("cast/flip/down_share", "-", "flipped down"),
                ("cast/flip/up_share", "--", "flipped up"),
                ("cast/eos/neg_gap_share", "-.", "EOS with g < 0"),
                ("cast/content/neg_gap_share", ":", "content with g < 0"),
            ]  # fmt: skip
        ),
        nonzero=True,
    ),
    Panel("step time split", "seconds", (*TIME_KEYS, "time/step"), _draw_time),
]


def has_data(rows: list[dict], panel: Panel) -> bool:
    """Whether `panel` has something to draw from `rows`."""
    for key in panel.keys:
        _, values = series(rows, key)
        values = values[np.isfinite(values)]
        if len(values) and (not panel.nonzero or np.any(values != 0)):
            return True
    return False


def panel_pngs(rows: list[dict], panels: list[Panel] | None = None) -> list[tuple[Panel, bytes]]:
    """(panel, PNG bytes) of each of `panels` (default PANELS) that has data in `rows`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for panel in PANELS if panels is None else panels:
        if not has_data(rows, panel):
            continue
        fig, ax = plt.subplots(figsize=PANEL_SIZE, dpi=PANEL_DPI)
        try:
            panel.draw(ax, rows)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(panel.ylabel)
            if panel.unit_range:
                ax.set_ylim(-0.03, 1.03)
            elif panel.nonzero:
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if panel.legend:
                ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=PANEL_DPI, metadata={"Software": None})
        finally:
            plt.close(fig)
        out.append((panel, buf.getvalue()))
    return out


# --------------------------------------------------------------------------- run files


def read_recipe(run_dir: Path) -> dict:
    """The newest checkpoint's `recipe.yaml` as a dict (`checkpoints/latest` first, else the
    highest `step_*`); {} when there is none or it does not parse."""
    import yaml

    root = Path(run_dir) / CHECKPOINTS
    candidates = []
    pointer = root / LATEST
    try:
        if pointer.is_file():
            candidates.append(root / pointer.read_bytes().decode("utf-8").strip())
    except (OSError, ValueError):  # a damaged pointer: the folders themselves remain
        pass
    try:
        candidates += sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    except OSError:
        return {}
    for ckpt in candidates:
        try:
            recipe = yaml.safe_load((ckpt / "recipe.yaml").read_bytes().decode("utf-8"))
        except (OSError, yaml.YAMLError, ValueError, RecursionError):
            continue
        if isinstance(recipe, dict):
            return recipe
    return {}


def read_samples(run_dir: Path, per_step: int, warn: Callable[[str], None] | None = None) -> dict[int, list[dict]]:
    """Up to `per_step` lines of `samples.jsonl` per step, by step (lines that do not parse
    or have no integer step are skipped, and `warn` hears how many; no file or one that
    cannot be read: {})."""
    path = Path(run_dir) / SAMPLES
    groups: dict[int, list[dict]] = {}
    if per_step <= 0 or not path.is_file():
        return groups
    try:
        rows, bad = read_jsonl(path)
    except OSError as exc:
        if warn is not None:
            warn(f"warning: {path}: cannot be read ({exc.strerror or exc}); no samples shown")
        return groups
    if bad and warn is not None:
        warn(skipped_note(path, bad))
    for row in rows:
        group = groups.setdefault(row["step"], [])
        if len(group) < per_step:
            group.append(row)
    return dict(sorted(groups.items()))


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d


def _is_num(v: Any) -> TypeGuard[float]:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _fmt(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if _is_num(v) else "—"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return NOT_RECORDED
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _by_step(rows: list[dict], key: str) -> dict[int, dict]:
    """The last line of each step that has a numeric `key`."""
    out = {}
    for row in rows:
        if _is_num(row.get(key)):
            out[row["step"]] = row
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- HTML

# The page loads nothing and runs nothing: inline styles and data: images only.
CSP = (
    '<meta http-equiv="Content-Security-Policy" '
    "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.3em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.eval td { text-align: right; font-variant-numeric: tabular-nums; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.8em; }
.panels img { width: 100%; height: auto; border: 1px solid #e3e3e3; }
details { margin: 0.3em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.6em; }
summary { cursor: pointer; font-weight: 600; }
.sample { display: grid; grid-template-columns: 7em 1fr; gap: 0.15em 0.6em; align-items: baseline;
  border-left: 4px solid #c0392b; margin: 0.6em 0; padding: 0.4em 0.7em; background: #fafafa; }
.sample[data-correct="1"] { border-left-color: #27ae60; }
.sample .meta { font-size: 0.9em; color: #555; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.9em; }
.note { color: #666; font-size: 0.9em; }
"""


def _header(run_dir: Path, rows: list[dict], recipe: dict) -> str:
    train = [r for r in rows if r.get("step", 0) > 0 and ("time/step" in r or "reward" in r)]
    steps_done = max((r["step"] for r in train), default=0)
    planned = _get(recipe, "schedule.steps")
    _, step_times = series(rows, "time/step")
    _, eval_times = series(rows, "time/eval")
    evals = _by_step(rows, "eval/accuracy")
    folder = Path(run_dir).resolve().name
    name = _get(recipe, "name")
    items = [
        ("run", folder if not name or name == folder else f"{name} (folder {folder})"),
        ("algorithm", _get(recipe, "algorithm.name") or NOT_RECORDED),
        ("model", _get(recipe, "model.name") or NOT_RECORDED),
        ("task", _get(recipe, "data.task") or NOT_RECORDED),
        ("seed", _get(recipe, "seed") if _get(recipe, "seed") is not None else NOT_RECORDED),
        ("steps done", f"{steps_done} of {planned}" if _is_num(planned) else str(steps_done)),
        ("wall time (sum of time/step)", _duration(float(np.nansum(step_times))) if len(step_times) else NOT_RECORDED),
    ]
    if len(eval_times):
        items.append(("eval time (sum of time/eval)", _duration(float(np.nansum(eval_times)))))
    if evals:
        step, last = list(evals.items())[-1]
        ci = ""
        if _is_num(last.get("eval/accuracy_ci_low")) and _is_num(last.get("eval/accuracy_ci_high")):
            ci = f" [{last['eval/accuracy_ci_low']:.3f}, {last['eval/accuracy_ci_high']:.3f}]"
        items.append(("last eval accuracy", f"{last['eval/accuracy']:.3f}{ci} at step {step}"))
    if not recipe:
        items.append(("recipe", f"{NOT_RECORDED} (no {CHECKPOINTS}/*/recipe.yaml)"))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    out = f"<h1>{html.escape(str(name or folder))}</h1>\n"
    if _get(recipe, "teacher.oracle"):
        what = "the teacher saw the gold answer; a diagnostic bound"
        out += f'<p class="label"><b>{html.escape(ORACLE_LABEL)}</b>: {what}.</p>\n'
    out += f'<table class="header">{body}</table>\n'
    if recipe:
        import yaml

        text = yaml.safe_dump(recipe, sort_keys=False)
        out += f"<details><summary>recipe.yaml</summary><pre>{html.escape(text)}</pre></details>\n"
    return out


def _curves(rows: list[dict], strict: str | None) -> str:
    panels = [replace(p, draw=partial(_draw_eval, strict=strict)) if p.draw is _draw_eval else p for p in PANELS]
    images = []
    for panel, png in panel_pngs(rows, panels):
        data = base64.b64encode(png).decode("ascii")
        images.append(f'<img alt="{html.escape(panel.title)}" src="data:image/png;base64,{data}">')
    if not images:
        return '<h2>Learning curves</h2>\n<p class="note">no curves: no metric has data yet</p>\n'
    return '<h2>Learning curves</h2>\n<div class="panels">\n' + "\n".join(images) + "\n</div>\n"


def _eval_table(rows: list[dict], strict: str | None) -> str:
    evals = _by_step(rows, "eval/accuracy")
    if not evals:
        return '<h2>Evaluations</h2>\n<p class="note">no evaluation in this run</p>\n'
    lines = []
    for step, row in evals.items():
        lo, hi = row.get("eval/accuracy_ci_low"), row.get("eval/accuracy_ci_high")
        ci = f"[{lo:.3f}, {hi:.3f}]" if _is_num(lo) and _is_num(hi) else "—"
        n = row.get("eval/n")
        n_text = _fmt(n, "d") if isinstance(n, int) else _fmt(n, ".0f")
        strict_cell = "" if strict is None else f"<td>{_fmt(row.get('eval/accuracy_strict'))}</td>"
        lines.append(
            f'<tr class="eval-row"><td>{step}</td><td>{_fmt(row["eval/accuracy"])}</td><td>{ci}</td>'
            f"{strict_cell}<td>{n_text}</td></tr>"
        )
    strict_head = "" if strict is None else f"<th>accuracy, {html.escape(strict)}</th>"
    head = f"<tr><th>step</th><th>accuracy</th><th>95% CI</th>{strict_head}<th>n</th></tr>"
    return f'<h2>Evaluations</h2>\n<table class="eval">{head}\n' + "\n".join(lines) + "\n</table>\n"


def _text(v: Any) -> str:
    return html.escape(v if isinstance(v, str) else json.dumps(v))


def _samples(groups: dict[int, list[dict]], per_step: int, have_file: bool) -> str:
    out = "<h2>Sampled completions</h2>\n"
    if not groups:
        if per_step <= 0:
            why = "none asked for (samples per step: 0)"
        else:
            why = f"no lines in {SAMPLES}" if have_file else f"no {SAMPLES} in the run dir"
        return out + f'<p class="note">{why}</p>\n'
    out += f'<p class="note">up to {per_step} per step, as the trainer logged them; green: reward &gt; 0</p>\n'
    last = list(groups)[-1]
    for step, samples in groups.items():
        rewards = [s["reward"] for s in samples if _is_num(s.get("reward"))]
        mean = f", mean reward {np.mean(rewards):.2f}" if rewards else ""
        parts = [
            f"<details{' open' if step == last else ''}><summary>step {step}: {len(samples)} sample(s){mean}</summary>"
        ]
        for s in samples:
            reward = s.get("reward")
            correct = "1" if _is_num(reward) and reward > 0 else "0"
            parts.append(
                f'<div class="sample" data-correct="{correct}">'
                f"<b>problem</b><pre>{_text(s.get('problem', ''))}</pre>"
                f"<b>gold</b><pre>{_text(s.get('gold', ''))}</pre>"
                f"<b>completion</b><pre>{_text(s.get('completion', ''))}</pre>"
                f'<b>result</b><span class="meta">reward {_fmt(reward, ".3g")} · '
                f"finish {_text(s.get('finish', '—'))}</span>"
                "</div>"
            )
        parts.append("</details>")
        out += "\n".join(parts) + "\n"
    return out


def render(run_dir: Path, samples_per_step: int = 2, warn: Callable[[str], None] | None = None) -> str:
    """The report page of `run_dir` as a string (PlotError: no metrics); `warn` hears about
    skipped lines."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir, warn)
    recipe = read_recipe(run_dir)
    groups = read_samples(run_dir, samples_per_step, warn)
    title = html.escape(str(_get(recipe, "name") or Path(run_dir).resolve().name))
    strict = strict_label(_get(recipe, "data.answer_format"))
    written = datetime.datetime.now().isoformat(timespec="seconds")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{CSP}\n'
        f"<title>{title}: cast-mlx report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n"
        + _header(run_dir, rows, recipe)
        + _curves(rows, strict)
        + _eval_table(rows, strict)
        + _samples(groups, samples_per_step, (run_dir / SAMPLES).is_file())
        + f'<p class="note">written {written} by cast_mlx.report from {METRICS}'
        + (f" and {SAMPLES}" if groups else "")
        + "</p>\n</body>\n</html>\n"
    )


def write_report(
    run_dir: Path, out: Path | None = None, samples_per_step: int = 2, warn: Callable[[str], None] | None = None
) -> Path:
    """Write the report page of `run_dir` to `out` (default `RUN_DIR/report.html`), atomically;
    returns the path. PlotError when the run dir or its metrics are missing or unreadable;
    `warn` hears about skipped lines. A write that fails (OSError: a full disk) leaves an
    earlier page as it was and no temp file."""
    run_dir = Path(run_dir)
    text = render(run_dir, samples_per_step, warn)
    out = Path(out) if out is not None else run_dir / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

"""The end of a run: the summary it prints and the report page it writes.

`summary_lines` reads what the run folder holds (eval.jsonl's per-problem results, the
checkpoints), so a resumed run's summary covers the whole run, not just this invocation.
"""

from __future__ import annotations

import json
from pathlib import Path

from cast_mlx import config as cfg
from cast_mlx.errors import disk_full
from cast_mlx.training import callbacks as cb
from cast_mlx.training import checkpoint as ckpt_io
from cast_mlx.training.model_card import CARD, latest_checkpoint, model_folder, use_commands, write_card


def write_run_report(run_dir: Path) -> Path | None:
    """The run's HTML report page (`cast_mlx.report`), and the model card in its last
    checkpoint (`write_run_card`); a failure there costs only the page (one warning line; a
    full disk's names the page and the free space)."""
    write_run_card(run_dir)
    try:
        from cast_mlx.training.report import write_report

        return write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's own files are already safe
        full = disk_full(exc, Path(run_dir) / "report.html", "the report page")  # report.REPORT
        why = str(full) if full is not None else f"{type(exc).__name__}: {exc}"
        print(f"warning: the report page could not be written ({why}); {REPORT_LATER.format(run_dir=run_dir)}")
        return None


REPORT_LATER = "the checkpoints are safe; write it later with python -m cast_mlx.report {run_dir}"


def write_run_card(run_dir: Path) -> Path | None:
    """The model card (README.md) in the run's last checkpoint, which makes it an mlx-lm
    adapter folder with its card (`model_card`); a failure costs only the card (a warning)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        return write_card(run_dir, ckpt)
    except Exception as exc:  # noqa: BLE001 - the checkpoint itself is already safe
        full = disk_full(exc, ckpt / CARD, "the model card")
        why = str(full) if full is not None else f"{type(exc).__name__}: {exc}"
        print(f"warning: the model card could not be written ({why}); the checkpoints are safe")
        return None


def read_evals(run_dir: Path) -> list[dict]:
    """The per-problem eval lines of eval.jsonl (the last line of a repeated step wins);
    lines without a non-empty list of 0/1 `lenient` results (a damaged file) are left out."""
    path = Path(run_dir) / cb.EVAL_FILE
    if not path.is_file():
        return []
    keep, _ = cb.kept_lines(path.read_text(errors="replace"), 2**62)
    by_step = {int(row["step"]): row for row in map(json.loads, keep) if _results(row.get("lenient"))}
    return [by_step[s] for s in sorted(by_step)]


def _results(values) -> bool:
    return isinstance(values, list) and bool(values) and all(v in (0, 1) for v in values)


def best_saved_eval(run_dir: Path) -> float:
    """The best eval accuracy among the steps that still have a checkpoint (-1: none)."""
    root = ckpt_io.checkpoint_root(run_dir)
    return max(
        (
            sum(e["lenient"]) / len(e["lenient"])
            for e in read_evals(run_dir)
            if (root / f"step_{e['step']:06d}").is_dir()
        ),
        default=-1.0,
    )


def summary_lines(
    recipe: cfg.Recipe, out_dir: Path, step: int, seconds: float, last: Path | None, report: Path | None
) -> list[str]:
    """The end-of-run summary: steps and time, the eval first -> last with the paired test of
    `cast_mlx.eval --baseline` (same problems), the best and last checkpoints, and the
    commands that use them."""
    from cast_mlx.training.eval_stats import paired_comparison

    r = recipe
    minutes, secs = divmod(int(seconds), 60)
    label = cfg.run_label(r)
    lines = [
        f"summary: step {step} of {r.schedule.steps}, {minutes}:{secs:02d} in this run"
        + (f" ({label})" if label else "")
    ]
    evals = read_evals(out_dir)
    if len(evals) >= 2:
        first, final = evals[0], evals[-1]
        pc = paired_comparison(first["lenient"], final["lenient"])
        acc0, acc1 = sum(first["lenient"]) / pc.n, sum(final["lenient"]) / pc.n
        lines.append(
            f"  eval accuracy {acc0:.3f} (step {first['step']}) -> {acc1:.3f} (step {final['step']}): "
            f"{pc.difference:+.3f} [95% CI {pc.ci_low:+.3f}, {pc.ci_high:+.3f}], McNemar p = {pc.p_value:.3g} "
            f"({pc.n} problems, {pc.only_new} newly right, {pc.only_baseline} newly wrong)"
        )
    elif evals:
        lines.append(
            f"  eval accuracy {sum(evals[0]['lenient']) / len(evals[0]['lenient']):.3f} (step {evals[0]['step']})"
        )
    best = ckpt_io.best_checkpoint(out_dir)
    if last is not None:
        lines.append(f"  last checkpoint: {last}")
    if best is not None and best != last:
        lines.append(f"  best checkpoint (by eval accuracy): {best}")
    use = best or last
    if use is not None:
        commands = use_commands(model_folder(r), str(use), str(out_dir / "fused"), r.data.task)
        commands.append(f"python -m cast_mlx.publish {out_dir} --repo NAME  # to the Hugging Face Hub")
        lines += ["  use it:", *(f"    {c}" for c in commands)]
    if report is not None:
        lines.append(f"  report: {report}")
    return lines


def disk_full_line(step: int, last: Path | None, resume: str) -> str:
    """What a run that found the disk full says: where it stopped and how to go on."""
    if last is None:
        return (
            f"disk full: stopped in step {step} before the first checkpoint; free some space, then start again "
            "with --overwrite"
        )
    return (
        f"disk full: stopped at step {step}; the last checkpoint {last} and `latest` are intact; free some space, "
        f"then resume with {resume}"
    )


def stale_note(paths: list[Path]) -> str:
    """The start-up note about unfinished checkpoint folders that ended runs left."""
    return f"note: removed {len(paths)} unfinished checkpoint folder(s) that ended runs left: " + ", ".join(
        str(p) for p in paths
    )


def drift_message(history: list, window: int, step: int) -> str:
    """The warning of the length-drift guard, from the run's [truncation, reward] history."""
    before, last = history[-2 * window : -window], history[-window:]
    mean = lambda rows, i: sum(h[i] for h in rows) / len(rows)  # noqa: E731
    return (
        f"warning: length drift at step {step}: the truncation rate rose to {mean(last, 0):.2f} "
        f"(mean of the last {window} steps) while the reward went {mean(before, 1):.3f} -> {mean(last, 1):.3f}; "
        "see health/drift and the cast/eos/* metrics"
    )

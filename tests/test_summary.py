"""What a user sees around the loop (issue #18): progress inside a step, the start-up header,
and the end-of-run summary for a finished, an interrupted and a resumed run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cast_mlx import config as cfg
from cast_mlx.algorithm.facts import ALGORITHMS
from cast_mlx.engine import models
from cast_mlx.training import preflight, trainer
from cast_mlx.training.evaluation import evaluate_held_out

from helpers import ROOT, run_cli, smoke_args


def test_phase_progress_counts_only_go_up(tmp_path, smol_dir):
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'r'}", "data.eval_size=4"])
    calls: list[tuple] = []
    with trainer.setup(recipe) as run:
        run.phase = lambda *args: calls.append(args)
        trainer.train_step(run)
        problems = run.held_out or preflight.eval_problems(run.recipe)
        evaluate_held_out(run.model, run.tokenizer, problems, run.recipe, run.verifier, run.world, run.phase)
    phases = [c[0] for c in calls]
    # in the order a step runs them, then the eval
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == ["sampling", "verifying", "teacher", "update", "eval"]
    for name in ("sampling", "update", "eval"):
        seen = [(done, total) for p, done, total, *_ in calls if p == name]
        assert seen[0][0] == 0, name
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])), name  # monotonic
        assert all(done <= total for done, total in seen), name
    sampling = [c for c in calls if c[0] == "sampling"]
    assert sampling[-1][2] == recipe.sampling.max_new_tokens and "streams done" in sampling[-1][3]
    assert [c for c in calls if c[0] == "eval"][-1][1:3] == (4, 4)


def test_the_header_is_short_and_print_config_keeps_the_recipe(tmp_path, smol_dir):
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard", "--set",
        f"logging.out_dir={tmp_path / 'o'}", "--set", "schedule.steps=1", "--dry-run",
    )  # fmt: skip
    head = proc.stdout.split("# recipe hash")[0].strip().splitlines()
    assert head[0].startswith("cast-mlx: smollm2-135m-instruct") and "smoke" not in head[0].split("->")[0]
    assert head[1] == "  cast: " + ALGORITHMS["cast"].summary  # what the variant does, in words
    assert len(head) == 4 and "set in the recipe: " in head[3] and "schedule.steps" in head[3]
    full = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--print-config")
    assert "algorithm:" in full.stdout and "sampling:" in full.stdout


def _uses(stdout: str, ckpt: Path) -> None:
    """The summary names `ckpt` as the last checkpoint, and its commands use the best one it
    names (or `ckpt` when it names none) with the embedded model's folder; `ckpt` holds the
    model card."""
    assert f"last checkpoint: {ckpt}" in stdout
    best = re.search(r"best checkpoint \(by eval accuracy\): (\S+)", stdout)
    use = best.group(1) if best else str(ckpt)
    folder = models.embedded_dir(models.DEFAULT_MODEL)
    assert f"mlx_lm.generate --model {folder} --adapter-path {use} " in stdout
    assert f"mlx_lm.fuse --model {folder} --adapter-path {use} " in stdout
    assert f"python -m cast_mlx.eval --adapter {use} --task arithmetic" in stdout
    run = Path(use).parents[1]
    assert f"mlx_lm.evaluate --model {run / 'fused'} --tasks gsm8k" in stdout  # standard benchmarks
    assert f"python -m cast_mlx.publish {run} --repo NAME" in stdout
    card = (ckpt / "README.md").read_text()  # the model card in the last checkpoint
    assert f"--adapter-path {ckpt} " in card and "## Evaluation" in card


def test_summary_of_a_finished_an_interrupted_and_a_resumed_run(tmp_path, smol_dir):
    out = tmp_path / "s"
    args = smoke_args(out, "--set", "schedule.steps=40", "--set", "logging.eval_every=2", "--set", "data.eval_size=4")
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "checkpoints" / "step_000002").exists():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-2000:]
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert "summary: step " in stdout and " of 40" in stdout
    _uses(stdout, out / "checkpoints" / steps[-1])
    assert "eval accuracy " in stdout and "McNemar p = " in stdout  # step 0 -> the last eval

    last = int(steps[-1].removeprefix("step_"))
    resumed = run_cli(
        "-m", "cast_mlx.train", "--resume", str(out), "--quiet", "--no-dashboard",
        "--set", f"schedule.steps={last + 1}",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"summary: step {last + 1} of {last + 1}" in resumed.stdout
    _uses(resumed.stdout, out / "checkpoints" / f"step_{last + 1:06d}")
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in resumed.stdout


def test_damaged_eval_lines_are_left_out_of_the_summary_and_the_best_checkpoint(tmp_path):
    from cast_mlx.training.summary import best_saved_eval, read_evals

    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004").mkdir()
    lines = [
        '{"step": 2, "lenient": [1.0, 0.0]}',
        '{"step": 4}',  # parses, no results
        '{"step": 4, "lenient": []}',
        '{"step": 4, "lenient": "xx"}',
        '{"step": 4, "lenient": [7]}',
        "\x00\xff garbage",
    ]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    assert [e["step"] for e in read_evals(tmp_path)] == [2]
    assert best_saved_eval(tmp_path) == 0.5

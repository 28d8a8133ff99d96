"""The HTML run report (`cast_mlx.report`): committed runs, a synthetic one, the CLI, and a
headless Chromium that loads the page from a file:// URL (skipped without chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cast_mlx.training import plot, report

from helpers import ROOT, run_cli

RUNS = ROOT / "docs" / "runs"
SCRIPT = "<script>alert(1)</script>"


def count(text: str, needle: str) -> int:
    return len(re.findall(re.escape(needle), text))


def assert_offline(text: str) -> None:
    """Nothing the page could fetch: no URL at all, every src a data: URI, no script."""
    assert "http://" not in text and "https://" not in text
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))
    assert "href=" not in text and "<script" not in text and "<link" not in text


# --------------------------------------------------------------------------- committed runs


@pytest.mark.parametrize(
    "run, images, evals, samples",
    [
        # CAST: all six panels; 17 lines (step-0 eval + 16 steps), 2 samples per step
        ("screen-4b-cpu/cast-seed0", 6, 2, 32),
        # GRPO logs the gap shares as zeros: that panel is left out
        ("screen-4b-cpu/grpo-seed0", 5, 2, 32),
        # an older run without cast/eos/* (the other gap shares draw the panel)
        ("study-arith/cast-seed0", 6, 3, 32),
        # no samples.jsonl at all
        ("gsm8k-cast-seed0", 6, 2, 0),
    ],
)
def test_committed_runs(tmp_path, run, images, evals, samples):
    t0 = time.perf_counter()
    out = report.write_report(RUNS / run, tmp_path / "r.html")
    assert time.perf_counter() - t0 < 20  # the trainer calls this at the end of a run
    text = out.read_text()
    assert count(text, "<img") == images
    assert count(text, 'class="eval-row"') == evals
    assert count(text, 'class="sample"') == samples
    assert count(text, "<details") == samples // 2  # one per step (no recipe, so no recipe block)
    assert ("CAST gap shares" in text) == (images == 6)
    assert "wall time (sum of time/step)" in text and "not recorded" in text  # no checkpoints committed
    assert_offline(text)
    assert not (RUNS / run / report.REPORT).exists()  # --out given: the run folder is untouched


def test_header_numbers_of_a_committed_run(tmp_path):
    run = RUNS / "screen-4b-cpu" / "cast-seed0"
    rows = plot.read_metrics(run)
    total = sum(r["time/step"] for r in rows if "time/step" in r)
    text = report.render(run)
    assert f"<th>steps done</th><td>{max(r['step'] for r in rows)}</td>" in text
    assert report._duration(total) in text
    # the eval table: step 0 with its CI and n
    assert "<td>0</td><td>0.250</td><td>[0.195, 0.310]</td><td>0.000</td><td>200</td>" in text


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 16), (5, 32)])
def test_samples_per_step(n, expected):
    text = report.render(RUNS / "screen-4b-cpu" / "grpo-seed0", samples_per_step=n)
    assert count(text, 'class="sample"') == expected


# --------------------------------------------------------------------------- synthetic runs


def write_run(run_dir: Path, steps: int = 6, completion: str = "x", full: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "eval/accuracy": 0.2, "eval/n": 50})]
    for s in range(1, steps + 1):
        m: dict = {"step": s, "reward": s / steps, "time/step": 2.0}
        if full:
            m |= {
                "completions/mean_length": 10.0 + s,
                "completions/clipped_ratio": 0.1,
                "cast/groups/all_correct": 0.2,
                "cast/groups/all_wrong": 0.3,
                "cast/groups/mixed": 0.5,
                "time/sample": 1.0,
                "time/update": 0.9,
            }
        if s % 3 == 0:
            m |= {"eval/accuracy": 0.3, "eval/accuracy_ci_low": 0.2, "eval/accuracy_ci_high": 0.4}
        lines.append(json.dumps(m))
    lines.insert(3, '{"step": 2, "reward": 0.')  # a torn write
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    samples = [
        {"step": s, "problem": "1 < 2 & 3?", "gold": "<i>", "completion": completion, "reward": 1.0, "finish": "eos"}
        for s in range(1, steps + 1)
        for _ in range(3)
    ]
    text = "".join(json.dumps(x) + "\n" for x in samples) + '{"step": 9, "probl'
    (run_dir / "samples.jsonl").write_text(text)
    return run_dir


def test_completion_html_is_escaped_and_whitespace_kept(tmp_path):
    completion = f'{SCRIPT}\n    indented & "quoted"\n\n\tend'
    run = write_run(tmp_path / "run", completion=completion)
    text = report.write_report(run).read_text()
    assert (run / "report.html").is_file()
    assert SCRIPT not in text and "<i>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<pre>&lt;script&gt;alert(1)&lt;/script&gt;\n    indented &amp; &quot;quoted&quot;\n\n\tend</pre>" in text
    assert "1 &lt; 2 &amp; 3?" in text and "&lt;i&gt;" in text
    assert count(text, 'class="sample"') == 6 * 2  # 3 logged per step, 2 shown; the torn line skipped
    assert count(text, "<details") == 6
    # reward, eval, length, groups, time: no gap shares in this run
    assert count(text, "<img") == 5 and "CAST gap shares" not in text
    assert count(text, 'class="eval-row"') == 3
    assert "<td>3</td><td>0.300</td><td>[0.200, 0.400]</td><td>—</td><td>—</td>" in text
    assert "<th>steps done</th><td>6</td>" in text
    assert_offline(text)


def test_a_panel_without_data_is_left_out(tmp_path):
    run = write_run(tmp_path / "run", full=False)
    text = report.render(run)
    assert count(text, "<img") == 3  # reward, eval accuracy, step time (time/step alone)
    assert "group mix" not in text and "completion length" not in text


def test_nan_values_do_not_break_the_page(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        '{"step": 1, "reward": NaN, "time/step": NaN, "eval/accuracy": NaN}',
        '{"step": 2, "reward": 0.5, "time/step": 3.0}',
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = report.render(run)
    assert count(text, "<img") == 2  # reward, step time; eval accuracy has no finite value
    assert "<th>wall time (sum of time/step)</th><td>3.0 s</td>" in text and "no evaluation in this run" in text


def test_recipe_of_the_newest_checkpoint(tmp_path):
    run = write_run(tmp_path / "run")
    ckpts = run / "checkpoints"
    for step, algo in ((3, "grpo"), (6, "cast")):
        (ckpts / f"step_{step:06d}").mkdir(parents=True)
        recipe = (
            f"name: myrun\nseed: 7\nmodel:\n  name: tiny-model\nalgorithm:\n  name: {algo}\nschedule:\n  steps: 40\n"
        )
        (ckpts / f"step_{step:06d}" / "recipe.yaml").write_text(recipe)
    (ckpts / "latest").write_text("step_000003\n")  # latest is what counts, not the highest step
    text = report.render(run)
    assert "<th>algorithm</th><td>grpo</td>" in text and "<th>model</th><td>tiny-model</td>" in text
    assert "<th>steps done</th><td>6 of 40</td>" in text and "<th>seed</th><td>7</td>" in text
    assert "<h1>myrun</h1>" in text and "myrun (folder run)" in text and "<summary>recipe.yaml</summary>" in text
    # a broken latest: the highest readable step_* instead; all broken: not recorded
    (ckpts / "step_000003" / "recipe.yaml").write_text("name: [unclosed\n")
    assert report.read_recipe(run)["algorithm"]["name"] == "cast"
    (ckpts / "step_000006" / "recipe.yaml").unlink()
    assert report.read_recipe(run) == {}
    assert "<th>algorithm</th><td>not recorded</td>" in report.render(run)


class Axes:
    """Records the labels a panel's lines get."""

    def __init__(self):
        self.labels: list = []

    def plot(self, *args, label=None, **kw):
        self.labels.append(label)

    fill_between = plot


@pytest.mark.parametrize(
    "answer_format, label",
    [("hash", "strict (#### format)"), ("boxed", "strict (\\boxed{} format)"), ("none", None), (None, "strict")],
)
def test_strict_accuracy_says_which_format_or_is_left_out(tmp_path, monkeypatch, answer_format, label):
    """Issue #30: strict accuracy is named after the format the prompt asks for
    (data.strict_label), and left out where it asks for none; a run without its recipe
    keeps the plain name."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    rows = [{"step": s, "eval/accuracy": 0.5, "eval/accuracy_strict": 0.125, "eval/n": 8} for s in (0, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if answer_format is not None:
        recipe = f"name: myrun\ndata:\n  task: arithmetic\n  answer_format: {answer_format}\n"
        (run / "checkpoints" / "step_000002" / "recipe.yaml").write_text(recipe)
    panels: list = []
    monkeypatch.setattr(report, "panel_pngs", lambda rows, chosen=None: panels.extend(chosen or []) or [])
    text = report.render(run)
    ax = Axes()
    next(p for p in panels if p.title.startswith("eval accuracy")).draw(ax, rows)
    if label is None:
        assert "strict" not in text and "0.125" not in text and ax.labels == ["lenient"]
        assert "<th>step</th><th>accuracy</th><th>95% CI</th><th>n</th>" in text
    else:
        assert f"<th>accuracy, {html.escape(label)}</th>" in text and "<td>0.125</td>" in text
        assert ax.labels == ["lenient", label]


# --------------------------------------------------------------------------- CLI


def test_cli_writes_the_default_file(tmp_path):
    run = write_run(tmp_path / "run")
    r = run_cli("-m", "cast_mlx.report", str(run), "--samples-per-step", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    out = run / "report.html"
    assert r.stdout.strip() == str(out) and out.is_file()
    assert count(out.read_text(), 'class="sample"') == 6
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["missing", "no_metrics", "empty", "negative"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    run = tmp_path / "bad"
    args = [str(run)]
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("{torn\n")
    if case == "negative":
        write_run(run)
        args += ["--samples-per-step", "-1"]
    r = run_cli("-m", "cast_mlx.report", *args, "--out", str(tmp_path / "r.html"), timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert ("samples-per-step" in lines[0]) if case == "negative" else (str(run) in lines[0])
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (a file:// URL), its console on stderr."""
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", *args, page.resolve().as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def console_errors(stderr: str) -> list[str]:
    """The page's console messages and uncaught errors (the report has no script, so any
    is a fault); chromium's own noise (dbus, GPU, sandbox) is not one of them."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_console_scan_sees_a_page_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><script>console.error("boom"); throw new Error("bad")</script></body></html>')
    r = chromium(page, tmp_path, "--dump-dom")
    errors = console_errors(r.stderr)
    assert any("Uncaught Error: bad" in e for e in errors) and any('"boom"' in e for e in errors), r.stderr


@needs_chromium
def test_report_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    run = write_run(tmp_path / "run", completion=SCRIPT)
    shutil.copy(RUNS / "screen-4b-cpu" / "cast-seed0" / "metrics.jsonl", run / "metrics.jsonl")  # all 6 panels
    page = report.write_report(run, tmp_path / "page" / "report.html", samples_per_step=3)

    r = chromium(page, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert count(dom, "<img") == 6 and count(dom, 'src="data:image/png;base64,') == 6
    assert count(dom, 'class="sample"') == 6 * 3
    assert count(dom, "<details") == 6
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and SCRIPT not in dom  # parsed as text, not run
    assert console_errors(r.stderr) == [], r.stderr

    shot = tmp_path / "shot.png"
    r = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert console_errors(r.stderr) == [], r.stderr
    image = mpimg.imread(shot)
    assert image.shape[:2] == (2000, 1200)
    pixels = np.round(image[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 200  # curves, text and tables, not a blank page
    # the curves (below the header) were decoded and drawn: coloured lines, not just text
    curves = image[500:1400, :, :3]
    assert (curves.max(axis=-1) - curves.min(axis=-1) > 0.3).mean() > 0.005

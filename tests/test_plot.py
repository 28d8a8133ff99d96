"""Learning-curve plots and the comparison report, on synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cast_mlx.training import plot

from helpers import ROOT, run_cli


def write_run(
    run_dir: Path, steps: int = 20, eval_every: int = 5, accuracy=None, step_time: float = 1.0, flips: bool = True
) -> Path:
    """A metrics.jsonl like the trainer's: one line per step, eval keys every few steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    accuracy = accuracy or (lambda s: 0.2 + 0.02 * s)
    lines = []
    for s in range(1, steps + 1):
        m = {
            "step": s,
            "reward": 0.5 + 0.3 * math.sin(s),
            "time/step": step_time,
            "cast/groups/all_correct": 0.2,
            "cast/groups/all_wrong": 0.3,
            "cast/groups/mixed": 0.5,
        }
        if flips:
            m |= {"cast/flip/down_share": 0.05, "cast/flip/up_share": 0.01}
        if s % eval_every == 0:
            m |= {"eval/accuracy": accuracy(s), "eval/accuracy_strict": accuracy(s) / 2}
        lines.append(json.dumps(m))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_png_of_two_runs_has_the_expected_size(tmp_path):
    import matplotlib.image as mpimg

    a = write_run(tmp_path / "cast-seed0")
    b = write_run(tmp_path / "grpo-seed0", flips=False)
    out = tmp_path / "curves.png"
    r = run_cli(
        "-m",
        "cast_mlx.plot",
        str(a),
        str(b),
        "-o",
        str(out),
        "--width",
        "10",
        "--height",
        "6",
        "--dpi",
        "80",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    image = mpimg.imread(out)
    assert image.shape[:2] == (6 * 80, 10 * 80)
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_default_size_in_process(tmp_path):
    import matplotlib.image as mpimg

    out = plot.plot_runs([write_run(tmp_path / "r")], tmp_path / "sub" / "c.png")
    assert mpimg.imread(out).shape[:2] == (800, 1200)


def test_series_keeps_eval_steps_only_and_last_line_of_a_repeated_step():
    rows = [
        {"step": 1, "reward": 0.1},
        {"step": 2, "reward": 0.2, "eval/accuracy": 0.4},
        {"step": 2, "reward": 0.3, "eval/accuracy": 0.5},
        {"step": 3, "reward": True},
    ]
    steps, values = plot.series(rows, "eval/accuracy")
    assert steps.tolist() == [2.0] and values.tolist() == [0.5]
    steps, values = plot.series(rows, "reward")
    assert steps.tolist() == [1.0, 2.0] and values.tolist() == [0.1, 0.3]


def test_rolling_mean_is_trailing():
    assert np.allclose(plot.rolling_mean(np.array([1.0, 2.0, 3.0, 4.0]), window=2), [1.0, 1.5, 2.5, 3.5])


@pytest.mark.parametrize("case", ["missing", "no_metrics", "empty"])
def test_missing_or_empty_run_dir_is_one_line_exit_2(tmp_path, case):
    good = write_run(tmp_path / "good")
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case == "empty":
        (bad / "metrics.jsonl").write_text("\n")
    out = tmp_path / "c.png"
    r = run_cli("-m", "cast_mlx.plot", str(good), str(bad), "-o", str(out), timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- compare.py


def test_compare_report_only(tmp_path):
    out = tmp_path / "cmp"
    # GRPO ends at 0.6 (step 20); CAST gets there at step 15 (seed mean 0.6), 1.5x slower
    for seed in (0, 1):
        write_run(out / f"grpo-seed{seed}", accuracy=lambda s: 0.03 * s, flips=False)
        write_run(out / f"cast-seed{seed}", accuracy=lambda s: 0.04 * s, step_time=1.5)
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    assert (out / "curves.png").is_file()
    assert "| grpo | 0.150 (0.15, 0.15) | 0.300 (0.30, 0.30) | 0.450 (0.45, 0.45) | 0.600 (0.60, 0.60) |" in report
    assert "GRPO's final seed-mean eval accuracy: 0.600 (step 20)" in report
    assert "| cast | 15 |" in report
    assert "| grpo | 20 |" in report
    assert "CAST/GRPO step-time ratio: **1.50**" in report
    assert "Not recorded" in report  # no commands.json: the runs were not made by compare.py
    assert "shared the CPU" not in report
    # runs labelled as having shared the CPU: the label is kept in the folder and reported
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(out), "--shared-cpu",
                "2-4 runs at a time", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "shared-cpu.txt").read_text() == "2-4 runs at a time\n"
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(out), timeout=120)
    assert "**These runs shared the CPU** (2-4 runs at a time)" in (out / "report.md").read_text()
    assert "oracle" not in (out / "report.md").read_text()
    # an oracle run (teacher.oracle) is labelled wherever the report names it
    oracle = write_run(out / "peek-seed0", accuracy=lambda s: 0.05 * s)
    rows = [json.loads(line) | {"label": "oracle: not CAST (its teacher sees the gold answer)"}
            for line in (oracle / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    (oracle / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    assert "**peek: oracle: not CAST (its teacher sees the gold answer).**" in report
    assert "| peek (oracle: not CAST) | 0.250 (0.25) |" in report

    # damaged files: a run without readable metrics and a garbled eval.jsonl are warned about
    (out / "gone-seed0").mkdir()
    (out / "gone-seed0" / "metrics.jsonl").write_bytes(b"\x00\xff\xfe not json\n")
    (out / "grpo-seed0" / "eval.jsonl").write_bytes(b'{"step": 20, "lenient": [1, 0]}\n\xff\xfe\n5\n')
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(out), timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"warning: {out / 'gone-seed0' / 'metrics.jsonl'}: no readable metrics line" in r.stderr
    assert f"warning: {out / 'grpo-seed0' / 'eval.jsonl'}: skipped 2 unreadable line(s) (line 2, 3" in r.stderr


def test_compare_train_command_keeps_its_own_overrides_last():
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    cmd = compare.train_command(
        "r.yaml", Path("o/cast-seed1"), 1, ["algorithm.name=cast"], ["seed=9", "sampling.group_size=4"], 30
    )
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == [
        "seed=9",
        "sampling.group_size=4",
        "schedule.steps=30",
        "algorithm.name=cast",
        "logging.out_dir=o/cast-seed1",
        "seed=1",
    ]
    assert cmd[-2:] == ["--no-dashboard", "--quiet"]
    curves = [{s: 0.0 for s in range(5, 101, 5)}, {s: 0.0 for s in range(5, 91, 5)}]
    # the steps both have, 5..90, at indices 0, 3, 7, 10, 14, 17
    assert compare.table_steps(curves, None) == [5, 20, 40, 55, 75, 90]
    assert compare.table_steps(curves, [10, 95, 50]) == [10, 50]


def test_compare_report_only_without_runs_is_exit_2(tmp_path):
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--report-only", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "no runs" in r.stderr


def test_compare_pooled_change_and_ci_table(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    # 0.25 -> 0.35 on 200 problems in each of two seeds: pooled 0.25 (n 400) -> 0.35 (n 400)
    d, lo, hi = compare.pooled_change([(0.2, 200, 0.3, 200), (0.3, 200, 0.4, 200)])
    half = 1.96 * math.sqrt(0.25 * 0.75 / 400 + 0.35 * 0.65 / 400)
    assert (d, lo, hi) == pytest.approx((0.1, 0.1 - half, 0.1 + half))

    out = tmp_path / "cmp"
    for seed in (0, 1):
        run = write_run(out / f"grpo-seed{seed}", accuracy=lambda s: 0.01 * s, flips=False)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for m in lines:
            if "eval/accuracy" in m:
                m |= {
                    "eval/n": 200,
                    "eval/accuracy_ci_low": m["eval/accuracy"] - 0.05,
                    "eval/accuracy_ci_high": m["eval/accuracy"] + 0.05,
                }
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    text = compare.report(out)
    assert "| grpo-seed0 | step 5: 0.050 [0.000, 0.100] | step 20: 0.200 [0.150, 0.250] |" in text
    d, lo, hi = compare.pooled_change([(0.05, 200, 0.2, 200)] * 2)
    assert f"| grpo | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in text


def test_compare_jobs_below_one_is_exit_2(tmp_path):
    r = run_cli(str(ROOT / "scripts" / "compare.py"), "--jobs", "0", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --jobs must be >= 1, got 0"


def test_compare_step_time_skips_the_step0_eval_line_and_the_first_step(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    # the trainer's layout: an eval-only line for step 0, then steps (the first one compiles)
    rows = [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "time/step": 30.0, "reward": 0.1},
        {"step": 2, "time/step": 2.0, "reward": 0.1},
        {"step": 3, "time/step": 4.0, "reward": 0.2},
    ]
    assert compare.mean_step_time({0: rows}) == pytest.approx(3.0)
    out = tmp_path / "cmp"
    for name in ("grpo-seed0", "cast-seed0"):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "| grpo | 3.00 | 1.00 | 3 |" in compare.report(out)


def test_compare_variants_of_ones_own(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    extra = [
        ["cast-db1", "algorithm.flip_deadband=1.0"],
        ["grpo-t07", "algorithm.name=grpo", "sampling.temperature=0.7"],
    ]
    v = compare.variants(False, False, extra)
    assert list(v) == ["grpo", "cast", "cast-db1", "grpo-t07"]
    assert v["grpo-t07"] == ["algorithm.name=grpo", "sampling.temperature=0.7"]
    for args, words in [
        (["--variant", "cast", "algorithm.flip=none"], "--variant cast: that name is already a variant"),
        (["--variant", "x-seed1", "seed=2"], "does not end in -seedN"),
        (["--variant", "a/b", "seed=2"], "a name takes letters"),
        (["--variant", "x"], "--variant x: give its overrides"),
        (["--variant", "x", "algorithm.flip"], "--variant x: 'algorithm.flip' is not KEY=VALUE"),
        (["--variant", "x", "algorithm.flip=sideways"], "variant x: algorithm.flip: 'sideways' is not allowed"),
        (
            ["--variant", "x", "algorithm.flip=none", "--set", "sampling.gruop_size=2"],
            "variant grpo: --set sampling.gruop_size: unknown key",
        ),
    ]:
        r = run_cli(str(ROOT / "scripts" / "compare.py"), "--out", str(tmp_path / "none"), *args, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
        assert not (tmp_path / "none").exists()  # refused before anything ran


def test_compare_cast_variants_are_the_papers_cast_on_the_default_recipe():
    """The default recipe runs GRPO with the teacher switches set for its previous default
    (EOS following the verifier, no zero-variance base); the comparison's `cast` must still
    be CAST as in the paper."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    from cast_mlx import config as cfg

    recipe = ROOT / "recipes" / "smollm2-135m-arith.yaml"
    shipped = cfg.load_recipe(recipe, []).algorithm
    assert (shipped.name, shipped.special_tokens, shipped.zero_var_base) == ("grpo", "verifier", 0.0)
    v = compare.variants(False, True)
    paper = cfg.load_recipe(recipe, v["cast"]).algorithm
    assert (paper.name, paper.special_tokens, paper.zero_var_base, paper.scale_rewards) == (
        "cast",
        "teacher",
        1.0,
        "none",
    )
    assert cfg.load_recipe(recipe, v["cast-mixedonly"]).algorithm.zero_var_base == 0.0
    noflip = cfg.load_recipe(recipe, v["cast-noflip"]).algorithm
    assert (noflip.name, noflip.flip, noflip.special_tokens) == ("cast", "none", "teacher")
    assert cfg.load_recipe(recipe, v["grpo"]).algorithm.name == "grpo"


def test_compare_paired_mcnemar_pools_seeds_and_keeps_finished_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    out = tmp_path / "cmp"
    # 10 problems per seed; at step 20 the variant is right on 2 problems GRPO misses and
    # wrong on none that GRPO gets, in each of 2 seeds: 4 discordant pairs, all one way.
    for seed in (0, 1):
        for name, right in (("grpo", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]), ("cast", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])):
            d = write_run(out / f"{name}-seed{seed}", accuracy=lambda s: 0.03 * s, flips=name == "cast")
            rows = [{"step": 20, "lenient": right, "strict": [0] * 10}]
            (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = compare.report(out)
    # p = 2 * 0.5^4 = 0.125; difference 4/20 = +0.200
    assert "| cast | 20 | 20 | 4 | 0 | +0.200 [" in report and "| 0.125 |" in report
    assert "- cast: step 20 = 100%" in report
    assert "| cast | " in report.split("## Mechanism")[1]
    # a run whose final checkpoint exists is not trained again
    ckpt = out / "cast-seed0" / "checkpoints" / "step_000020"
    ckpt.mkdir(parents=True)
    (ckpt / "adapters.safetensors").write_text("x")
    assert compare.finished(out / "cast-seed0", 20) and not compare.finished(out / "cast-seed1", 20)
    args = compare.build_parser().parse_args(["--recipe", "recipes/smoke.yaml", "--steps", "20"])
    assert compare.run_command(args, out / "cast-seed0", 0, ["algorithm.name=cast"]) is None  # kept
    (out / "cast-seed1" / "checkpoints" / "step_000008").mkdir(parents=True)  # cut short: resumed
    cmd = compare.run_command(args, out / "cast-seed1", 1, ["algorithm.name=cast"])
    assert cmd[1:5] == ["-m", "cast_mlx.train", "--resume", str(out / "cast-seed1")]
    assert "schedule.steps=20" in cmd
    fresh = compare.run_command(args, out / "cast-seed2", 2, ["algorithm.name=cast"])
    assert "--resume" not in fresh and "seed=2" in fresh

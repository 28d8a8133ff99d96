"""scripts/accuracy_per_minute.py: training minutes per step, the checkpoint within a budget,
and the report's table and seed-level comparison, on fake run folders (no model)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import accuracy_per_minute as apm  # noqa: E402


def fake_run(root: Path, name: str, seed: int, seconds: list[float], evals: dict[int, list[float]]) -> Path:
    """Steps of `seconds` each (training time), evals (per-problem 0/1) at the steps of `evals`."""
    d = root / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    lines, eval_lines = [], []
    for step in range(len(seconds) + 1):
        m: dict = {"step": step}
        if step:
            m["time/step"] = seconds[step - 1]
        if step in evals:
            m["eval/accuracy"] = sum(evals[step]) / len(evals[step])
            m["eval/accuracy_ci_low"], m["eval/accuracy_ci_high"] = 0.0, 1.0
            eval_lines.append({"step": step, "lenient": evals[step], "strict": [0.0] * len(evals[step])})
        lines.append(json.dumps(m))
    lines.insert(2, "{torn")  # a torn line is skipped
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in eval_lines))
    return d


def test_training_minutes_and_the_step_within_a_budget(tmp_path):
    d = fake_run(tmp_path, "grpo-mu1", 0, [60, 90, 30, 120], {0: [1, 0], 4: [1, 1]})
    minutes = apm.training_minutes(d)
    assert minutes == pytest.approx({0: 0.0, 1: 1.0, 2: 2.5, 3: 3.0, 4: 5.0})
    assert [apm.step_within(minutes, b) for b in (0.5, 1.0, 2.9, 3.0, 10)] == [0, 1, 2, 3, 4]


def test_a_budget_that_lands_on_an_eval_step_reuses_the_runs_eval(tmp_path, capsys):
    d = fake_run(tmp_path, "grpo-mu1", 0, [60, 60], {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]})
    apm.evaluate(d, [2.0, 0.5])  # 2 min: step 2 (evaluated in the run); 0.5 min: step 0 (the base model)
    rows = [json.loads(x) for x in (d / apm.BUDGETS_FILE).read_text().splitlines()]
    assert [(r["minutes"], r["step"], r["eval/accuracy"], r["source"]) for r in rows] == [
        (2.0, 2, 0.5, "run's eval"),
        (0.5, 0, 0.25, "run's eval"),
    ]
    apm.evaluate(d, [2.0])  # done already: nothing appended
    assert len((d / apm.BUDGETS_FILE).read_text().splitlines()) == 2


def test_the_report_compares_each_variant_with_the_baseline_per_seed(tmp_path):
    # per seed, at step 2 and within 2 minutes: the baseline gets problems 0-1, the variant 0-2
    # (slower steps: within 2 minutes it reached step 1 only, evaluated as the base [1, 0, 0, 0])
    for seed in (0, 1):
        fake_run(tmp_path, "grpo-mu1", seed, [60, 60], {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]})
        v = fake_run(tmp_path, "grpo-mu4", seed, [90, 90], {0: [1, 0, 0, 0], 2: [1, 1, 1, 0]})
        (v / apm.BUDGETS_FILE).write_text(
            json.dumps({"minutes": 2.0, "step": 1, "train_minutes": 1.5, "eval/accuracy": 0.25,
                        "lenient": [1, 0, 0, 0], "source": "checkpoint"}) + "\n"
        )  # fmt: skip
    apm.evaluate(tmp_path / "grpo-mu1-seed0", [2.0])
    apm.evaluate(tmp_path / "grpo-mu1-seed1", [2.0])
    out = tmp_path / "report"
    apm.report(tmp_path, [2.0], "grpo-mu1", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["grpo-mu4"]["0"]["training_minutes"] == pytest.approx(3.0)
    assert summary["variants"]["grpo-mu4"]["0"]["seconds_per_step"] == 90
    at_step = summary["comparisons"]["grpo-mu4 step 2"]
    assert at_step["diffs"] == pytest.approx([0.25, 0.25]) and (at_step["only_new"], at_step["only_base"]) == (2, 0)
    within = summary["comparisons"]["grpo-mu4 2 min"]
    assert within["diffs"] == pytest.approx([-0.25, -0.25]) and (within["only_new"], within["only_base"]) == (0, 2)
    assert within["p"] == pytest.approx(0.5)  # exact McNemar, 0 vs 2 discordant
    text = (out / "report.md").read_text()
    assert "| grpo-mu4 | 0 | 2 | 3.0 | 90.0 | 0.250 | 0.750 | 0.250 |" in text
    assert (out / "accuracy-per-minute.png").stat().st_size > 1000

"""scripts/seed_paired.py: seed-level paired differences with t-intervals, and the pooled McNemar."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import seed_paired  # noqa: E402

ORACLE = "oracle: not CAST (its teacher sees the gold answer)"
# per seed: baseline [1,0,0,0,1], variant [1,1,1,0,0] -> 2 problems only the variant gets right, 1 only
# the baseline: pooled over 3 seeds 6 vs 3 of n = 15, difference +0.2, p = 2 * P(Bin(9, 1/2) <= 3)
BASE_LENIENT = [1.0, 0.0, 0.0, 0.0, 1.0]
CAST_LENIENT = [1.0, 1.0, 1.0, 0.0, 0.0]


def run(out: Path, name: str, seed: int, acc: dict[int, float], lenient: list[float] | None = None, label=None):
    """A fake run folder: metrics.jsonl with eval/accuracy at the steps of `acc` (and training lines
    in between), and eval.jsonl with the per-problem `lenient` list at every eval step."""
    d = out / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    rows = []
    for step, a in sorted(acc.items()):
        rows.append({"step": step, "loss": 0.1, "reward": 0.5})
        rows.append({"step": step, "eval/accuracy": a, "eval/n": 5})
    if label:
        for r in rows:
            r["label"] = label
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if lenient is not None:
        (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "lenient": lenient}) + "\n" for s in acc))


@pytest.fixture
def runs_dir(tmp_path):
    out = tmp_path / "cmp"
    base12, base24 = [0.20, 0.22, 0.24], [0.30, 0.32, 0.28]
    cast12, cast24 = [0.20, 0.26, 0.24], [0.32, 0.36, 0.34]
    for s in range(3):
        run(out, "grpo", s, {12: base12[s], 24: base24[s]}, BASE_LENIENT)
        run(out, "cast", s, {12: cast12[s], 24: cast24[s]}, CAST_LENIENT)
    # only cast has seed 3: it must be left out (it would move every number)
    run(out, "cast", 3, {12: 0.9, 24: 0.9}, [1.0] * 5)
    # an oracle run with one seed: no interval
    run(out, "oracle", 1, {12: 0.5, 24: 0.62}, [1.0, 1.0, 1.0, 1.0, 0.0], label=ORACLE)
    # a variant whose seed 2 skipped the step-12 eval: left out of the mean-steps endpoint only
    run(out, "gappy", 0, {12: 0.30, 24: 0.40})
    run(out, "gappy", 1, {12: 0.22, 24: 0.32})
    run(out, "gappy", 2, {24: 0.38})
    (out / "logs").mkdir()  # not a run folder
    return out


@pytest.mark.parametrize("df, value", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_known_values(df, value):
    assert seed_paired.t_quantile(df) == pytest.approx(value, abs=1e-4)


def test_t_quantile_tends_to_the_normal_and_rejects_df_0():
    assert seed_paired.t_quantile(1000) == pytest.approx(1.9623, abs=1e-4)
    assert seed_paired.t_two_sided(1.959964, 200000) == pytest.approx(0.95, abs=1e-5)
    with pytest.raises(ValueError):
        seed_paired.t_quantile(0)


def test_t_interval():
    mean, low, high = seed_paired.t_interval([0.02, 0.04, 0.06])
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert mean == pytest.approx(0.04)
    assert (low, high) == pytest.approx((0.04 - half, 0.04 + half), abs=1e-5)
    assert half == pytest.approx(0.04968, abs=1e-5)
    assert seed_paired.t_interval([0.07]) == (pytest.approx(0.07), None, None)
    assert seed_paired.t_interval([]) == (None, None, None)


def test_variant_against_baseline(runs_dir):
    result = seed_paired.analyse(runs_dir, "grpo", 24, [12, 24])
    assert list(result["variants"]) == ["cast", "gappy", "oracle"]
    cast = result["variants"]["cast"]
    e = cast["step"]
    assert e["seeds"] == [0, 1, 2]  # seed 3 has no baseline
    assert e["d"] == pytest.approx([0.02, 0.04, 0.06])
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert e["mean"] == pytest.approx(0.04)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((0.04 - half, 0.04 + half), abs=1e-5)
    assert (e["variant_mean"], e["baseline_mean"]) == pytest.approx((0.34, 0.30))

    # mean of steps 12 and 24 per seed: baseline 0.25, 0.27, 0.26; cast 0.26, 0.31, 0.29
    m = cast["mean_steps"]
    d = [0.01, 0.04, 0.03]
    assert m["seeds"] == [0, 1, 2]
    assert m["d"] == pytest.approx(d)
    half = 4.3027 * statistics.stdev(d) / math.sqrt(3)
    assert m["mean"] == pytest.approx(0.08 / 3)
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((0.08 / 3 - half, 0.08 / 3 + half), abs=1e-5)

    # baseline first: 6 problems only cast solved, 3 only grpo
    assert cast["mcnemar"]["n"] == 15
    assert cast["mcnemar"]["difference"] == pytest.approx(0.2)
    assert cast["mcnemar"]["p_value"] == pytest.approx(2 * sum(math.comb(9, i) for i in range(4)) / 2**9)
    assert not cast["oracle"]


def test_one_seed_and_a_missing_step(runs_dir):
    result = seed_paired.analyse(runs_dir, "grpo", 24, [12, 24])
    oracle = result["variants"]["oracle"]
    assert oracle["oracle"]
    assert oracle["step"]["seeds"] == [1]
    assert oracle["step"]["d"] == pytest.approx([0.30])
    assert oracle["step"]["mean"] == pytest.approx(0.30)
    assert oracle["step"]["ci_low"] is None and oracle["step"]["ci_high"] is None
    # seed 1: [1,0,0,0,1] vs [1,1,1,1,0]: 3 only-new, 1 only-baseline
    assert oracle["mcnemar"]["difference"] == pytest.approx(0.4)
    assert oracle["mcnemar"]["p_value"] == pytest.approx(2 * 5 / 16)

    gappy = result["variants"]["gappy"]
    assert gappy["step"]["seeds"] == [0, 1, 2]
    assert gappy["step"]["d"] == pytest.approx([0.10, 0.0, 0.10])
    assert gappy["mean_steps"]["seeds"] == [0, 1]  # seed 2 has no step-12 eval
    assert gappy["mean_steps"]["d"] == pytest.approx([0.10, 0.0])
    assert gappy["mcnemar"] is None  # no eval.jsonl


def test_default_step_is_the_last_common_eval_and_no_mean_steps(runs_dir):
    result = seed_paired.analyse(runs_dir, "cast", None, None)
    assert result["step"] == 24
    assert result["mean_steps"] is None
    assert list(result["variants"]) == ["grpo", "gappy", "oracle"]
    assert result["variants"]["grpo"]["step"]["d"] == pytest.approx([-0.02, -0.04, -0.06])
    assert result["variants"]["grpo"]["mean_steps"] is None
    assert result["variants"]["grpo"]["mcnemar"]["difference"] == pytest.approx(-0.2)


def test_table_and_json(runs_dir, tmp_path, capsys):
    out_json = tmp_path / "seed.json"
    assert seed_paired.main([str(runs_dir), "--step", "24", "--mean-steps", "12", "24", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("Seed-paired differences against grpo at step 24")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"variant", "cast", "gappy", "oracle (oracle: not CAST)"}
    cells = [c.strip() for c in rows["cast"].split("|")[1:-1]]
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert cells[1] == "3"
    assert cells[2] == "s0 +0.020, s1 +0.040, s2 +0.060"
    assert cells[3] == f"+0.040 [{0.04 - half:+.3f}, {0.04 + half:+.3f}]"
    assert cells[4].startswith("+0.027 [") and cells[4].endswith("] (n 3)")
    assert cells[5] == "+0.200, p 0.508 (n 15)"
    assert cells[6] == "0.340 / 0.300"
    oracle_cells = [c.strip() for c in rows["oracle (oracle: not CAST)"].split("|")[1:-1]]
    assert oracle_cells[1] == "1" and oracle_cells[3] == "+0.300 —"
    gappy_cells = [c.strip() for c in rows["gappy"].split("|")[1:-1]]
    assert gappy_cells[4].endswith("(n 2)") and gappy_cells[5] == "—"

    saved = json.loads(out_json.read_text())
    assert saved["step"] == 24 and saved["mean_steps"] == [12, 24]
    assert saved["variants"]["cast"]["step"]["d"] == pytest.approx([0.02, 0.04, 0.06])
    assert saved["variants"]["cast"]["mean_steps"]["mean"] == pytest.approx(0.08 / 3)
    assert saved["variants"]["cast"]["mcnemar"]["n"] == 15
    assert saved["variants"]["oracle"]["step"]["ci_low"] is None


def cli(*args):
    return subprocess.run(
        [sys.executable, "scripts/seed_paired.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def test_runs_as_a_script(runs_dir):
    proc = cli(runs_dir, "--step", "24")
    assert proc.returncode == 0, proc.stderr
    assert "| cast | 3 | s0 +0.020, s1 +0.040, s2 +0.060 |" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["EMPTY"], "no runs with metrics"),
        (["MISSING"], "no such folder"),
        (["RUNS", "--baseline", "rlsd"], "baseline 'rlsd' has no runs"),
        (["RUNS", "--step", "99"], "step 99: no run has an eval"),
        (["RUNS", "--step", "24", "--mean-steps", "12", "36"], "step 36: no run has an eval"),
        (["RUNS", "--step", "twelve"], "invalid int value"),
        (["RUNS", "--json", "BADJSON"], "--json"),
    ],
)
def test_errors_are_one_line_and_exit_2(runs_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    where = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "RUNS": runs_dir}
    where["BADJSON"] = tmp_path / "missing" / "out.json"
    proc = cli(*[where.get(a, a) for a in args])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

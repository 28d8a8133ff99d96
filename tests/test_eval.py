"""Evaluation: the pass@k / maj@k / bootstrap helpers, the summary, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cast_mlx.cli import eval as eval_cli
from cast_mlx.training import eval_stats as stats
from cast_mlx.training import evaluation as ev

from helpers import run_cli, tiny_checkpoint

# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 3, 0.0),  # nothing correct
        (5, 3, 3, 1.0),  # n - c = 2 < k = 3: every 3-subset holds a correct one
        (4, 4, 1, 1.0),
        (10, 1, 5, 0.5),  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert stats.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_subset_enumeration():
    """The estimator is the share of k-subsets of the n samples with a correct one."""
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                share = sum(any(s) for s in subsets) / len(subsets)
                assert stats.pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        stats.pass_at_k(n, c, k)


# --------------------------------------------------------------------------- maj@k


def test_majority_vote_picks_the_most_common_answer_by_value():
    # "7", "7.00" and "$7" are one answer (exact value 7): 3 votes against 2 for "5"
    assert stats.majority_vote(["5", "7", "5", "7.00", "$7"]) == 1


def test_majority_vote_tie_goes_to_the_answer_seen_first():
    # 2 votes each: "4" (first at index 1) beats "3" (first at index 2)
    assert stats.majority_vote([None, "4", "3", "3", "4.0"]) == 1
    assert stats.majority_vote(["3", "4", "4", "3"]) == 0
    assert stats.majority_vote(["x + 1", "1+x"]) == 0  # different text, 1 vote each


def test_majority_vote_ignores_missing_answers():
    assert stats.majority_vote([None, None, "12"]) == 2
    assert stats.majority_vote([None, None]) is None
    assert stats.majority_vote([]) is None


def test_answer_key_groups_equal_numbers_but_not_percent():
    assert stats.answer_key("1,000") == stats.answer_key("1000.0")
    assert stats.answer_key("3/4") == stats.answer_key("0.75")
    assert stats.answer_key("50%") != stats.answer_key("50")
    assert stats.answer_key("x + 1") == stats.answer_key("x+1")
    assert stats.answer_key(None) is None


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_deterministic_by_seed_and_contains_the_mean():
    rng = np.random.default_rng(7)
    values = (rng.random(200) < 0.3).astype(float)
    a = stats.bootstrap_ci(values, seed=3)
    assert a == stats.bootstrap_ci(values, seed=3)
    scores = rng.random(50)  # continuous values: another seed moves the quantiles
    assert stats.bootstrap_ci(scores, seed=3) == stats.bootstrap_ci(scores, seed=3)
    assert stats.bootstrap_ci(scores, seed=3) != stats.bootstrap_ci(scores, seed=4)
    low, high = a
    assert low < values.mean() < high
    # the 95% interval of a proportion near 0.3 with 200 items is about +-0.065
    assert 0.09 < high - low < 0.16


def test_bootstrap_ci_of_constant_values_is_a_point():
    assert stats.bootstrap_ci([1.0] * 10, seed=0) == (1.0, 1.0)


def test_bootstrap_ci_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_ci([], seed=0)


# --------------------------------------------------------------------------- summary


def _completion(answer, correct):
    return stats.Completion(text=f"#### {answer}", answer=answer, strict=correct, lenient=correct, finish="eos")


def test_summarize_from_per_problem_results():
    # problem 1: greedy right, samples 2/3 right, majority "4" right
    # problem 2: greedy wrong, samples 1/3 right, majority "9" wrong
    p1 = stats.ProblemResult(
        "a",
        "2+2",
        "4",
        _completion("4", True),
        [_completion("4", True), _completion("5", False), _completion("4", True)],
    )
    p2 = stats.ProblemResult(
        "b",
        "3+3",
        "6",
        _completion("9", False),
        [_completion("9", False), _completion("6", True), _completion("9", False)],
    )
    for p in (p1, p2):
        p.majority = stats.majority_vote([c.answer for c in p.samples])
    summary = stats.summarize([p1, p2], k=3, seed=0)
    assert set(summary) == {"greedy/strict", "greedy/lenient", "mean@3", "pass@3", "maj@3"}
    assert summary["greedy/lenient"].value == pytest.approx(0.5)
    assert summary["mean@3"].value == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert summary["pass@3"].value == pytest.approx(1.0)
    assert summary["maj@3"].value == pytest.approx(0.5)
    for m in summary.values():
        assert m.ci_low <= m.value <= m.ci_high
    d = p2.to_dict()
    assert d["n_correct"] == 1 and d["majority_answer"] == "9" and d["majority_correct"] is False


def test_decode_completions_drops_the_final_eos_only():
    from cast_mlx.engine.rollout import decode_completions

    tokenizer = SimpleNamespace(decode=lambda ids: "|".join(map(str, ids)))
    rollout = SimpleNamespace(
        tokens=np.array([[5, 6, 2, 0], [7, 8, 9, 2]]), lengths=np.array([3, 4]), finish_reasons=["eos", "length"]
    )
    assert decode_completions(tokenizer, rollout) == ["5|6", "7|8|9|2"]


# --------------------------------------------------------------------------- adapters / args


def _fake_run(tmp_path: Path, answer_format="boxed") -> Path:
    run = tmp_path / "run"
    ckpt = tiny_checkpoint(run, 4, "t")  # every file a checkpoint has, readable
    (ckpt / "recipe.yaml").write_text(
        f"name: t\ndata:\n  task: arithmetic\n  level: 2\n  answer_format: {answer_format}\n"
    )
    return run


def test_adapter_resolves_from_run_dir_checkpoints_dir_or_checkpoint(tmp_path):
    run = _fake_run(tmp_path)
    ckpt = run / "checkpoints" / "step_000004"
    for given in (run, run / "checkpoints", ckpt):
        assert ev.resolve_adapter(str(given)) == ckpt


def test_adapter_recipe_sets_the_prompt_defaults(tmp_path):
    run = _fake_run(tmp_path)
    args = eval_cli.build_parser().parse_args(["--task", "arithmetic", "--adapter", str(run)])
    s = eval_cli.resolve_args(args)
    assert s["answer_format"] == "boxed" and s["level"] == 2 and s["n"] == 200
    assert s["out"] == str(run / "eval-arithmetic-test.json")
    args = eval_cli.build_parser().parse_args(
        ["--task", "arithmetic", "--adapter", str(run), "--answer-format", "hash", "--level", "3"]
    )
    s = eval_cli.resolve_args(args)
    assert s["answer_format"] == "hash" and s["level"] == 3


# --------------------------------------------------------------------------- paired comparison


@pytest.mark.parametrize(
    "only_new, only_baseline, expected",
    [
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 2 * P(X <= 2), X ~ Binomial(12, 1/2)
        (5, 0, 2 / 32),
        (0, 5, 2 / 32),
        (3, 3, 1.0),  # capped at 1
        (0, 0, 1.0),
    ],
)
def test_mcnemar_exact_hand_computed(only_new, only_baseline, expected):
    assert stats.mcnemar_exact(only_new, only_baseline) == pytest.approx(expected)


def test_paired_comparison_counts_and_interval():
    p = stats.paired_comparison([True, True, False, False, False], [True, False, True, True, False])
    assert (p.n, p.both, p.only_new, p.only_baseline, p.neither) == (5, 1, 2, 1, 1)
    assert p.difference == pytest.approx(0.2)
    half = 1.96 * math.sqrt((3 / 5 - 0.2**2) / 5)
    assert (p.ci_low, p.ci_high) == pytest.approx((0.2 - half, 0.2 + half))
    assert p.p_value == pytest.approx(stats.mcnemar_exact(2, 1)) and p.p_value == 1.0
    same = stats.paired_comparison([True, False], [True, False])
    assert same.difference == 0 and same.ci_low == same.ci_high == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        stats.paired_comparison([True], [True, False])


# --------------------------------------------------------------------------- CLI


@pytest.mark.model  # runs the model (or mlx.launch) in subprocesses
def test_cli_greedy_accuracy_matches_its_per_problem_json(tmp_path):
    out = tmp_path / "eval.json"
    r = run_cli(
        "-m",
        "cast_mlx.eval",
        "--model",
        "smollm2-135m-instruct",
        "--task",
        "arithmetic",
        "--n",
        "5",
        "--max-new-tokens",
        "48",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    problems = result["problems"]
    assert len(problems) == 5 and result["settings"]["n_problems"] == 5
    for key in ("strict", "lenient"):
        recomputed = sum(p["greedy"][key] for p in problems) / len(problems)
        assert result["summary"][f"greedy/{key}"]["value"] == pytest.approx(recomputed)
    lenient = result["summary"]["greedy/lenient"]
    assert lenient["ci_low"] <= lenient["value"] <= lenient["ci_high"]
    assert all(p["greedy"]["text"] and "<|im_end|>" not in p["greedy"]["text"] for p in problems)
    assert "greedy/lenient" in r.stdout  # the table


def test_baseline_must_hold_the_same_problems_in_order():
    base = {"a": {}, "b": {}}
    stats.check_same_problems(base, ["a", "b"], "f.json")
    for ids, words in [
        (["a"], "it holds 2 problems, this eval 1"),
        (["a", "c"], "problem 'c' of this eval is not in it"),
        (["b", "a"], "its problems come in another order"),
    ]:
        with pytest.raises(ev.UsageError, match=f"--baseline f.json: {words}"):
            stats.check_same_problems(base, ids, "f.json")


@pytest.mark.model  # runs the model (or mlx.launch) in subprocesses
def test_cli_paired_comparison_against_a_baseline(tmp_path):
    common = [
        "-m",
        "cast_mlx.eval",
        "--model",
        "smollm2-135m-instruct",
        "--task",
        "arithmetic",
        "--max-new-tokens",
        "24",
    ]
    base = tmp_path / "base.json"
    assert run_cli(*common, "--n", "4", "--out", str(base)).returncode == 0
    again = tmp_path / "again.json"
    r = run_cli(*common, "--n", "4", "--out", str(again), "--baseline", str(base))
    assert r.returncode == 0, r.stderr
    paired = json.loads(again.read_text())["paired"]
    lenient = paired["greedy/lenient"]  # greedy decoding is deterministic: nothing changes
    assert lenient["n"] == 4 and lenient["only_new"] == lenient["only_baseline"] == 0
    assert lenient["difference"] == 0 and lenient["p_value"] == 1.0
    solved = sum(p["greedy"]["lenient"] for p in json.loads(base.read_text())["problems"])
    assert lenient["both"] == solved and lenient["neither"] == 4 - solved
    assert "McNemar exact p = 1.0000" in r.stdout
    # a baseline on other problems is refused before any model is loaded, nothing is written
    other = tmp_path / "other.json"
    r = run_cli(*common, "--n", "5", "--out", str(other), "--baseline", str(base), timeout=120)
    assert r.returncode == 2 and not other.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --baseline {base}: it holds 4 problems, this eval 5"), (
        r.stderr
    )


@pytest.mark.parametrize(
    "args,words",
    [
        (["--task", "chess"], "--task 'chess'"),
        (["--task", "arithmetic", "--n", "0"], "--n must be >= 1"),
        (["--task", "arithmetic", "--adapter", "/nonexistent/run"], "--adapter /nonexistent/run"),
        (["--task", "arithmetic", "--k", "4", "--temperature", "0"], "--temperature > 0"),
        (["--task", "arithmetic", "--n", "many"], "invalid int value"),
        (["--n", "3"], "--task"),
        (["--task", "arithmetic", "--baseline", "/nonexistent.json"], "--baseline /nonexistent.json: no such file"),
        (["--task", "arithmetic", "--baseline", __file__], "not a cast_mlx.eval result"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, words):
    r = run_cli("-m", "cast_mlx.eval", *args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


@pytest.mark.slow
def test_evaluate_with_samples_on_the_embedded_model(smol):
    from cast_mlx.tasks import data

    model, tokenizer = smol
    problems = data.load_task("arithmetic", "test", n=3, level=1)
    kw = dict(k=3, temperature=1.0, max_new_tokens=24, seed=1)
    result = ev.evaluate(model, tokenizer, problems, **kw)
    assert set(result.summary) == {"greedy/strict", "greedy/lenient", "mean@3", "pass@3", "maj@3"}
    assert all(len(p.samples) == 3 for p in result.problems)
    c = [p.n_correct for p in result.problems]
    assert result.summary["mean@3"].value == pytest.approx(sum(c) / 9)
    assert result.summary["pass@3"].value == pytest.approx(sum(x > 0 for x in c) / 3)
    again = ev.evaluate(model, tokenizer, problems, **kw)  # deterministic by seed
    assert [s.text for p in again.problems for s in p.samples] == [s.text for p in result.problems for s in p.samples]

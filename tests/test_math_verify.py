"""The `math_verify` reward built-in (cast_mlx/tasks/verify/mathverify.py): math-verify in the
worker pool under `reward.timeout`, the install message when it is missing, and the
classification of scripts/verify_agreement.py."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from cast_mlx.config import ConfigError, RewardConfig
from cast_mlx.tasks.rewards import RewardError, parse_functions, score
from cast_mlx.tasks.verify import TimeoutPool, Verdict, mathverify

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import verify_agreement as va  # noqa: E402


def run_score(fns, completions, answers, pool, timeout=10.0):
    n = len(completions)
    return score(
        fns,
        completions=completions,
        prompts=[""] * n,
        answers=answers,
        columns={},
        pool_or_verifier=pool,
        answer_format="hash",
        strictness="lenient",
        max_new_tokens=32,
        buffer=8,
        threshold=0.5,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pool():
    p = TimeoutPool(workers=1, timeout=2.0)
    yield p
    p.close()


def fake_math_verify(folder: Path, body: str) -> None:
    """A stand-in `math_verify` package that spawned workers import first (sys.path)."""
    package = folder / "math_verify"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(body))


# ---- the real package ------------------------------------------------------------------


def test_hand_cases_in_the_worker(pool):
    pytest.importorskip("math_verify")
    fns = parse_functions(RewardConfig(functions=["math_verify"]))
    completions = [
        "Step 1: 40 + 2.\n#### 42",
        "The total is 42.0",
        "So the answer is $\\boxed{\\frac{3}{4}}$.",
        "so 3/4 of them, #### 0.75",
        "#### 41",
        "no number at all",
    ]
    answers = ["42", "42", "0.75", "\\frac{3}{4}", "42", "42"]
    result = run_score(fns, completions, answers, pool)
    assert result.values == {"math_verify": [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]}
    assert result.verdicts is None  # our verifier did not run
    assert result.correct == [True, True, True, True, False, False]


def test_an_unreadable_gold_drops_the_row(pool):
    pytest.importorskip("math_verify")
    assert mathverify.judge("#### 1", "") == ("ok", None, None)
    assert mathverify.judge("#### 7", "7") == ("ok", 1.0, "7")


def test_the_recipe_names_it():
    pytest.importorskip("math_verify")
    for answer_format in ("hash", "none"):  # it reads the whole completion: no marker needed
        (fn,) = parse_functions(RewardConfig(functions=["math_verify"]), answer_format=answer_format)
        assert (fn.name, fn.kind) == ("math_verify", "builtin")
    fns = parse_functions(RewardConfig(functions=["math", "math_verify"], weights=[1.0, 0.5]))
    assert [f.name for f in fns] == ["math", "math_verify"]


# ---- without the package, and a slow one -------------------------------------------------


def test_missing_package_is_a_recipe_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
    with pytest.raises(ConfigError) as err:
        parse_functions(RewardConfig(functions=["format", "math_verify"]))
    message = str(err.value)
    assert message.startswith("reward.functions[1]: 'math_verify' needs the math-verify package")
    assert "pip install 'cast-mlx[math-verify]'" in message and "\n" not in message


def test_a_call_past_the_timeout_counts_wrong(tmp_path, monkeypatch):
    fake_math_verify(
        tmp_path,
        """
        import time

        def parse(text, **kwargs):
            if "slow" in text:
                time.sleep(60)
            return [text.strip("$# "), text]

        def verify(gold, answer, **kwargs):
            return bool(answer) and gold[0] == answer[0]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned worker's path starts with it
    slow_pool = TimeoutPool(workers=1, timeout=2.0)
    try:
        fns = [mathverify_fn()]
        result = run_score(fns, ["#### 5", "#### slow 5", "#### 6"], ["5", "5", "5"], slow_pool, timeout=1.0)
        assert result.values["math_verify"] == [1.0, 0.0, 0.0]
        assert slow_pool.timeouts == 1  # killed at reward.timeout, and replaced for the next call
    finally:
        slow_pool.close()


def test_a_failed_import_in_the_worker_stops_the_run(tmp_path, monkeypatch):
    fake_math_verify(tmp_path, "raise ImportError('antlr4 is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = TimeoutPool(workers=1, timeout=2.0)
    try:
        with pytest.raises(RewardError, match="'math_verify': math-verify failed to import in a worker: ImportError"):
            run_score([mathverify_fn()], ["#### 5"], ["5"], broken)
    finally:
        broken.close()


def mathverify_fn():
    """The parsed entry, built by hand: `parse_functions` would import the real package."""
    from cast_mlx.tasks.rewards import RewardFn

    return RewardFn(name="math_verify", spec="math_verify", weight=1.0, kind="builtin")


def test_its_own_alarms_fit_in_the_pools_limit():
    assert [mathverify.inner_timeout(t) for t in (0.5, 3.0, 10.0, 30.0)] == [1, 1, 3, 10]


# ---- scripts/verify_agreement.py ---------------------------------------------------------


def record(completion, gold, *, strict, lenient, ours_strict, ours_lenient, mv, mv_answer, source="samples"):
    r = va.Record(source, "hand", completion, gold)
    v = Verdict(strict=strict, lenient=lenient, pred=ours_lenient)
    r.ours = {"lenient": v, "strict": v}
    r.ours_answer = {"lenient": ours_lenient, "strict": ours_strict}
    r.mv, r.mv_answer = mv, mv_answer
    return r


def test_the_study_classifies_hand_records():
    both = record(
        "#### 42", "42", strict=True, lenient=True, ours_strict="42", ours_lenient="42", mv=1.0, mv_answer="42"
    )
    restated = record(
        "To calculate 47 + 1, add them.", "48",
        strict=False, lenient=False, ours_strict=None, ours_lenient="1", mv=1.0, mv_answer="1 + 47",
    )  # fmt: skip
    rambled = record(
        "The answer is 15. Then 8! / 4 = 120.", "15",
        strict=False, lenient=False, ours_strict=None, ours_lenient="120", mv=1.0, mv_answer="15",
    )  # fmt: skip
    anchored = record(
        "47 + 1 = 48. The answer is the sum of 47 and 1, 48.", "48",
        strict=False, lenient=True, ours_strict=None, ours_lenient="48", mv=0.0, mv_answer="47",
    )  # fmt: skip
    records = [both, restated, rambled, anchored]
    counts = va.count(records)["samples"]
    assert counts["lenient"] == {
        "agree_correct": 1, "agree_wrong": 0, "ours_only": 1, "mv_only": 2, "ours_no_gold": 0, "mv_no_gold": 0,
    }  # fmt: skip
    assert counts["strict"]["mv_only"] == 2 and counts["strict"]["agree_wrong"] == 1
    found = va.classes(records)
    assert found[("samples", "lenient", f"mv_only: {va.EXPRESSION}")] == [restated]
    assert found[("samples", "lenient", f"mv_only: {va.OTHER}")] == [rambled]
    assert found[("samples", "lenient", f"ours_only: {va.OTHER}")] == [anchored]
    assert found[("samples", "strict", f"mv_only: {va.NO_MARKER}")] == [restated, rambled]
    assert va.outcome(None, 1.0) == "ours_no_gold" and va.outcome(True, None) == "mv_no_gold"

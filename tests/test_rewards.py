"""Reward plug-ins (issue #17): built-ins by hand, weighted sums, plug-ins in worker
processes (by file and by module), and every failure mode as a one-line `RewardError`."""

from __future__ import annotations

import math
import statistics
import textwrap
import time

import pytest

from cast_mlx.config import ConfigError, RewardConfig
from cast_mlx.errors import TrainingError
from cast_mlx.tasks.rewards import (
    RewardError,
    RewardFn,
    format_reward,
    metrics_of,
    overlong_penalty,
    parse_functions,
    score,
    weighted_sum,
)
from cast_mlx.tasks.verify import TimeoutPool, Verifier

L, B = 32, 8  # sampling.max_new_tokens, reward.overlong_buffer in these tests


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=1, timeout=2.0)
    yield v
    v.close()


def fns_of(*specs: str, weights=None, answer_format=None) -> list[RewardFn]:
    return parse_functions(RewardConfig(functions=list(specs), weights=weights), answer_format=answer_format)


def run(fns, completions, verifier, *, answers=None, columns=None, threshold=0.5, timeout=10.0, strictness="lenient"):
    n = len(completions)
    if columns is None:
        columns = {"questions": ["q"] * n, "lengths": [5] * n, "truncated": [False] * n}
    return score(
        fns,
        completions=completions,
        prompts=[f"prompt {i}" for i in range(n)],
        answers=answers or ["42"] * n,
        columns=columns,
        pool_or_verifier=verifier,
        answer_format="hash",
        strictness=strictness,
        max_new_tokens=L,
        buffer=B,
        threshold=threshold,
        timeout=timeout,
    )


def plugin_file(tmp_path, body: str, name: str = "plug.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---- parsing -----------------------------------------------------------------------------


def test_parse_builtins_with_default_and_given_weights():
    assert parse_functions(RewardConfig()) == []
    fns = fns_of("math", "format", "overlong")
    assert [(f.name, f.kind, f.weight) for f in fns] == [("math", "builtin", 1.0), ("format", "builtin", 1.0)] + [
        ("overlong", "builtin", 1.0)
    ]
    assert [f.weight for f in fns_of("math", "format", weights=[1, 0.25])] == [1.0, 0.25]


def test_parse_plugins_by_relative_file_and_module(tmp_path, monkeypatch):
    plugin_file(tmp_path, "def reward(completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "parse_mod_a.py").write_text("def reward(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    file_fn, module_fn = fns_of("plug.py:reward", "parse_mod_a:reward")
    assert (file_fn.kind, file_fn.target) == ("plugin", f"{tmp_path.resolve() / 'plug.py'}:reward")
    assert (module_fn.target, module_fn.name) == ("parse_mod_a:reward", "reward_1")  # names kept apart


@pytest.mark.parametrize(
    "specs, weights, match",
    [
        (["maths"], None, r"reward\.functions\[0\]: unknown built-in reward 'maths'"),
        (["math", ""], None, r"reward\.functions\[1\]: expected a built-in"),
        (["mod:"], None, r"reward\.functions\[0\]: 'mod:' is malformed"),
        ([":fn"], None, r"reward\.functions\[0\]: ':fn' is malformed"),
        (["my mod:fn"], None, r"'my mod' is not a module name"),
        (["dir/rewards.txt:fn"], None, r"a file plug-in names a \.py file"),
        (["nowhere/missing.py:fn"], None, r"reward\.functions\[0\]: file 'nowhere/missing.py' does not exist"),
        (["no_such_module_for_rewards:fn"], None, r"cannot load .*ModuleNotFoundError: No module named"),
        (["math", "math"], None, r"reward\.functions\[1\]: 'math' is listed twice \(also \[0\]\)"),
        (["math", "format"], [1.0], r"reward\.weights: 1 weights for 2 reward\.functions"),
        (["math"], [float("nan")], r"reward\.weights\[0\]: must be a finite number, got nan"),
        (["math"], [float("inf")], r"reward\.weights\[0\]: must be a finite number"),
    ],
)
def test_parse_errors_are_one_line_and_name_the_field(specs, weights, match):
    with pytest.raises(ConfigError, match=match) as info:
        fns_of(*specs, weights=weights)
    assert "\n" not in str(info.value)


def test_parse_import_checks_plugins(tmp_path):
    body = "import math\nnot_a_function = 3\ndef reward(completions, **kw):\n    return []\n"
    path = plugin_file(tmp_path, body)
    with pytest.raises(
        ConfigError, match=r"reward\.functions\[0\]: cannot load .*AttributeError: .* no function 'rewrd'"
    ):
        fns_of(f"{path}:rewrd")
    with pytest.raises(ConfigError, match=r"TypeError: .*is a int, not a function"):
        fns_of(f"{path}:not_a_function")
    broken = plugin_file(tmp_path, "raise RuntimeError('no GPU here\\nmore')\n", "broken.py")
    with pytest.raises(ConfigError, match=r"cannot load .*RuntimeError: no GPU here$"):
        fns_of(f"{broken}:reward")


def test_answer_format_none_refuses_marker_builtins():
    with pytest.raises(ConfigError, match=r"reward\.functions\[1\]: 'format' reads the answer .* none"):
        fns_of("overlong", "format", answer_format="none")
    assert [f.name for f in fns_of("overlong", answer_format="none")] == ["overlong"]


# ---- built-ins -------------------------------------------------------------------------


def test_format_reward_on_hash_and_boxed():
    assert format_reward("so #### 42", "hash") == 1.0
    assert format_reward("so ####", "hash") == 0.0  # a marker with nothing after it is no answer
    assert format_reward("so \\boxed{42}", "hash") == 0.0
    assert format_reward("so \\boxed{42}", "boxed") == 1.0
    assert format_reward("so \\boxed{42", "boxed") == 0.0  # cut off: unbalanced
    assert format_reward("so #### 42", "boxed") == 0.0


def test_overlong_penalty_in_its_three_regions():
    penalty = [overlong_penalty(n, False, max_new_tokens=L, buffer=B) for n in (1, 24, 25, 26, 28, 32)]
    assert penalty == [0.0, 0.0, -0.125, -0.25, -0.5, -1.0]
    assert overlong_penalty(L, True, max_new_tokens=L, buffer=B) == -1.0


def test_math_strict_lenient_and_the_recipe_strictness(verifier):
    fns = fns_of("math", "math_strict", "math_lenient")
    completions = ["The answer is 42.", "#### 42", "#### 41"]
    lenient = run(fns, completions, verifier)
    assert lenient.values == {"math": [1.0, 1.0, 0.0], "math_strict": [0.0, 1.0, 0.0], "math_lenient": [1.0, 1.0, 0.0]}
    assert [(v.strict, v.lenient) for v in lenient.verdicts] == [(False, True), (True, True), (False, False)]
    assert run(fns_of("math"), completions, verifier, strictness="strict").values["math"] == [0.0, 1.0, 0.0]


def test_builtins_through_score_weighted_sum_threshold_and_metrics(verifier):
    fns = fns_of("math_lenient", "format", "overlong", weights=[1.0, 0.5, 2.0])
    completions = ["#### 42", "42", "#### 41", "#### 42"]
    columns = {"lengths": [3, 28, 5, 32], "truncated": [False, False, False, True]}
    result = run(fns, completions, verifier, columns=columns, threshold=1.2)
    assert result.values == {
        "math_lenient": [1.0, 1.0, 0.0, 1.0],
        "format": [1.0, 0.0, 1.0, 1.0],
        "overlong": [0.0, -0.5, 0.0, -1.0],
    }
    assert result.rewards == [1.5, 0.0, 0.5, -0.5]
    assert result.correct == [True, False, False, False]
    assert result.dropped == [False] * 4
    metrics = metrics_of(result.judged())
    assert metrics["rewards/format/mean"] == 0.75
    assert metrics["rewards/overlong/std"] == pytest.approx(statistics.stdev([0.0, -0.5, 0.0, -1.0]))
    assert set(metrics) == {f"rewards/{n}/{s}" for n in ("math_lenient", "format", "overlong") for s in ("mean", "std")}


def test_an_unparseable_gold_drops_the_row(verifier):
    result = run(fns_of("math", "format"), ["#### 1", "#### 42"], verifier, answers=["x = ?", "42"])
    assert result.rewards == [None, 2.0]
    assert result.dropped == [True, False]
    assert result.correct == [False, True]
    assert metrics_of(result.judged())["rewards/format/mean"] == 1.0  # over the judged row only
    assert weighted_sum([1.0, None], [1.0, 0.0]) is None  # even at weight 0


# ---- plug-ins in the workers -----------------------------------------------------------


def test_a_plugin_file_runs_in_a_worker_with_the_batch_columns(tmp_path, verifier):
    path = plugin_file(
        tmp_path,
        """
        import os

        def reward(completions, *, prompts, answers, questions, lengths, truncated, **kwargs):
            assert len(prompts) == len(answers) == len(questions) == len(completions)
            return [float(a in c) + n / 100 for c, a, n in zip(completions, answers, lengths)]

        def pid(completions, **kwargs):
            return [os.getpid()] * len(completions)
        """,
    )
    fns = fns_of(f"{path}:reward", f"{path}:pid", weights=[1.0, 0.0])
    result = run(fns, ["#### 42", "#### 7"], verifier)
    assert result.values["reward"] == [1.05, 0.05]
    assert result.rewards == [1.05, 0.05]
    assert result.correct == [True, False]
    assert result.values["pid"][0] in verifier.worker_pids  # not this process


def test_a_plugin_module_runs_in_a_worker(tmp_path, monkeypatch, verifier):
    run([RewardFn("math", "math", 1.0, "builtin")], ["#### 42"], verifier)  # a worker started before the path
    (tmp_path / "reward_mod_b.py").write_text(
        "import numpy as np\ndef lengthy(completions, **kw):\n    return np.array([len(c) for c in completions])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run(fns_of("reward_mod_b:lengthy"), ["abc", "#### 42"], verifier)
    assert result.values["lengthy"] == [3.0, 7.0]  # a NumPy array will do


def test_none_from_a_plugin_drops_the_row(tmp_path, verifier):
    path = plugin_file(
        tmp_path, "def some(completions, **kw):\n    return [None if '?' in c else 1 for c in completions]\n"
    )
    result = run(fns_of("format", f"{path}:some"), ["#### 42", "#### ?"], verifier)
    assert result.values["some"] == [1.0, None]
    assert result.rewards == [2.0, None]
    assert result.dropped == [False, True]


@pytest.mark.parametrize(
    "body, match",
    [
        ("raise ValueError('bad row\\nsecond line')", r"reward function '.*plug\.py:fn' raised ValueError: bad row$"),
        ("return [1.0]", r"reward function '.*:fn' returned 1 values for 3 completions"),
        ("return [1.0, float('nan'), 0.0]", r"reward function '.*:fn' returned nan at row 1; rewards must be finite"),
        (
            "return [1.0, 0.0, '1.0']",
            r"reward function '.*:fn' returned a str at row 2 \('1\.0'\); rewards are numbers",
        ),
        ("return 1.0", r"reward function '.*:fn' returned a float; expected a list of 3"),
        ("import sys; sys.exit(3)", r"raised SystemExit: 3"),
        ("return [object()] * 3", r"returned a object at row 0"),  # unpicklable: checked in the worker
    ],
)
def test_a_failing_plugin_raises_a_one_line_reward_error(tmp_path, verifier, body, match):
    path = plugin_file(tmp_path, f"def fn(completions, **kwargs):\n    {body}\n")
    with pytest.raises(RewardError, match=match) as info:
        run(fns_of(f"{path}:fn"), ["a", "b", "c"], verifier)
    assert isinstance(info.value, TrainingError) and "\n" not in str(info.value)


def test_a_hanging_plugin_is_stopped_at_the_timeout(tmp_path, verifier):
    path = plugin_file(tmp_path, "import time\ndef fn(completions, **kwargs):\n    time.sleep(60)\n")
    fns = fns_of(f"{path}:fn")
    run(fns_of("math"), ["#### 42"], verifier)  # start the worker outside the timing
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"'.*:fn' gave no result within reward\.timeout = 1s and was stopped"):
        run(fns, ["a"], verifier, timeout=1.0)
    assert time.monotonic() - start < 8
    assert run(fns_of("format"), ["#### 1"], verifier).rewards == [1.0]  # the verifier still works


def test_a_plugin_file_gone_after_parsing_fails_to_load_in_the_worker(tmp_path, verifier):
    path = plugin_file(tmp_path, "def fn(completions, **kwargs):\n    return [0.0] * len(completions)\n", "gone.py")
    fns = fns_of(f"{path}:fn")
    (tmp_path / "gone.py").unlink()
    with pytest.raises(RewardError, match=r"'.*gone\.py:fn' failed to load in a worker: FileNotFoundError"):
        run(fns, ["a"], verifier)


def test_a_bare_pool_runs_plugins_and_a_poolless_verifier_refuses_them(tmp_path):
    path = plugin_file(tmp_path, "def fn(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    pool = TimeoutPool(workers=1, timeout=2.0)
    try:
        assert run(fns_of(f"{path}:fn"), ["a", "b"], pool).rewards == [0.5, 0.5]
    finally:
        pool.close()
    with pytest.raises(ValueError, match="reward plug-ins run in worker processes"):
        run(fns_of(f"{path}:fn"), ["a"], Verifier(workers=0))
    assert math.isclose(run(fns_of("format"), ["#### 1"], Verifier(workers=0)).rewards[0], 1.0)


def test_a_pool_run_may_set_its_own_timeout():
    pool = TimeoutPool(workers=1, timeout=30.0)
    try:
        assert pool.run([(abs, (-2,))]) == [2]  # start the worker outside the timing
        start = time.monotonic()
        assert pool.run([(time.sleep, (30,)), (abs, (-3,))], default="late", timeout=0.5) == ["late", 3]
        assert time.monotonic() - start < 8
        with pytest.raises(ValueError, match="timeout > 0"):
            pool.run([(abs, (-1,))], timeout=0)
    finally:
        pool.close()

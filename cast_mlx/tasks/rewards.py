"""Reward functions: the built-ins and the plug-ins that `reward.functions` names, their
weighted sum and correctness threshold, and the rewards stage of a training step
(`judge_rows`). What the workers run for a plug-in (importing, calling, checking what it
returns): `reward_plugins`. The plug-in convention: docs/howto-reward-plugin.md."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cast_mlx.config import ConfigError, RewardConfig
from cast_mlx.tasks import reward_plugins, verify
from cast_mlx.tasks.reward_plugins import RewardError, describe, load_plugin
from cast_mlx.tasks.verify import TimeoutPool, Verdict, Verifier, mathverify
from cast_mlx.tasks.verify.extract import extract_answer

BUILTINS = ("math", "math_strict", "math_lenient", "format", "overlong", mathverify.NAME)
_MATH_MODES = {"math_strict": "strict", "math_lenient": "lenient"}  # `math`: the caller's strictness
_VERIFIER = ("math", "math_strict", "math_lenient")  # our verifier's built-ins: one verify_batch
_NEEDS_MARKER = ("math", "math_strict", "math_lenient", "format")  # they read the answer after its marker
_SPEC_FORMS = "a built-in (" + ", ".join(BUILTINS) + "), module:function or path/to/file.py:function"
_RESERVED = ("completions", "prompts", "answers")  # keywords that `score` fills itself
# Importing a plug-in (once per worker) may take far longer than a call, e.g. one that
# imports a large library: it gets its own limit so that its first call is not timed out.
LOAD_TIMEOUT = 60.0


@dataclass(frozen=True)
class RewardFn:
    """One entry of `reward.functions`, parsed and checked."""

    name: str  # display name, unique in the list: the metrics are rewards/<name>/mean and /std
    spec: str  # as the recipe wrote it; error messages name it
    weight: float
    kind: Literal["builtin", "plugin"]
    target: str = ""  # plug-ins: what a worker loads, "module:function" or "/abs/file.py:function"


@dataclass(frozen=True)
class RewardResult:
    """Per completion: the weighted sum (None: dropped), correctness and every function's value."""

    rewards: list[float | None]  # the weighted sum; None where a function returned None
    correct: list[bool]  # reward >= threshold; False where dropped
    dropped: list[bool]  # reward is None: the row carries no loss
    values: dict[str, list[float | None]]  # by RewardFn.name, unweighted, in the recipe's order
    verdicts: list[Verdict | None] | None  # the math built-ins' verdicts; None when none ran

    def judged(self) -> dict[str, list[float]]:
        """Every function's values, NaN where the row was not judged (dropped, or None)."""
        return {
            name: [math.nan if dropped or v is None else v for v, dropped in zip(column, self.dropped)]
            for name, column in self.values.items()
        }


def metrics_of(judged: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """`rewards/<name>/mean` and `rewards/<name>/std` (TRL's names) over the judged rows
    (`RewardResult.judged`; in a data-parallel step, gathered from every rank)."""
    out: dict[str, float] = {}
    for name, column in judged.items():
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean_std([v for v in column if not math.isnan(v)])
    return out


# ---- parsing (before any model loads) ---------------------------------------------------


def parse_functions(cfg: RewardConfig, *, answer_format: str | None = None) -> list[RewardFn]:
    """The recipe's reward functions, checked: built-in names, files, imports, weights.

    Plug-ins are imported here (so a typo fails before the model loads). With
    `answer_format` (the recipe's `data.answer_format`), built-ins that read the answer
    after its marker are refused for `none`. An empty list gives []: the caller keeps the
    plain verifier path. Raises `ConfigError` naming `reward.functions[i]` or `reward.weights`.
    """
    weights = _weights(cfg.weights, len(cfg.functions))
    fns: list[RewardFn] = []
    for i, (spec, weight) in enumerate(zip(cfg.functions, weights)):
        where = f"reward.functions[{i}]"
        if spec in cfg.functions[:i]:
            first = cfg.functions.index(spec)
            raise ConfigError(f"{where}: {spec!r} is listed twice (also [{first}]); list it once and set its weight")
        kind, target, name = parse_spec(spec, where)
        if kind == "builtin":
            _check_builtin(name, answer_format, where)
        else:
            _import_check(spec, target, where)
        if any(fn.name == name for fn in fns):
            name = f"{name}_{i}"  # two plug-ins called e.g. `reward`: keep their metrics apart
        fns.append(RewardFn(name=name, spec=spec, weight=weight, kind=kind, target=target))
    return fns


def parse_spec(spec: object, where: str) -> tuple[Literal["builtin", "plugin"], str, str]:
    """(kind, target, name) of one spec; `target` is what a worker loads ("" for built-ins)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}: expected {_SPEC_FORMS}, got {spec!r}")
    if ":" not in spec:
        if spec not in BUILTINS:
            raise ConfigError(f"{where}: unknown built-in reward {spec!r}; expected {_SPEC_FORMS}")
        return "builtin", "", spec
    location, attr = spec.rsplit(":", 1)  # the last colon: a Windows path has one too
    if not location or not attr.isidentifier():
        raise ConfigError(f"{where}: {spec!r} is malformed; expected module:function or path/to/file.py:function")
    if reward_plugins.is_file_target(location):
        path = Path(location)
        if path.suffix != ".py":
            raise ConfigError(f"{where}: {spec!r} is malformed; a file plug-in names a .py file")
        if not path.is_file():
            cwd = Path.cwd()
            raise ConfigError(
                f"{where}: file {location!r} does not exist (relative paths start at the current directory, {cwd})"
            )
        # absolute, so that a worker finds it whatever its working directory
        return "plugin", f"{path.resolve()}:{attr}", attr
    if not all(part.isidentifier() for part in location.split(".")):
        raise ConfigError(f"{where}: {spec!r} is malformed; {location!r} is not a module name")
    return "plugin", spec, attr


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ConfigError(
            f"reward.weights: {len(weights)} weights for {n} reward.functions; give one per function (or none: all 1)"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"reward.weights[{i}]: must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def _check_builtin(name: str, answer_format: str | None, where: str) -> None:
    if answer_format == "none" and name in _NEEDS_MARKER:
        raise ConfigError(
            f"{where}: {name!r} reads the answer after its marker, but data.answer_format is none; "
            "use hash or boxed, or a plug-in"
        )
    if name == mathverify.NAME:  # an optional extra: say how to install it before a model loads
        mathverify.check_installed(where)


def _import_check(spec: str, target: str, where: str) -> None:
    try:
        load_plugin(target)
    except Exception as e:  # user code at import time: any failure is the recipe's problem
        raise ConfigError(f"{where}: cannot load {spec!r}: {describe(e)}") from None


# ---- built-in values --------------------------------------------------------------------


def format_reward(completion: str, answer_format: str) -> float:
    """1.0 when the completion has an answer after the format's marker (`####`, `\\boxed{}`)."""
    return float(extract_answer(completion, answer_format) is not None)


def overlong_penalty(length: int, truncated: bool, *, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong penalty: 0, then linear down to -1 over the last `buffer` tokens."""
    if truncated:
        return -1.0
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer)


def weighted_sum(row: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """The reward of one completion; None when any function could not judge it."""
    if any(v is None for v in row):
        return None
    return sum(w * v for w, v in zip(weights, row) if v is not None)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (TRL's), 0.0 where undefined (no or one value)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---- scoring ----------------------------------------------------------------------------


def score(
    fns: Sequence[RewardFn],
    *,
    completions: Sequence[str],
    prompts: Sequence[str],
    answers: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    pool_or_verifier: Verifier | TimeoutPool,
    answer_format: str,
    strictness: str,
    max_new_tokens: int,
    buffer: int,
    threshold: float,
    timeout: float,
) -> RewardResult:
    """Run every function once on the batch and combine their values (docs/design.md, "Rewards").

    Built-ins run here (the math ones share one `verify_batch`, which needs a `Verifier`);
    plug-ins, and `math_verify` (one call per completion), run in the pool's workers (a
    `Verifier`'s, or a `TimeoutPool`), `timeout` seconds each. `columns` are the extra
    keyword lists for plug-ins; `overlong` reads its `lengths` and `truncated`. Raises
    `RewardError` when a function fails.
    """
    if not fns:
        raise ValueError("rewards.score needs at least one reward function (none: use the verifier path)")
    n = len(completions)
    kwargs = _batch_kwargs(n, prompts, answers, columns)
    texts = list(completions)
    verdicts = None
    if any(fn.kind == "builtin" and fn.spec in _VERIFIER for fn in fns):
        if not isinstance(pool_or_verifier, Verifier):
            raise ValueError("the math reward built-ins need a Verifier, not a bare TimeoutPool")
        verdicts = pool_or_verifier.verify_batch([(c, a, answer_format) for c, a in zip(texts, kwargs["answers"])])
    plugins = [fn for fn in fns if fn.kind == "plugin"]
    values = _run_plugins(plugins, _pool_of(pool_or_verifier), timeout, texts, kwargs) if plugins and n else {}
    if n and any(fn.kind == "builtin" and fn.spec == mathverify.NAME for fn in fns):
        values[mathverify.NAME] = _math_verify_values(_pool_of(pool_or_verifier), texts, kwargs["answers"], timeout)
    for fn in fns:
        if fn.kind == "builtin" and fn.spec != mathverify.NAME:
            values[fn.name] = _builtin_values(
                fn.spec, texts, verdicts, kwargs, answer_format, strictness, max_new_tokens, buffer
            )
        values.setdefault(fn.name, [])  # an empty batch: no plug-in ran
    ordered = {fn.name: values[fn.name] for fn in fns}
    weights = [fn.weight for fn in fns]
    rewards = [weighted_sum(row, weights) for row in zip(*ordered.values())] if n else []
    return RewardResult(
        rewards=rewards,
        correct=[r is not None and r >= threshold for r in rewards],
        dropped=[r is None for r in rewards],
        values=ordered,
        verdicts=verdicts,
    )


def _batch_kwargs(
    n: int, prompts: Sequence[str], answers: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> dict[str, list]:
    """The keyword lists of a plug-in call, each checked to have one entry per completion."""
    clash = sorted(set(columns) & set(_RESERVED))
    if clash:
        raise ValueError(f"reward columns may not be named {', '.join(clash)}: score passes those itself")
    kwargs = {"prompts": _as_list(prompts), "answers": _as_list(answers)}
    kwargs |= {key: _as_list(column) for key, column in columns.items()}
    for key, column in kwargs.items():
        if len(column) != n:
            raise ValueError(f"reward column {key!r} has {len(column)} entries for {n} completions")
    return kwargs


def _as_list(column: Any) -> list:
    return column.tolist() if hasattr(column, "tolist") else list(column)


def _pool_of(pool_or_verifier: Verifier | TimeoutPool) -> TimeoutPool:
    pool = pool_or_verifier.pool if isinstance(pool_or_verifier, Verifier) else pool_or_verifier
    if pool is None:  # in-process plug-ins could hang training: there is no such mode
        raise ValueError("reward plug-ins run in worker processes: give a Verifier with workers >= 1 or a TimeoutPool")
    return pool


def _builtin_values(
    spec: str,
    completions: list[str],
    verdicts: list[Verdict | None] | None,
    kwargs: dict[str, list],
    answer_format: str,
    strictness: str,
    max_new_tokens: int,
    buffer: int,
) -> list[float | None]:
    if spec == "format":
        return [format_reward(c, answer_format) for c in completions]
    if spec == "overlong":
        missing = [key for key in ("lengths", "truncated") if key not in kwargs]
        if missing:
            raise ValueError(f"the overlong reward needs the {' and '.join(missing)} column(s)")
        return [
            overlong_penalty(length, bool(cut), max_new_tokens=max_new_tokens, buffer=buffer)
            for length, cut in zip(kwargs["lengths"], kwargs["truncated"])
        ]
    assert verdicts is not None, "score runs verify_batch whenever a math built-in is listed"
    mode = _MATH_MODES.get(spec, strictness)
    return [verify.reward(v, mode) for v in verdicts]


def _math_verify_values(pool: TimeoutPool, completions: list[str], answers: list, timeout: float) -> list[float | None]:
    try:
        return mathverify.values(pool, completions, answers, timeout=timeout, load_timeout=max(timeout, LOAD_TIMEOUT))
    except mathverify.LoadError as e:
        raise RewardError(f"reward function {mathverify.NAME!r}: {e}") from None


def _run_plugins(
    fns: Sequence[RewardFn], pool: TimeoutPool, timeout: float, completions: list[str], kwargs: dict[str, list]
) -> dict[str, list[float | None]]:
    """Every plug-in's values, from the pool's workers; a `RewardError` for the first that failed."""
    search_path = tuple(sys.path)
    targets = tuple(dict.fromkeys(fn.target for fn in fns))
    by_target = {fn.target: fn.spec for fn in fns}
    # One load job per worker: the pool hands one call to each idle worker, so each imports
    # the plug-ins (or finds them cached) before the calls' deadlines start.
    load_limit = max(timeout, LOAD_TIMEOUT)
    for loaded in pool.run([(reward_plugins.worker_load, (targets, search_path))] * pool.size, timeout=load_limit):
        if loaded is None:
            raise RewardError(f"reward plug-ins were not imported by a worker within {load_limit:g}s (a hung import?)")
        if loaded[0] == "error":
            raise RewardError(f"reward function {by_target[loaded[1]]!r} failed to load in a worker: {loaded[2]}")
    calls = [(reward_plugins.worker_call, (fn.spec, fn.target, search_path, completions, kwargs)) for fn in fns]
    values: dict[str, list[float | None]] = {}
    for fn, result in zip(fns, pool.run(calls, timeout=timeout)):
        if result is None:  # the pool's default: killed at the deadline, or its worker died twice
            raise RewardError(
                f"reward function {fn.spec!r} gave no result within reward.timeout = {timeout:g}s "
                "and was stopped (it hangs, is too slow, or crashed its worker)"
            )
        status, payload = result
        if status == "error":
            raise RewardError(payload)
        values[fn.name] = payload
    return values


# ---- the reward stage of a training step -------------------------------------------------


@dataclass(frozen=True)
class RowRewards:
    """The rewards of a step's rows: the values the estimator reads, the per-row `strict` /
    `lenient` / `dropped` flags, and every reward function's values (NaN: not judged)."""

    values: list[float]
    strict: list[bool]
    lenient: list[bool]
    dropped: list[bool]  # unusable gold, or a function that could not judge it: no loss
    judged: dict[str, list[float]]


def judge_rows(
    golds: Sequence[str],
    texts: Sequence[str],
    *,
    fns: Sequence[RewardFn],
    verifier: Verifier,
    answer_format: str,
    strictness: str,
    reward: RewardConfig,
    max_new_tokens: int,
    binary: bool,
    plugin_inputs: Callable[[], tuple[list[str], dict[str, list]]] | None = None,
) -> RowRewards:
    """Judge every row. Without reward functions: the verifier's 0/1 at `strictness`. With
    them: their weighted sum, or with `binary` (estimators whose trajectory types need a
    correct/wrong decision) whether it reaches `reward.correct_threshold`.
    `plugin_inputs()` gives the prompts' text and the extra keyword columns of plug-ins
    (called only when there are functions)."""
    if not fns:
        verdicts = verifier.verify_batch([(t, g, answer_format) for t, g in zip(texts, golds)])
        verified = [verify.reward(v, strictness) for v in verdicts]
        return RowRewards(
            values=[0.0 if v is None else v for v in verified],
            strict=[bool(v and v.strict) for v in verdicts],
            lenient=[bool(v and v.lenient) for v in verdicts],
            dropped=[v is None for v in verified],
            judged={},
        )
    prompts, columns = plugin_inputs() if plugin_inputs else ([""] * len(texts), {})
    result = score(
        fns,
        completions=texts,
        prompts=prompts,
        answers=golds,
        columns=columns,
        pool_or_verifier=verifier,
        answer_format=answer_format,
        strictness=strictness,
        max_new_tokens=max_new_tokens,
        buffer=reward.overlong_buffer,
        threshold=reward.correct_threshold,
        timeout=reward.timeout,
    )
    values = [float(c) if binary else (v or 0.0) for v, c in zip(result.rewards, result.correct)]
    if result.verdicts is not None:
        strict = [bool(v and v.strict) for v in result.verdicts]
        lenient = [bool(v and v.lenient) for v in result.verdicts]
    else:  # no math function: "correct" is the threshold's decision
        strict = lenient = list(result.correct)
    return RowRewards(values, strict, lenient, list(result.dropped), result.judged())

"""The `math_verify` reward built-in: Hugging Face's math-verify (the checker behind TRL's
`accuracy_reward`) as an optional second verifier, from the `math-verify` extra.

math-verify is not our whitelist parser: it hands plain-text expressions found in the
completion to sympy's `parse_expr`, which `eval`s them, and lets sympy evaluate what its LaTeX
parser builds (`9^{9^{9^{9}}}` runs until stopped). So it never runs in the trainer's process:
`judge` is a worker job of the `TimeoutPool`, killed at `reward.timeout`; math-verify's own
alarms (`signal.alarm`, in the worker's main thread) get a third of that, so the kill is the
backstop. This module imports math-verify only inside those jobs and in `check_installed`
(an import is no evaluation of model text). The agreement study with our verifier:
docs/verify-agreement.md."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Sequence

from cast_mlx.config import ConfigError
from cast_mlx.tasks.verify.pool import TimeoutPool

NAME = "math_verify"  # its name in `reward.functions`
INSTALL = "pip install 'cast-mlx[math-verify]'"


class LoadError(RuntimeError):
    """math-verify could not be imported in a worker (the caller raises its own error)."""


def check_installed(where: str) -> None:
    """A one-line `ConfigError` naming `where` and the install command when math-verify is
    missing or broken (at recipe time, before a model loads)."""
    try:
        importlib.import_module("math_verify")
    except ImportError as e:
        raise ConfigError(
            f"{where}: {NAME!r} needs the math-verify package, which cannot be imported ({e}); install it: {INSTALL}"
        ) from None


def inner_timeout(timeout: float) -> int:
    """Seconds for each of math-verify's own alarms (gold parse, answer parse, comparison):
    whole seconds, a third of the pool's limit so that all three fit in it, at least 1."""
    return max(1, int(timeout // 3))


def load() -> tuple:
    """Worker job: import math-verify, under the load limit rather than a call's."""
    try:
        importlib.import_module("math_verify")
    except Exception as e:  # a broken install: reported, rather than a silent None
        return ("error", f"{type(e).__name__}: {e}")
    return ("ok",)


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str, seconds: int) -> list:
    """math-verify's parse of a gold answer: as LaTeX between `$`s (`\\frac{1}{2}`), else as
    plain text. An empty list: math-verify cannot read it."""
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=seconds) or parse(gold, parsing_timeout=seconds)


def judge(completion: str, gold: str, seconds: int = 3) -> tuple:
    """Worker job: ("ok", 1.0 or 0.0, the answer math-verify read, or None), or ("ok", None,
    None) when math-verify cannot parse the gold (the row leaves the loss, as an unusable gold
    does for our verifier; TRL does the same). It reads the whole completion, in any format,
    as `math_lenient` does."""
    from math_verify import parse, verify

    parsed_gold = _parsed_gold(gold, seconds)
    if not parsed_gold:
        return ("ok", None, None)
    answer = parse(completion, parsing_timeout=seconds)
    read = str(answer[0]) if answer else None  # parse gives [the sympy object judged, a text]
    return ("ok", float(verify(parsed_gold, answer, timeout_seconds=seconds)), read)


def results(
    pool: TimeoutPool, completions: Sequence[str], golds: Sequence[str], *, timeout: float, load_timeout: float
) -> list[tuple | None]:
    """`judge` of each completion in the pool's workers, one call each under `timeout`
    seconds; None where a call ran past it (its worker is killed) or its worker died twice.
    Each worker imports math-verify first, under `load_timeout`; a failed import raises
    `LoadError`."""
    for loaded in pool.run([(load, ())] * pool.size, timeout=load_timeout):
        if loaded is None:
            raise LoadError(f"math-verify was not imported by a worker within {load_timeout:g}s")
        if loaded[0] == "error":
            raise LoadError(f"math-verify failed to import in a worker: {loaded[1]}")
    seconds = inner_timeout(timeout)
    return pool.run([(judge, (c, g, seconds)) for c, g in zip(completions, golds)], timeout=timeout)


def values(
    pool: TimeoutPool, completions: Sequence[str], golds: Sequence[str], *, timeout: float, load_timeout: float
) -> list[float | None]:
    """math-verify's reward of each completion (`results`): a call that gave no result counts
    as wrong, 0.0, as a comparison of our verifier does that runs past its limit."""
    found = results(pool, completions, golds, timeout=timeout, load_timeout=load_timeout)
    return [0.0 if result is None else result[1] for result in found]

"""The statistics of an evaluation: per-problem results, their means with bootstrap 95%
confidence intervals, pass@k and majority votes, and the paired comparison with a baseline
(the difference on shared problems, with McNemar's exact test). Pure: no model is loaded.
What they measure: `evaluation.py`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cast_mlx.errors import UsageError
from cast_mlx.tasks import verify

N_RESAMPLES = 1000


# --------------------------------------------------------------------------- pure helpers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al., 2021):
    the probability that a random subset of `k` of the `n` samples holds a correct one,
    `1 - C(n-c, k) / C(n, k)`; exactly 1 when fewer than `k` samples are wrong."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_key(answer: str | None):
    """What answers are grouped by for a vote: the exact value (and `%` flag) of a numeric
    answer, so that `18`, `18.0` and `$18` agree; else the normalised text without spaces.
    None (no answer found) stays None."""
    if answer is None:
        return None
    normal = verify.normalize_answer(answer)
    number = verify.parse_number(normal)
    if number is not None:
        return ("number", number[0], number[1])
    return ("text", "".join(normal.split()))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the completion whose answer wins the vote, or None if no answer was found.

    Answers are grouped by `answer_key`; completions without an answer do not vote. The
    group with the most members wins; a tie goes to the group whose first member comes
    earliest in `answers` (sample order, fixed by the seed). The returned index is that
    first member, so its verdict is the vote's verdict.
    """
    counts: dict = {}
    first: dict = {}
    for i, answer in enumerate(answers):
        key = answer_key(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    winner = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[winner]


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, n_resamples: int = N_RESAMPLES, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap `(low, high)` of the mean of `values` (one per problem).

    Problems are resampled with replacement `n_resamples` times from a numpy generator
    seeded with `seed`, so the interval is reproducible; `alpha = 0.05` gives a 95% CI.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("bootstrap_ci: need a non-empty list of per-problem values")
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_resamples, len(x)))
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --------------------------------------------------------------------------- results


@dataclass
class Metric:
    """A mean over problems and its bootstrap CI."""

    value: float
    ci_low: float
    ci_high: float


@dataclass
class Completion:
    text: str
    answer: str | None  # the answer the lenient chain found (what is voted on)
    strict: bool
    lenient: bool
    finish: str  # "eos" or "length"


@dataclass
class ProblemResult:
    id: str
    question: str
    gold: str
    greedy: Completion
    samples: list[Completion] = field(default_factory=list)
    majority: int | None = None  # index into samples of the vote's winner

    @property
    def n_correct(self) -> int:
        """Correct (lenient) samples."""
        return sum(s.lenient for s in self.samples)

    @property
    def majority_correct(self) -> bool:
        return self.majority is not None and self.samples[self.majority].lenient

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.samples:
            d["n_correct"] = self.n_correct
            d["majority_answer"] = None if self.majority is None else self.samples[self.majority].answer
            d["majority_correct"] = self.majority_correct
        return d


@dataclass
class EvalResult:
    summary: dict[str, Metric]  # "greedy/strict", "greedy/lenient", "mean@k", "pass@k", "maj@k"
    problems: list[ProblemResult]
    settings: dict  # k, temperature, seed, ... and timing

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "summary": {name: asdict(m) for name, m in self.summary.items()},
            "problems": [p.to_dict() for p in self.problems],
        }


def per_problem_values(problems: Sequence[ProblemResult], k: int) -> dict[str, list[float]]:
    """The per-problem 0..1 value of every metric (their means are the summary)."""
    values = {
        "greedy/strict": [float(p.greedy.strict) for p in problems],
        "greedy/lenient": [float(p.greedy.lenient) for p in problems],
    }
    if problems and problems[0].samples:
        values[f"mean@{k}"] = [p.n_correct / len(p.samples) for p in problems]
        values[f"pass@{k}"] = [pass_at_k(len(p.samples), p.n_correct, k) for p in problems]
        values[f"maj@{k}"] = [float(p.majority_correct) for p in problems]
    return values


def summarize(
    problems: Sequence[ProblemResult], k: int, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> dict[str, Metric]:
    """Mean and bootstrap CI of every metric (the same resamples for all: same seed)."""
    summary = {}
    for name, vals in per_problem_values(problems, k).items():
        low, high = bootstrap_ci(vals, seed=seed, n_resamples=n_resamples)
        summary[name] = Metric(float(np.mean(vals)), low, high)
    return summary


PAIRED_METRICS = ("greedy/strict", "greedy/lenient")


@dataclass
class Paired:
    """One 0/1 metric of two evaluations on the same problems."""

    n: int
    both: int
    only_new: int
    only_baseline: int
    neither: int
    difference: float  # new minus baseline accuracy
    ci_low: float  # 95% normal-approximation CI of the paired difference
    ci_high: float
    p_value: float  # exact two-sided McNemar test (a sign test on the discordant problems)


def mcnemar_exact(only_new: int, only_baseline: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each discordant problem is
    equally likely to favour either side, so the smaller count is Binomial(b + c, 1/2)."""
    n = only_new + only_baseline
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_new, only_baseline) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(baseline: Sequence[float], new: Sequence[float]) -> Paired:
    """Compare per-problem outcomes, bools or 0/1 (same problems, same order)."""
    if len(baseline) != len(new) or not new:
        raise ValueError(f"paired comparison needs equal, non-empty lists, got {len(baseline)} and {len(new)}")
    n = len(new)
    both = sum(1 for a, b in zip(baseline, new) if a and b)
    only_new = sum(1 for a, b in zip(baseline, new) if b and not a)
    only_base = sum(1 for a, b in zip(baseline, new) if a and not b)
    diff = (only_new - only_base) / n
    # the per-problem difference is -1, 0 or +1: its variance is (b + c)/n - diff^2
    se = math.sqrt(max((only_new + only_base) / n - diff**2, 0.0) / n)
    return Paired(
        n,
        both,
        only_new,
        only_base,
        n - both - only_new - only_base,
        diff,
        diff - 1.96 * se,
        diff + 1.96 * se,
        mcnemar_exact(only_new, only_base),
    )


def read_baseline(path: str) -> dict[str, dict[str, bool]]:
    """The greedy outcomes of an earlier eval JSON, by problem id; UsageError if unreadable."""
    try:
        problems = json.loads(Path(path).read_text())["problems"]
        return {p["id"]: {m: bool(p["greedy"][m.split("/")[1]]) for m in PAIRED_METRICS} for p in problems}
    except FileNotFoundError:
        raise UsageError(f"--baseline {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise UsageError(
            f"--baseline {path}: not a cast_mlx.eval result (needs problems with an id and greedy strict/lenient)"
        ) from None


def check_same_problems(baseline: dict, ids: Sequence[str], path: str) -> None:
    if list(baseline) == list(ids):
        return
    missing = next((i for i in ids if i not in baseline), None)
    if len(baseline) != len(ids):
        detail = f"it holds {len(baseline)} problems, this eval {len(ids)}"
    elif missing is not None:
        detail = f"problem {missing!r} of this eval is not in it"
    else:
        detail = "its problems come in another order"
    raise UsageError(f"--baseline {path}: {detail}; evaluate both with the same task, level, split and --n")


def compare_to_baseline(result: "EvalResult", baseline: dict) -> dict[str, Paired]:
    new = per_problem_values(result.problems, k=1)  # 0/1 per problem for the greedy metrics
    return {m: paired_comparison([baseline[p.id][m] for p in result.problems], new[m]) for m in PAIRED_METRICS}

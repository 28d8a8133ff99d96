"""Evaluate a model (optionally with LoRA adapters) on a task: greedy accuracy and k-sample
metrics, each with a bootstrap 95% confidence interval.

`python -m cast_mlx.eval --model SPEC [--adapter DIR] --task arithmetic [--n N] [--k K] ...`

What is measured, per problem, with the prompt, rollout engine and verifier of training:

- **greedy** (always): one completion at temperature 0; `greedy/strict` (the required
  answer format was used and is right) and `greedy/lenient` (the first answer found in
  any format is right, the reward used for training).
- **k samples** (when `temperature > 0`): `k` completions per problem, scored lenient;
  `mean@k` = the share of correct samples, `pass@k` = the unbiased estimator
  `1 - C(n-c, k) / C(n, k)` (with `n = k` samples it is "any sample correct"), `maj@k` =
  whether the majority answer is correct (see `majority_vote` for grouping and ties).

Every metric is a mean over problems; its CI comes from resampling the problems
(`bootstrap_ci`, percentile method, deterministic by seed).

`--baseline FILE` (an earlier result on the same problems, e.g. of the base model) adds a
*paired* comparison of the greedy metrics (`paired_comparison`): problems only the new model
solves vs only the baseline solves, the difference with a 95% CI, and the exact McNemar
p-value. Paired, because two evals on the same problems are far from independent.

The pure helpers (`pass_at_k`, `answer_key`, `majority_vote`, `bootstrap_ci`,
`paired_comparison`) do not load a model and are tested on their own.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence, cast

import numpy as np

from cast_mlx.errors import UsageError, disk_full
from cast_mlx.tasks import custom, data, verify

N_RESAMPLES = 1000
DEFAULT_ARITHMETIC_EVAL_SIZE = 200
EVAL_DATA_SEED = 0  # the held-out set does not change with --seed: every run sees the same
EVAL_TASKS = (*data.TASKS, data.CUSTOM_TASK)


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


# --------------------------------------------------------------------------- evaluation


def _completions(tokenizer, rollout, golds: list[str], answer_format: str, verifier) -> list[Completion]:
    """Decode and verify every row of a rollout (row i answers `golds[i]`)."""
    from cast_mlx.engine.rollout import decode_completions

    texts = decode_completions(tokenizer, rollout)
    verdicts = verifier.verify_batch([(t, g, answer_format) for t, g in zip(texts, golds)])
    out = []
    for text, v, finish in zip(texts, verdicts, rollout.finish_reasons):
        # A None verdict (unparseable gold) counts as wrong; load_task already drops such rows.
        out.append(Completion(text, None if v is None else v.pred, bool(v and v.strict), bool(v and v.lenient), finish))
    return out


def evaluate(
    model,
    tokenizer,
    problems: Sequence[data.Problem],
    *,
    answer_format: str = "hash",
    system_prompt: str | None = None,
    k: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    max_batch: int = 64,
    verifier: verify.Verifier | None = None,
    n_resamples: int = N_RESAMPLES,
    progress=None,
) -> EvalResult:
    """Greedy (and, with `temperature > 0`, `k`-sample) evaluation of `model` on `problems`.
    `progress(problems_answered, problems)`, if given, hears during the greedy pass.

    The prompt is `data.build_prompt` (as in training), completions come from
    `rollout.generate_groups` (greedy: one per problem at temperature 0), answers are
    checked by `verifier` (a fresh one-worker `Verifier` when None). `seed` drives the
    samples and the bootstrap.
    """
    from cast_mlx.engine import rollout

    if not problems:
        raise ValueError("evaluate: no problems")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if k > 1 and temperature == 0:
        raise ValueError("k > 1 samples need temperature > 0 (greedy samples are all the same)")
    if answer_format not in verify.ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {verify.ANSWER_FORMATS}, got {answer_format!r}")

    start = time.perf_counter()
    prompts = [data.prompt_ids(tokenizer, p, system_prompt, answer_format) for p in problems]
    golds = [p.gold for p in problems]
    eos = set(tokenizer.eos_token_ids)
    own_verifier = verifier is None
    verifier = verify.Verifier(workers=1) if verifier is None else verifier
    try:
        greedy_params = rollout.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, max_batch=max_batch)
        hear = None if progress is None else (lambda t, cap, done, n: progress(done, n))  # noqa: E731
        greedy_out = rollout.generate_groups(model, prompts, 1, greedy_params, eos, key=seed, progress=hear)
        greedy = _completions(tokenizer, greedy_out, golds, answer_format, verifier)
        samples: list[list[Completion]] = [[] for _ in problems]
        if temperature > 0:
            params = rollout.SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, max_batch=max_batch)
            out = rollout.generate_groups(model, prompts, k, params, eos, key=seed)
            flat = _completions(tokenizer, out, [g for g in golds for _ in range(k)], answer_format, verifier)
            samples = [flat[i * k : (i + 1) * k] for i in range(len(problems))]
    finally:
        if own_verifier:
            verifier.close()

    results = []
    for p, g, s in zip(problems, greedy, samples):
        majority = majority_vote([c.answer for c in s]) if s else None
        results.append(ProblemResult(p.id, p.question, p.gold, g, s, majority))
    every = [c for r in results for c in [r.greedy, *r.samples]]
    settings = {
        "n_problems": len(results),
        "k": k,
        "samples_per_problem": k if temperature > 0 else 0,
        "temperature": temperature,
        "answer_format": answer_format,
        "system_prompt": system_prompt,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "bootstrap_resamples": n_resamples,
        "truncated_share": sum(c.finish == "length" for c in every) / len(every),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return EvalResult(summarize(results, k, seed, n_resamples), results, settings)


# --------------------------------------------------------------------------- in training


def evaluate_held_out(model, tokenizer, problems: list, recipe, verifier, world, phase=lambda *a: None) -> dict:
    """Greedy accuracy of the current policy on `problems`, as `eval/*` metrics (mean and
    bootstrap CI over problems) plus `eval/per_problem` (the 0/1 lists, which the metrics
    files keep in eval.jsonl for paired tests). In a data-parallel run (`world`) each rank
    answers its contiguous slice and the per-problem results are gathered, so no rank waits idle."""
    import mlx.core as mx

    from cast_mlx.engine import distributed as dist

    r = recipe
    t = time.perf_counter()
    phase("eval", 0, len(problems))
    mine = dist.shard_uneven(problems, world.rank, world.size)
    values: dict[str, list[float]] = {"greedy/strict": [], "greedy/lenient": []}
    if mine:
        result = evaluate(
            model,
            tokenizer,
            mine,
            answer_format=r.data.answer_format,
            system_prompt=r.data.system_prompt,
            max_new_tokens=r.sampling.max_new_tokens,
            max_batch=r.sampling.max_batch,
            verifier=verifier,
            n_resamples=200,
            progress=lambda done, n: phase("eval", done, n),
        )
        values = per_problem_values(result.problems, k=1)
    gathered = dist.gather_rows(
        world, {k: mx.array(v, dtype=mx.float32) for k, v in values.items()}, "gathering eval results"
    )
    strict = cast("list[float]", gathered["greedy/strict"].tolist())
    lenient = cast("list[float]", gathered["greedy/lenient"].tolist())
    return eval_metrics(lenient, strict) | {"time/eval": time.perf_counter() - t}


def eval_metrics(lenient: list[float], strict: list[float]) -> dict:
    low, high = bootstrap_ci(lenient, seed=0, n_resamples=200)
    return {
        "eval/accuracy": float(np.mean(lenient)),
        "eval/accuracy_ci_low": low,
        "eval/accuracy_ci_high": high,
        "eval/accuracy_strict": float(np.mean(strict)),
        "eval/n": len(lenient),
        "eval/per_problem": {"lenient": lenient, "strict": strict},
    }


def base_eval_key(recipe, problems: list) -> str:
    """What the greedy eval of a fresh run's step-0 policy depends on: the base model (the
    LoRA B matrices start at 0) or the warm-start adapter, the problems and the settings."""
    import mlx.core as mx

    from cast_mlx import __version__
    from cast_mlx.engine import models

    r = recipe
    what = {
        "cast_mlx": __version__,
        "mlx": getattr(mx, "__version__", "?"),
        "model": r.model.name,
        "dtype": models.resolve_dtype(r.model.dtype),
        "problems": [[p.id, p.question, p.gold] for p in problems],
        "answer_format": r.data.answer_format,
        "system_prompt": r.data.system_prompt,
        "max_new_tokens": r.sampling.max_new_tokens,
        "max_batch": r.sampling.max_batch,
        "adapter": adapter_digest(r.model.adapter_path),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def adapter_digest(path: str | None) -> str | None:
    """A warm start's adapter weights, by content (the step-0 policy is that adapter)."""
    from cast_mlx.engine import models

    if path is None:
        return None
    return hashlib.sha256((Path(path) / models.ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def base_model_eval(model, tokenizer, problems: list, recipe, verifier, world, phase=lambda *a: None) -> dict:
    """The step-0 eval, read from `$CAST_MLX_HOME/evals/` when a run with the same model,
    problems and eval settings computed it before (compare.py's variants and seeds share
    it); computed and stored otherwise. Single-process runs only (every rank of a
    data-parallel run must take the same path)."""
    from cast_mlx.engine import models

    path = models.home() / "evals" / f"base-{base_eval_key(recipe, problems)}.json"
    if world.size == 1 and path.is_file():
        try:
            stored = json.loads(path.read_text())
            return eval_metrics(stored["lenient"], stored["strict"]) | {"time/eval": 0.0, "eval/cached": True}
        except (OSError, ValueError, KeyError):
            pass  # unreadable: compute it again
    metrics = evaluate_held_out(model, tokenizer, problems, recipe, verifier, world, phase)
    if world.size == 1:
        text = json.dumps(metrics["eval/per_problem"])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written costs only time: the run goes on
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            full = disk_full(exc, path, "the base-model eval cache", needed=len(text))
            if full is not None:  # the run's own disk may be another; if not, its next write stops it
                print(f"warning: {full}; the run goes on without caching it")
    return metrics


# --------------------------------------------------------------------------- CLI


def resolve_adapter(path: str) -> Path:
    """The folder holding `adapters.safetensors` for a run dir, checkpoints dir, checkpoint
    folder or plain mlx-lm adapter folder; UsageError if there is none."""
    from cast_mlx.engine import models
    from cast_mlx.training.checkpoint import TrainingError, find_checkpoint, read_json

    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--adapter {path}: no such folder")
    if not (folder / models.ADAPTER_WEIGHTS).is_file():
        try:  # a damaged newer checkpoint is skipped with a warning, as --resume does
            folder = find_checkpoint(folder, warn=lambda text: print(text, file=sys.stderr))
        except TrainingError:
            raise UsageError(f"--adapter {path}: no {models.ADAPTER_WEIGHTS} and no checkpoint found there") from None
    for name in (models.ADAPTER_WEIGHTS, models.ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise UsageError(f"--adapter {path}: {folder / name} is missing")
    config_file = folder / models.ADAPTER_CONFIG
    try:
        config = read_json(config_file)
    except OSError as exc:
        raise UsageError(f"--adapter {path}: {config_file} cannot be read ({exc.strerror})") from None
    except ValueError as exc:  # it names the file and the line
        raise UsageError(f"--adapter {path}: {folder}/{exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--adapter {path}: {config_file} is not a JSON object")
    return folder


def adapter_recipe(folder: Path | None):
    """The training recipe stored next to the adapters (checkpoints have one), or None."""
    if folder is None or not (folder / "recipe.yaml").is_file():
        return None
    from cast_mlx import config as cfg

    try:
        return cfg.load_recipe(folder / "recipe.yaml", [])
    except cfg.ConfigError:
        return None


def custom_data(args, adapter: Path | None, recipe):
    """The data section that `--task custom` evaluates with: the adapter's training recipe
    (its columns, splits and format), `--path` replacing its source when given."""
    if recipe is None or recipe.data.task != data.CUSTOM_TASK:
        if adapter is None:
            why = "needs --adapter RUN"
        elif recipe is None:
            why = f"needs the adapter's training recipe, and {adapter / 'recipe.yaml'} is missing or invalid"
        else:
            why = f"needs an adapter trained on task custom (its recipe has task {recipe.data.task})"
        raise UsageError(f"--task custom {why}: the data mapping comes from that recipe's data section")
    if args.path:
        return replace(recipe.data, path=args.path, hub_id=None)
    return recipe.data


def load_problems(s: dict) -> list[data.Problem]:
    """The problems of the settings `s` (see `resolve_args`)."""
    if s["task"] == data.CUSTOM_TASK:
        return custom.load_custom(s["data"], s["split"], s["n"], EVAL_DATA_SEED)
    return data.load_task(s["task"], s["split"], path=s["path"], n=s["n"], level=s["level"], seed=EVAL_DATA_SEED)


def load_policy(model_spec: str, adapter: str | None, dtype: str = "auto"):
    """`(model, tokenizer)`: the model, with the LoRA adapters of `adapter` when given."""
    from cast_mlx.engine import models

    model, tokenizer = models.load(model_spec, dtype=dtype)
    if adapter:
        from mlx_lm.tuner.utils import load_adapters

        from cast_mlx.training.checkpoint import adapter_config_problem, read_json

        why = adapter_config_problem(read_json(Path(adapter) / models.ADAPTER_CONFIG))
        if why:  # mlx-lm would fail on it with an AttributeError or a TypeError
            raise ValueError(f"--adapter {adapter}: {why}")

        load_adapters(model, adapter)
        model.eval()
    return model, tokenizer

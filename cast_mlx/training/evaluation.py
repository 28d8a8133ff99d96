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

The statistics (`pass_at_k`, `majority_vote`, `bootstrap_ci`, `paired_comparison`, the result
records) are in `eval_stats.py`: pure, and tested on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence, cast

import numpy as np

from cast_mlx.errors import UsageError, disk_full
from cast_mlx.tasks import custom, data, verify
from cast_mlx.training.eval_stats import (
    N_RESAMPLES,
    Completion,
    EvalResult,
    ProblemResult,
    bootstrap_ci,
    majority_vote,
    per_problem_values,
    summarize,
)

DEFAULT_ARITHMETIC_EVAL_SIZE = 200
EVAL_DATA_SEED = 0  # the held-out set does not change with --seed: every run sees the same
EVAL_TASKS = (*data.TASKS, data.CUSTOM_TASK)


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

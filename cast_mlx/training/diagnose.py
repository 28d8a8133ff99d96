"""Will CAST help this model on this task? The gap diagnostics of the CAST paper as a command.

`python -m cast_mlx.diagnose --task arithmetic [--model M | --adapter RUN] [--n 64] [--group-size 8]
[--temperature T] [--contexts plain,instructed,privileged] [--out diagnose.json]`

CAST only helps where the answer-free teacher's gap `g = lp_T - lp_old` says which tokens
are good. This samples `n` prompts x `group-size` completions with the rollout engine of
training, verifies them, scores the policy itself as the teacher (the lagged teacher equals
the policy at a refresh) on each context's prompt, and measures per context:

- the 2x2 table of spec section 7 (correct/wrong x teacher-positive/negative: token share,
  mean |g|) and P(g > 0 | correct), P(g > 0 | wrong);
- separation of correct from wrong completions: the AUC of the completion-mean gap and of
  the share of teacher-positive tokens, with a bootstrap CI over prompts (AUC > 0.5: correct
  completions look better to the teacher);
- the noise profile of |g| per cell (mean, std, CV, median, p90/p95/p99), the share of |g|
  mass in the last 5% of each completion's tokens, and the split by token class (special /
  end-of-turn, digits, answer markers, punctuation and spaces, words);
- end-of-turn statistics: the share of EOS tokens with g < 0 and their median g;
- the group mix (all-correct / all-wrong / mixed): CAST's +-base gives zero-variance groups
  the largest weights; the authors trained at about 20% / 31% / 49%.

A verdict line says which contexts give a gap that separates (the AUC's CI above 0.5) and
whether the group mix is in the authors' range, with what to try otherwise. `privileged`
(the gold answer in the context) is allowed here for analysis, as in the paper; it never
reaches CAST training. The `same` context is refused: with the teacher equal to the policy
its gap on the sampler's own prompt is 0 by construction.

The analysis is pure numpy on per-token arrays (`analyse`); the model-facing part
(`collect`) only builds those arrays, with the project's rollout, verifier, teacher
contexts and chunked scoring.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from cast_mlx.tasks import data

DEFAULT_CONTEXTS = ("question-only", "instructed", "privileged")
# The authors' group mix at their training settings (CAST paper, Qwen3 1.7B-8B on math).
AUTHORS_MIX = {"all_correct": 0.20, "all_wrong": 0.31, "mixed": 0.49}
# "In range": at least a third of the groups mixed and at most half all-wrong or all-correct.
MIN_MIXED, MAX_ZERO_VARIANCE_SIDE = 1 / 3, 0.5
TAIL_SHARE = 0.05  # "the last 5% of tokens" of a completion
TOKEN_CLASSES = ("special", "digit", "marker", "punct", "word")
ANSWER_MARKERS = ("####", "#", "boxed", "\\", "answer", "Answer")


# --------------------------------------------------------------------------- pure helpers


def auc(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2
    (the Mann-Whitney AUC); None without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    return float(_pairwise(pos, neg).mean())


def _pairwise(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def bootstrap_auc(
    scores: ArrayLike, labels: ArrayLike, clusters: ArrayLike, seed: int = 0, n_resamples: int = 1000
) -> tuple[float | None, float | None]:
    """95% percentile CI of `auc` resampling clusters (prompts) with replacement: the
    completions of one prompt are not independent. (None, None) without both classes."""
    s, y, c = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), np.asarray(clusters)
    if y.all() or not y.any():
        return None, None
    ids, cluster_of = np.unique(c, return_inverse=True)
    table = _pairwise(s[y], s[~y])  # every (positive, negative) pair once
    rng = np.random.default_rng(seed)
    counts = np.stack(
        [np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)) for _ in range(n_resamples)]
    )
    w = counts[:, cluster_of].astype(np.float64)  # [resamples, N]: how often each row is drawn
    w_pos, w_neg = w[:, y], w[:, ~y]
    pairs = w_pos.sum(1) * w_neg.sum(1)
    values = np.einsum("rp,pn,rn->r", w_pos, table, w_neg)[pairs > 0] / pairs[pairs > 0]
    if not len(values):
        return None, None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def noise_profile(values: ArrayLike) -> dict[str, float | None]:
    """mean, std, CV (std / mean), median and p90/p95/p99 of `values` (here |g|)."""
    v = np.asarray(values, dtype=np.float64)
    keys = ("n", "mean", "std", "cv", "median", "p90", "p95", "p99")
    if not len(v):
        return {k: (0 if k == "n" else None) for k in keys}
    mean, std = float(v.mean()), float(v.std())
    q = np.percentile(v, [50, 90, 95, 99])
    return {
        "n": int(len(v)),
        "mean": mean,
        "std": std,
        "cv": std / mean if mean else None,
        "median": float(q[0]),
        "p90": float(q[1]),
        "p95": float(q[2]),
        "p99": float(q[3]),
    }


def tail_mask(lengths: ArrayLike, width: int, share: float = TAIL_SHARE) -> np.ndarray:
    """`[N, width]` bool: the last `ceil(share * n)` tokens (at least one) of each row of length n."""
    n = np.asarray(lengths)[:, None]
    tail = np.maximum(np.ceil(share * n), 1)
    pos = np.arange(width)[None, :]
    return (pos >= n - tail) & (pos < n)


def token_class(text: str, special: bool) -> str:
    """The class of one completion token from its decoded text (see TOKEN_CLASSES)."""
    if special:
        return "special"
    stripped = text.strip()
    if stripped.isdigit():
        return "digit"
    if any(m in stripped for m in ANSWER_MARKERS):
        return "marker"
    if not stripped or all(ch in string.punctuation for ch in stripped):
        return "punct"
    return "word"


def group_mix(correct: ArrayLike, group_size: int) -> dict[str, float]:
    """Shares of all-correct, all-wrong and mixed groups (zero variance decided as in training)."""
    import mlx.core as mx

    from cast_mlx.algorithm.advantages import zero_variance_groups

    ok = np.asarray(correct, dtype=bool)
    flat = np.array(zero_variance_groups(mx.array(ok.astype(np.float32)), group_size))
    first = ok.reshape(-1, group_size)[:, 0]
    return {
        "all_correct": float((flat & first).mean()),
        "all_wrong": float((flat & ~first).mean()),
        "mixed": float((~flat).mean()),
    }


def _share(mask: np.ndarray, of: np.ndarray) -> float | None:
    total = of.sum()
    return float((mask & of).sum() / total) if total else None


def analyse(
    gaps: np.ndarray,
    mask: np.ndarray,
    correct: np.ndarray,
    prompt_index: np.ndarray,
    classes: np.ndarray,
    is_eos: np.ndarray,
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict:
    """Every number of one context from per-token arrays: `gaps`, `mask`, `classes`
    (strings of TOKEN_CLASSES) and `is_eos` are `[N, L]`; `correct` and `prompt_index` `[N]`."""
    on = mask.astype(bool)
    correct = correct.astype(bool)
    rows_c = np.broadcast_to(correct[:, None], on.shape)
    pos, neg = on & (gaps > 0), on & (gaps < 0)
    out: dict = {"table": {}}
    for traj, rows in (("correct", rows_c), ("wrong", ~rows_c)):
        for side, toks in (("pos", pos), ("neg", neg)):
            cell = rows & toks
            out["table"][f"{traj}_{side}"] = {
                "share": _share(cell, on),
                "abs_mean": float(np.abs(gaps[cell]).mean()) if cell.any() else None,
                "noise": noise_profile(np.abs(gaps[cell])),
            }
    out["p_pos_given_correct"] = _share(pos, on & rows_c)
    out["p_pos_given_wrong"] = _share(pos, on & ~rows_c)
    out["zero_share"] = _share(on & (gaps == 0), on)

    lengths = on.sum(1)
    mean_gap = np.where(lengths > 0, (gaps * on).sum(1) / np.maximum(lengths, 1), 0.0)
    pos_share = np.where(lengths > 0, pos.sum(1) / np.maximum(lengths, 1), 0.0)
    out["separation"] = {}
    for name, score in (("mean_gap", mean_gap), ("pos_share", pos_share)):
        low, high = bootstrap_auc(score, correct, prompt_index, seed=seed, n_resamples=n_resamples)
        out["separation"][name] = {"auc": auc(score, correct), "ci_low": low, "ci_high": high}

    tail = tail_mask(lengths, on.shape[1])
    absg = np.abs(gaps) * on
    total = absg.sum()
    out["tail_mass"] = {
        "share_of_tokens": _share(tail, on),
        "share_of_abs_gap": float(absg[tail].sum() / total) if total else None,
    }

    out["by_class"] = {}
    for cls in TOKEN_CLASSES:
        sel = on & (classes == cls)
        out["by_class"][cls] = {
            "share": _share(sel, on),
            "mean_gap": float(gaps[sel].mean()) if sel.any() else None,
            "abs_mean": float(np.abs(gaps[sel]).mean()) if sel.any() else None,
            "neg_share": _share(sel & (gaps < 0), sel),
        }
    eos = on & is_eos
    out["eos"] = {
        "n": int(eos.sum()),
        "neg_share": _share(eos & (gaps < 0), eos),
        "median_gap": float(np.median(gaps[eos])) if eos.any() else None,
    }
    for traj, rows in (("correct", rows_c), ("wrong", ~rows_c)):
        sel = eos & rows
        out["eos"][f"{traj}_neg_share"] = _share(sel & (gaps < 0), sel)
    content = on & ~is_eos & (classes != "special")
    out["content_neg_share"] = _share(content & (gaps < 0), content)
    return out


def separates(report: dict) -> bool:
    """The completion-mean gap ranks correct above wrong completions beyond noise."""
    low = report["separation"]["mean_gap"]["ci_low"]
    return low is not None and low > 0.5


def verdict(contexts: dict[str, dict], mix: dict[str, float]) -> str:
    """One plain line: which contexts separate, whether the mix is in range, what to try."""
    good = [name for name, r in contexts.items() if separates(r)]
    free = [name for name in good if name != "privileged"]  # what CAST may train with
    in_range = mix["mixed"] >= MIN_MIXED and max(mix["all_wrong"], mix["all_correct"]) <= MAX_ZERO_VARIANCE_SIDE
    if good:
        found = f"the gap separates correct from wrong completions (AUC CI above 0.5) with: {', '.join(good)}"
    else:
        found = "no context gives a gap that separates correct from wrong completions (every AUC CI reaches 0.5)"
    mix_line = (
        f"group mix {mix['all_correct']:.0%} all-correct / {mix['all_wrong']:.0%} all-wrong / "
        f"{mix['mixed']:.0%} mixed is {'in' if in_range else 'outside'} the authors' range (~20/31/49)"
    )
    if free and in_range:
        advice = f"CAST is worth a run with teacher.context={free[0]}"
    elif free:
        advice = (
            "CAST may help, but its +-base of zero-variance groups will dominate: an easier task or a warm start first"
        )
    else:
        advice = "the answer-free teacher carries no correctness signal here"
        advice += " (only the answer-showing privileged context does)" if good else ""
        advice += ": use GRPO (the default recipe)"
        if mix["all_wrong"] > MAX_ZERO_VARIANCE_SIDE:
            advice += ", or bring the setting closer to the paper's: an easier task, a warm start or a larger model"
    return f"{found}; {mix_line}; {advice}."


# --------------------------------------------------------------------------- the model part


@dataclass
class Collected:
    """What `collect` measured: per-row arrays and, per context, the `[N, L]` gaps."""

    gaps: dict[str, np.ndarray]
    mask: np.ndarray
    correct: np.ndarray
    prompt_index: np.ndarray
    classes: np.ndarray
    is_eos: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    seconds: dict[str, float]


def collect(
    model,
    tokenizer,
    problems,
    *,
    contexts: Sequence[str],
    group_size: int,
    sampling,
    answer_format: str,
    system_prompt: str | None,
    reward: str,
    seed: int,
    micro_batch: int = 8,
    scorer: Callable | None = None,
) -> Collected:
    """Sample, verify and score. `scorer(contexts, tokens, mask, lp_old)` returns the
    teacher's log-probs `[N, L]` (default: the policy's own chunked scoring at the sampling
    temperature; `lp_old` is the sampler's); tests pass a fake one with known gaps."""
    import mlx.core as mx

    from cast_mlx.algorithm.teacher import model_logprobs, row_contexts
    from cast_mlx.config import RewardConfig
    from cast_mlx.engine import rollout
    from cast_mlx.tasks import verify
    from cast_mlx.tasks.rewards import judge_rows

    seconds = {}
    t = time.perf_counter()
    prompts = [data.prompt_ids(tokenizer, p, system_prompt, answer_format) for p in problems]
    eos_ids = set(tokenizer.eos_token_ids)
    out = rollout.generate_groups(model, prompts, group_size, sampling, eos_ids, key=mx.random.key(seed))
    mx.eval(out.tokens, out.logprobs)
    seconds["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = rollout.decode_completions(tokenizer, out)
    golds = [problems[i // group_size].gold for i in range(len(texts))]
    with verify.Verifier(workers=1) as verifier:  # the training step's judge, without plug-ins
        judged = judge_rows(
            golds,
            texts,
            fns=[],
            verifier=verifier,
            answer_format=answer_format,
            strictness=reward,
            reward=RewardConfig(),
            max_new_tokens=sampling.max_new_tokens,
            binary=True,
        )
    correct = np.array([bool(v) for v in judged.values])
    seconds["verify"] = time.perf_counter() - t

    tokens, mask = out.tokens, out.mask
    if scorer is None:

        def scorer(ctx, toks, msk, lp_old):
            return model_logprobs(model, ctx, toks, msk, sampling.temperature, micro_batch, share_prefix=True)

    gaps = {}
    instruction = data.ANSWER_INSTRUCTIONS[answer_format]
    refs = [p.solution or p.gold for p in problems]
    for name in contexts:
        t = time.perf_counter()
        rows = row_contexts(name, tokenizer, [p.question for p in problems], prompts, refs, instruction, group_size)
        lp_t = scorer(rows, tokens, mask, out.logprobs)
        gaps[name] = np.array((lp_t - out.logprobs) * mask)
        seconds[f"teacher/{name}"] = time.perf_counter() - t

    finished = np.array([r == "eos" for r in out.finish_reasons])
    truncated = mx.array((~finished).astype(np.float32))
    special, eos = rollout.special_and_eos(tokens, out.lengths, truncated, mask, rollout.special_token_ids(tokenizer))
    ids, is_special = np.array(tokens), np.array(special) > 0
    texts_of = {i: tokenizer.decode([i]) for i in np.unique(ids).tolist()}
    classes = np.vectorize(lambda i, sp: token_class(texts_of[i], bool(sp)), otypes=[object])(ids, is_special)
    lengths = np.array(out.lengths)
    is_eos = np.array(eos) > 0
    return Collected(
        gaps,
        np.array(mask),
        correct,
        np.array(out.prompt_index),
        classes.astype(str),
        is_eos,
        lengths,
        ~finished,
        seconds,
    )


def report(c: Collected, group_size: int, seed: int = 0, n_resamples: int = 1000) -> dict:
    """The JSON document: the group mix, every context's analysis, the verdict, and the
    per-completion values behind the AUCs."""
    mix = group_mix(c.correct, group_size)
    contexts = {
        name: analyse(g, c.mask, c.correct, c.prompt_index, c.classes, c.is_eos, seed=seed, n_resamples=n_resamples)
        for name, g in c.gaps.items()
    }
    on = c.mask.astype(bool)
    lengths = np.maximum(on.sum(1), 1)
    rows = [
        {
            "prompt": int(p),
            "correct": bool(ok),
            "length": int(n),
            "truncated": bool(tr),
            "mean_gap": {name: float((g[i] * on[i]).sum() / lengths[i]) for name, g in c.gaps.items()},
        }
        for i, (p, ok, n, tr) in enumerate(zip(c.prompt_index, c.correct, c.lengths, c.truncated))
    ]
    return {
        "groups": mix,
        "authors_mix": AUTHORS_MIX,
        "accuracy": float(c.correct.mean()),
        "truncated_share": float(c.truncated.mean()),
        "contexts": contexts,
        "verdict": verdict(contexts, mix),
        "seconds": c.seconds,
        "completions": rows,
    }

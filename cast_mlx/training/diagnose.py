"""Will CAST help this model on this task? The gap diagnostics of the CAST paper as a command.

`python -m cast_mlx.diagnose [--recipe R] [--adapter RUN] [--teacher-adapter RUN|base] [--n 64]
[--contexts question-only,instructed,privileged] [--vs-grpo] [--out diagnose.json]`

CAST only helps where the answer-free teacher's gap `g = lp_T - lp_old` says which tokens
are good. This samples `n` prompts x `group-size` completions with the rollout engine of
training and the recipe's sampling (default: the default recipe's), verifies them, scores
the teacher on each context's prompt, and measures per context:

- the 2x2 table of spec section 7 (correct/wrong x teacher-positive/negative: token share,
  mean |g|) and P(g > 0 | correct), P(g > 0 | wrong);
- separation of correct from wrong completions, each an AUC with a bootstrap CI over
  prompts (AUC > 0.5: correct completions look better to the teacher; a CI below 0.5 is
  anti-separation, which the flip rule turns into harm): the completion-mean gap, the share
  of teacher-positive tokens, the mean gap at the answer tokens (the final number), and the
  same after removing the row's mean content gap (a context shift adds a per-row offset);
- the noise profile of |g| per cell (mean, std, CV, median, p90/p95/p99), the share of |g|
  mass in the last 5% of each completion's tokens, and the split by token class (special /
  end-of-turn, digits, answer markers, punctuation and spaces, words);
- end-of-turn statistics: the share of EOS tokens with g < 0 and their median g;
- the group mix (all-correct / all-wrong / mixed): CAST's +-base gives zero-variance groups
  the largest weights; the authors trained at about 20% / 31% / 49%.

The teacher is the policy itself (as right after a refresh) unless `--teacher-adapter`
gives a lagged one (an adapter, or `base`); only then is the `same` context (the veRL
port's, whose gap is the weight lag alone) measurable. `--vs-grpo` computes, on the same
batch, the LoRA gradient of the recipe's algorithm and GRPO's as the update does, and
reports their cosine and the relative size of their difference: does the teacher change
the step at all? A verdict line says which contexts separate, whether the group mix is in
the authors' range, what to try, and what the default recipe trains. `privileged` (the
gold answer in the context) is allowed here for analysis, as in the paper.

The analysis is pure numpy on per-token arrays (`analyse`); the model-facing part
(`collect`, `gradient_comparison`) only builds those arrays, with the project's rollout,
verifier, teacher contexts, chunked scoring and update.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_CONTEXTS = ("question-only", "instructed", "privileged")
# The authors' group mix at their training settings (CAST paper, Qwen3 1.7B-8B on math).
AUTHORS_MIX = {"all_correct": 0.20, "all_wrong": 0.31, "mixed": 0.49}
# "In range": at least a third of the groups mixed and at most half all-wrong or all-correct.
MIN_MIXED, MAX_ZERO_VARIANCE_SIDE = 1 / 3, 0.5
TAIL_SHARE = 0.05  # "the last 5% of tokens" of a completion
TOKEN_CLASSES = ("special", "digit", "marker", "punct", "word")
ANSWER_MARKERS = ("####", "#", "boxed", "\\", "answer", "Answer")


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
    batch: dict | None = None  # the sampled rows as MLX arrays, for `gradient_comparison`


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

    # Where the answer is written: the teacher's gap there, and the same after removing
    # each row's offset (the mean gap of its content tokens), which a context shift adds
    answer = answer_tokens(classes, on)
    with_answer = answer.any(1)
    answer_gap = _row_mean(gaps, answer)
    centred = answer_gap - _row_mean(gaps, content)
    for name, score in (("answer_gap", answer_gap), ("answer_gap_centred", centred)):
        s, y, c = score[with_answer], correct[with_answer], prompt_index[with_answer]
        low, high = bootstrap_auc(s, y, c, seed=seed, n_resamples=n_resamples)
        out["separation"][name] = {"auc": auc(s, y), "ci_low": low, "ci_high": high, "rows": int(with_answer.sum())}
    return out


def _row_mean(values: np.ndarray, sel: np.ndarray) -> np.ndarray:
    n = sel.sum(1)
    return np.where(n > 0, (values * sel).sum(1) / np.maximum(n, 1), 0.0)


def answer_tokens(classes: np.ndarray, on: np.ndarray) -> np.ndarray:
    """`[N, L]` bool: each row's last run of consecutive digit tokens, where its final answer
    is written ("#### 42", "the answer is 42."); none in a row without digits. A number
    split by a separator ("1,000") counts from after the separator."""
    digit = on & (classes == "digit")
    out = np.zeros_like(digit)
    for i, row in enumerate(digit):
        idx = np.flatnonzero(row)
        if len(idx):
            end = idx[-1]
            start = end
            while start > 0 and row[start - 1]:
                start -= 1
            out[i, start : end + 1] = True
    return out


def separation(reading: dict) -> str:
    """ "separates" when the AUC's CI lies above 0.5, "anti-separates" when it lies below
    (the teacher prefers wrong completions: harmful under CAST's flip rule, which would push
    correct tokens down and wrong ones up), else "none" (the CI holds 0.5)."""
    low, high = reading.get("ci_low"), reading.get("ci_high")
    if low is not None and low > 0.5:
        return "separates"
    if high is not None and high < 0.5:
        return "anti-separates"
    return "none"


def separates(report: dict) -> bool:
    """The completion-mean gap ranks correct above wrong completions beyond noise."""
    return separation(report["separation"]["mean_gap"]) == "separates"


def verdict(contexts: dict[str, dict], mix: dict[str, float], default: str | None = None) -> str:
    """One plain line: which contexts separate (or anti-separate), whether the mix is in
    range, what to try; `default` says what the default recipe runs."""
    by = {name: separation(r["separation"]["mean_gap"]) for name, r in contexts.items()}
    good = [name for name, v in by.items() if v == "separates"]
    anti = [name for name, v in by.items() if v == "anti-separates"]
    free = [name for name in good if name != "privileged"]  # what CAST may train with
    in_range = mix["mixed"] >= MIN_MIXED and max(mix["all_wrong"], mix["all_correct"]) <= MAX_ZERO_VARIANCE_SIDE
    if good:
        found = f"the gap separates correct from wrong completions (AUC CI above 0.5) with: {', '.join(good)}"
    else:
        found = "no context gives a gap that separates correct from wrong completions (no AUC CI above 0.5)"
    if anti:
        found += (
            f"; it anti-separates (AUC CI below 0.5: the teacher prefers wrong completions, harmful under "
            f"CAST's flip rule) with: {', '.join(anti)}"
        )
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
        advice += ": use GRPO (algorithm.name=grpo)"
        if mix["all_wrong"] > MAX_ZERO_VARIANCE_SIDE:
            advice += ", or bring the setting closer to the paper's: an easier task, a warm start or a larger model"
    line = f"{found}; {mix_line}; {advice}."
    return f"{line} {default}" if default else line


def describe_default(recipe, path) -> str:
    """What the default recipe trains, in a sentence (the verdict's last)."""
    from cast_mlx.algorithm.facts import facts_of

    a, facts = recipe.algorithm.name, facts_of(recipe.algorithm.name)
    context = f", teacher.context={recipe.teacher.context}" if facts.uses_teacher else ""
    return f"The default recipe ({path}) trains {a}{context}: {facts.summary}."


def compare_vectors(v: np.ndarray | None, g: np.ndarray | None) -> dict:
    """Cosine of `v` with `g`, the norm of their difference relative to `g`'s, and both
    norms; None where a gradient is missing (no row carried loss) or zero."""
    keys = ("cosine", "relative_difference", "norm_variant", "norm_grpo")
    out: dict[str, float | None] = dict.fromkeys(keys)
    if v is None or g is None:
        return out
    nv, ng = float(np.linalg.norm(v)), float(np.linalg.norm(g))
    out.update(norm_variant=nv, norm_grpo=ng)
    if nv and ng:
        out["cosine"] = float(v @ g / (nv * ng))
        out["relative_difference"] = float(np.linalg.norm(v - g) / ng)
    return out


def token_weights(variant: np.ndarray, grpo: np.ndarray, content: np.ndarray, correct: np.ndarray) -> dict:
    """The mean weight `A_variant / A_GRPO` of content tokens where GRPO's advantage is not 0,
    on correct and on wrong completions (1.0: the same step; the share of those tokens whose
    sign the variant flips)."""
    sel = content & (grpo != 0)
    rows = np.broadcast_to(np.asarray(correct, dtype=bool)[:, None], sel.shape)
    ratio = np.divide(variant, grpo, out=np.zeros_like(variant, dtype=np.float64), where=sel)
    out = {}
    for name, part in (("correct", sel & rows), ("wrong", sel & ~rows)):
        out[f"weight_{name}"] = float(ratio[part].mean()) if part.any() else None
        out[f"flipped_{name}"] = float((ratio[part] < 0).mean()) if part.any() else None
    return out


def report(c: Collected, group_size: int, seed: int = 0, n_resamples: int = 1000, default: str | None = None) -> dict:
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
        "verdict": verdict(contexts, mix, default),
        "seconds": c.seconds,
        "completions": rows,
    }

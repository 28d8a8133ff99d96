"""The step record: what one training step sampled, judged and computed, passed from stage
to stage (sample -> rewards -> teacher -> advantages -> update -> metrics)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from cast_mlx.algorithm.estimators import get_estimator
from cast_mlx.algorithm.teacher import (
    Teacher,
    model_logprobs,
    reference_logprobs,
    row_contexts,
    swapped_lora,
    teacher_gaps,
)
from cast_mlx.engine import rollout
from cast_mlx.tasks import data, rewards
from cast_mlx.tasks.rewards import RowRewards


@dataclass
class Trajectory:
    """One step's rows on this process: `P` problems x `G` completions (`N = P * G` rows,
    `[N, L]` per-token arrays). Sampling fills the first fields; each stage adds its own."""

    problems: list  # this rank's problems, one per group
    prompts: list[list[int]]  # the student's prompt ids, one per problem
    rollout: Any  # the rollout engine's output: tokens, logprobs, mask, lengths, finish_reasons, frozen
    group_size: int
    texts: list[str] | None = None  # completions, decoded without the final EOS token
    judged: RowRewards | None = None
    rewards: mx.array | None = None  # [N] what the estimator reads
    mask: mx.array | None = None  # [N, L] the rollout's mask, dropped rows zeroed
    truncated: mx.array | None = None  # [N] 1.0 where the completion hit the token cap
    special: mx.array | None = None  # [N, L] end-of-turn and template tokens
    eos: mx.array | None = None  # [N, L] the final EOS token of each finished row
    gaps: mx.array | None = None  # [N, L] teacher minus old log-probs (zeros without a teacher)
    teacher_lp: mx.array | None = None  # [N, L] the `same` teacher's log-probs while its gaps wait for the update
    ref_lp: mx.array | None = None  # [N, L] the KL reference's log-probs (beta > 0 only)
    adv: mx.array | None = None  # [N, L] advantages
    base: mx.array | None = None  # [N] base (sequence-level) advantages

    @property
    def n_rows(self) -> int:
        return len(self.problems) * self.group_size

    def per_row(self, values: list) -> list:
        """A per-problem list repeated for each of the problem's `G` rows."""
        return [values[i // self.group_size] for i in range(self.n_rows)]

    @property
    def contexts(self) -> list[list[int]]:
        """The student's prompt of every row."""
        return self.per_row(self.prompts)

    def columns(self) -> dict[str, mx.array]:
        """The per-row arrays the metrics read, to be gathered over processes."""
        j = self.judged
        assert j is not None, "columns() needs the rewards stage's results"
        return {
            "rewards": self.rewards,
            "base": self.base,
            "gaps": self.gaps,
            "adv": self.adv,
            "mask": self.mask,
            "truncated": self.truncated,
            "lengths": self.rollout.lengths,
            "special": self.special,
            "eos": self.eos,
            "strict": mx.array(j.strict),
            "lenient": mx.array(j.lenient),
            "dropped": mx.array(j.dropped),
            **{f"reward_fn/{name}": mx.array(values, dtype=mx.float32) for name, values in j.judged.items()},
        }

    def sample_records(self, step: int, n: int) -> list[dict]:
        """The first `n` rows as the samples file's records."""
        texts, rewards = self.texts or [], self.rewards
        assert rewards is not None
        return [
            {
                "step": step,
                "problem": self.problems[i // self.group_size].question,
                "gold": self.problems[i // self.group_size].gold,
                "completion": texts[i],
                "reward": float(cast(float, rewards[i].item())),
                "finish": self.rollout.finish_reasons[i],
            }
            for i in range(min(n, len(texts)))
        ]


# --------------------------------------------------------------------------- the stages that fill it


def judge(traj: Trajectory, tokenizer, recipe, verifier, reward_fns: list, special_ids: list[int]) -> None:
    """The rewards stage: decode, judge, and the per-row masks the later stages read."""
    r, out = recipe, traj.rollout
    traj.texts = texts = rollout.decode_completions(tokenizer, out)  # without the final EOS token

    def plugin_inputs():  # what reward plug-ins may read besides the completions
        lengths = [int(n) for n in out.lengths.tolist()]
        columns = {
            "questions": traj.per_row([p.question for p in traj.problems]),
            "solutions": traj.per_row([p.solution for p in traj.problems]),
            "completion_ids": [out.tokens[i, : lengths[i]].tolist() for i in range(len(texts))],
            "lengths": lengths,
            "truncated": [f == "length" for f in out.finish_reasons],
        }
        return [tokenizer.decode(p) for p in traj.contexts], columns

    traj.judged = rewards.judge_rows(
        traj.per_row([p.gold for p in traj.problems]),
        texts,
        fns=reward_fns,
        verifier=verifier,
        answer_format=r.data.answer_format,
        strictness=r.data.reward,
        reward=r.reward,
        max_new_tokens=r.sampling.max_new_tokens,
        binary=get_estimator(r.algorithm.name).uses_teacher,
        plugin_inputs=plugin_inputs,
    )
    row_arrays(traj, special_ids)


def row_arrays(traj: Trajectory, special_ids: list[int]) -> None:
    """The per-row arrays the later stages read, from the rollout and the judged rewards."""
    j, out = traj.judged, traj.rollout
    assert j is not None
    traj.rewards = mx.array(j.values, dtype=mx.float32)
    keep = mx.array([0.0 if d else 1.0 for d in j.dropped])[:, None]
    traj.mask = mask = out.mask * keep
    traj.truncated = truncated = mx.array([1.0 if f == "length" else 0.0 for f in out.finish_reasons])
    traj.special, traj.eos = rollout.special_and_eos(out.tokens, out.lengths, truncated, mask, special_ids)


def merge_groups(parts: list[tuple[Trajectory, list[int]]], special_ids: list[int]) -> Trajectory:
    """One judged trajectory of the groups `groups` of each judged trajectory of `parts`, in
    order (dynamic sampling's rounds); per-token arrays are right-padded to the longest row."""
    g = parts[0][0].group_size
    problems, prompts, texts, rows_of = [], [], [], []
    for traj, groups in parts:
        assert traj.judged is not None and traj.texts is not None, "merge_groups needs judged trajectories"
        rows = [p * g + k for p in groups for k in range(g)]
        problems += [traj.problems[p] for p in groups]
        prompts += [traj.prompts[p] for p in groups]
        texts += [traj.texts[i] for i in rows]
        rows_of.append(rows)
    outs = [traj.rollout for traj, _ in parts]
    width = max(int(o.lengths[mx.array(rows)].max().item()) for o, rows in zip(outs, rows_of))

    def stacked(arrays: list[mx.array]) -> mx.array:  # each one's rows, cut or padded to `width`
        pieces = [x[mx.array(rows), :width] for x, rows in zip(arrays, rows_of)]
        return mx.concatenate([mx.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2)) for x in pieces])

    frozen = None
    if (f0 := outs[0].frozen) is not None:
        fs = [cast(Any, o.frozen) for o in outs]
        frozen_prompts = [f.prompts[p] for f, (_, groups) in zip(fs, parts) for p in groups]
        frozen = dataclasses.replace(f0, prompts=frozen_prompts, completions=stacked([f.completions for f in fs]))
    merged = dataclasses.replace(
        outs[0],
        tokens=stacked([o.tokens for o in outs]),
        mask=stacked([o.mask for o in outs]),
        logprobs=stacked([o.logprobs for o in outs]),
        lengths=mx.concatenate([o.lengths[mx.array(rows)] for o, rows in zip(outs, rows_of)]),
        finish_reasons=[o.finish_reasons[i] for o, rows in zip(outs, rows_of) for i in rows],
        prompt_ids=prompts,
        prompt_index=mx.arange(len(texts), dtype=mx.int32) // g,
        prefill_tokens=sum(o.prefill_tokens for o in outs),
        decode_tokens=sum(o.decode_tokens for o in outs),
        seconds=sum(o.seconds for o in outs),
        prefill_seconds=sum(o.prefill_seconds for o in outs),
        frozen=frozen,
    )
    judged = [cast(RowRewards, traj.judged) for traj, _ in parts]

    def pick(lists: list[list]) -> list:  # each one's rows, in order
        return [x[i] for x, rows in zip(lists, rows_of) for i in rows]

    out = Trajectory(problems, prompts, merged, g, texts=texts)
    out.judged = RowRewards(
        values=pick([j.values for j in judged]),
        strict=pick([j.strict for j in judged]),
        lenient=pick([j.lenient for j in judged]),
        dropped=pick([j.dropped for j in judged]),
        judged={n: pick([j.judged[n] for j in judged]) for n in judged[0].judged},
    )
    row_arrays(out, special_ids)
    return out


def teacher_rows(traj: Trajectory, tokenizer, recipe) -> list[list[int]]:
    """The teacher's context of every row, as `teacher.context` builds it."""
    return row_contexts(
        recipe.teacher.context,
        tokenizer,
        [p.question for p in traj.problems],
        traj.prompts,
        [p.solution or p.gold for p in traj.problems],
        data.ANSWER_INSTRUCTIONS.get(recipe.data.answer_format, ""),  # none: no instruction
        traj.group_size,
    )


def score_teacher(traj: Trajectory, model, tokenizer, recipe, teacher: Teacher | None, ref_params) -> None:
    """The teacher stage: the gaps (zeros without a teacher) and the KL reference's log-probs."""
    r, out, mask = recipe, traj.rollout, traj.mask
    assert mask is not None, "the teacher stage runs after the rewards stage"
    common: dict[str, Any] = dict(
        temperature=r.sampling.temperature, micro_batch=r.optimizer.micro_batch_size, share_prefix=r.system.share_prefix
    )
    contexts = traj.contexts
    teacher_ctx = teacher_rows(traj, tokenizer, recipe) if teacher is not None else contexts
    same = r.teacher.context == "same"
    defer = same and r.loss.num_iterations == 1  # lp_old is then the update's own forward (`gaps_after_update`)
    traj.gaps, lp_t = teacher_gaps(
        model, teacher, teacher_ctx, contexts, out, mask, same_context=same, defer=defer, **common
    )
    traj.teacher_lp = lp_t if traj.gaps is None else None
    if ref_params is not None:
        traj.ref_lp = reference_logprobs(model, ref_params, contexts, out, mask, **common)
    mx.eval(traj.gaps if traj.gaps is not None else traj.teacher_lp)


def advantages_in_update(traj: Trajectory, advantages, step: int):
    """For gaps that wait for the update: `(rows, lp_old) -> advantages of those rows`, from
    `lp_old`, the log-probs of the update's forward on them. The estimator runs on the whole
    batch (its base advantages read every row's reward) with zero gaps in the other rows;
    the token rules read a row's own gaps only, so the rows' values are the batch's."""
    lp_t, mask, special = traj.teacher_lp, traj.mask, traj.special
    assert lp_t is not None and mask is not None

    def of(rows: list[int], lp_old: mx.array) -> mx.array:
        idx, length = mx.array(rows), lp_old.shape[1]
        gaps = mx.zeros((traj.n_rows, length))
        gaps[idx] = (lp_t[idx, :length] - lp_old) * mask[idx, :length]
        cut = None if special is None else special[:, :length]
        return advantages(traj.rewards, gaps, mask[:, :length], step=step, special=cut)[0][idx]

    return of


def gaps_after_update(traj: Trajectory, model, recipe, behaviour: list, before: dict) -> None:
    """The deferred gaps `lp_T - lp_old`: `lp_old` from the update's forward (`behaviour`: its
    micro-batches' rows and log-probs before the step) and, for the rows it skipped (no
    loss), from a pass of the policy as it was (`before`: its LoRA tensors before the step),
    so that every row's gaps reach the metrics."""
    r, out, mask = recipe, traj.rollout, traj.mask
    lp_t = traj.teacher_lp
    assert lp_t is not None and mask is not None
    n, length = mask.shape
    done = {i for rows, _ in behaviour for i in rows}
    rest = [i for i in range(n) if i not in done]
    with swapped_lora(model, before):
        lp_old = model_logprobs(
            model,
            traj.contexts,
            out.tokens,
            mask,
            r.sampling.temperature,
            r.optimizer.micro_batch_size,
            r.system.share_prefix,
            out.frozen,
            rest,
            numpy_passes=False,  # as the update's forward computes the other rows' lp_old
        )
    for rows, lp in behaviour:
        lp_old[mx.array(rows)] = mx.pad(lp, [(0, 0), (0, length - lp.shape[1])])
    traj.gaps = (lp_t - lp_old) * mask
    traj.teacher_lp = None
    mx.eval(traj.gaps)

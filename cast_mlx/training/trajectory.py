"""The step record: what one training step sampled, judged and computed, passed from stage
to stage (sample -> rewards -> teacher -> advantages -> update -> metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from cast_mlx.algorithm.advantages import get_estimator
from cast_mlx.algorithm.teacher import Teacher, reference_logprobs, row_contexts, teacher_gaps
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

    traj.judged = j = rewards.judge_rows(
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
    traj.rewards = mx.array(j.values, dtype=mx.float32)
    keep = mx.array([0.0 if d else 1.0 for d in j.dropped])[:, None]
    traj.mask = mask = out.mask * keep
    traj.truncated = truncated = mx.array([1.0 if f == "length" else 0.0 for f in out.finish_reasons])
    traj.special, traj.eos = rollout.special_and_eos(out.tokens, out.lengths, truncated, mask, special_ids)


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
    traj.gaps, _ = teacher_gaps(model, teacher, teacher_ctx, contexts, out, mask, same_context=same, **common)
    if ref_params is not None:
        traj.ref_lp = reference_logprobs(model, ref_params, contexts, out, mask, **common)
    mx.eval(traj.gaps)

"""The CAST self-teacher (spec section 3): same network, lagged LoRA, answer-free context.

The teacher is the policy network with a *snapshot of its LoRA tensors*: base weights are
shared, only the small adapter tensors are held twice. MLX arrays are immutable and the
optimizer replaces them rather than writing into them, so a snapshot is just a dict of the
current arrays (no copy). Scoring swaps the snapshot in, runs a forward under
`mx.stop_gradient`, and swaps the policy's own tensors back.

Kinds (`teacher.kind`):
- `snapshot` (default): refreshed every `refresh` optimizer steps; at step 0 it is the
  initial adapter, i.e. the base model (lora_b = 0).
- `base`: adapters disabled (lora_b = 0 in the view), never refreshed: a fixed teacher.
- `ema`: after every optimizer step, `teacher = decay * teacher + (1 - decay) * policy`.

Contexts (`teacher.context`), built by `teacher_contexts`; no chat template except `same`:
- `instructed` (CAST's default, the spec's answer-free context, as the authors build it):
  the problem text, a blank line, the task's answer instruction, a blank line,
  `[Student response]` and a newline.
- `question-only`: the same without the instruction; an ablation (called `plain` before).
- `same` (the veRL port's default): exactly the student's chat-templated prompt, so the
  gap is the weight lag alone (0 right after a refresh).
- `privileged`: `question-only` with a `[Reference solution]` block (the gold) before the
  student header: RLSD's, and an oracle's (`teacher.oracle`), never CAST's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from cast_mlx.algorithm.facts import TEACHER_CONTEXTS
from cast_mlx.engine import packed
from cast_mlx.engine.logprobs import Batch, score_in_buckets, token_logprobs
from cast_mlx.engine.models import lora_state

STUDENT_HEADER = "[Student response]"
REFERENCE_HEADER = "[Reference solution]"


def question_only_context(question: str) -> str:
    return f"{question}\n\n{STUDENT_HEADER}\n"


def instructed_context(question: str, instruction: str) -> str:
    return f"{question}\n\n{instruction}\n\n{STUDENT_HEADER}\n"


def privileged_context(question: str, reference: str) -> str:
    return f"{question}\n\n{REFERENCE_HEADER}\n{reference}\n\n{STUDENT_HEADER}\n"


def teacher_contexts(
    mode: str | None,
    tokenizer,
    questions: list[str],
    student_prompts: list[list[int]],
    references: list[str] | None = None,
    instruction: str | None = None,
) -> list[list[int]]:
    """Token ids of the teacher's context for each prompt (one per prompt, not per row).
    `references` (gold or solution) are needed for `privileged`, `instruction` (the task's
    answer instruction, `data.ANSWER_INSTRUCTIONS`) for `instructed`."""
    if mode == "same":
        return [list(p) for p in student_prompts]
    if mode == "question-only":
        texts = [question_only_context(q) for q in questions]
    elif mode == "instructed":
        if instruction is None:
            raise ValueError("teacher.context=instructed needs the task's answer instruction")
        texts = [instructed_context(q, instruction) for q in questions]
    elif mode == "privileged":
        if references is None:
            raise ValueError("teacher.context=privileged needs the reference answers")
        texts = [privileged_context(q, r) for q, r in zip(questions, references)]
    else:
        raise ValueError(f"teacher.context: unknown mode {mode!r}; choose one of {TEACHER_CONTEXTS}")
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def adapters_off(params: dict) -> dict:
    """LoRA tensors with every `lora_b` zeroed: the adapted model computes the base model."""
    return {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in params.items()}


@dataclass
class Teacher:
    """A frozen view of the LoRA tensors, and the rule that refreshes it."""

    kind: str = "snapshot"
    refresh: int = 10
    ema_decay: float = 0.99
    params: dict = field(default_factory=dict)  # flat name -> array
    version: int = 0  # optimizer step of the last refresh

    @classmethod
    def create(cls, model: nn.Module, kind: str = "snapshot", refresh: int = 10, ema_decay: float = 0.99) -> "Teacher":
        if kind not in ("snapshot", "base", "ema"):
            raise ValueError(f"teacher.kind: unknown {kind!r}; choose snapshot, base or ema")
        params = lora_state(model)
        if kind == "base":
            params = adapters_off(params)
        return cls(kind=kind, refresh=refresh, ema_decay=ema_decay, params=params)

    def after_step(self, model: nn.Module, step: int) -> bool:
        """Call after optimizer step `step` (1-based). Returns True when the view changed."""
        if self.kind == "base":
            return False
        current = lora_state(model)
        if self.kind == "ema":
            d = self.ema_decay
            self.params = {k: d * self.params[k] + (1 - d) * current[k] for k in current}
            mx.eval(self.params)
            self.version = step
            return True
        if step % self.refresh == 0:
            self.params = current
            self.version = step
            return True
        return False

    def is_policy(self, model: nn.Module) -> bool:
        """Whether the view holds exactly the policy's LoRA tensors (a snapshot not yet moved
        by an update: the same arrays, or equal ones after a resume)."""
        current = lora_state(model)
        return current.keys() == self.params.keys() and all(
            a is self.params[k] or bool(mx.array_equal(a, self.params[k])) for k, a in current.items()
        )

    def score(
        self, model: nn.Module, batch: Batch, temperature: float, chunk: int = 64, numpy_passes: bool = True
    ) -> mx.array:
        """Teacher log-probs `[N, L]` of the batch's completion tokens (no gradient;
        `numpy_passes`: `token_logprobs`')."""
        with swapped_lora(model, self.params):
            lp = mx.stop_gradient(token_logprobs(model, batch, temperature, chunk=chunk, numpy_passes=numpy_passes))
            mx.eval(lp)
        return lp

    def score_packed(
        self, model: nn.Module, contexts, tokens, mask, temperature: float, budget: int, chunk: int = 512
    ) -> mx.array:
        """`score` for rows on contexts of their own, packed (`packed.packed_logprobs`, where
        `packed.supported(model)`): the same log-probs to float rounding, with fewer and
        larger matmuls."""
        with swapped_lora(model, self.params):
            return packed.packed_logprobs(model, contexts, tokens, mask, temperature, budget, chunk=chunk)

    def state(self) -> dict:
        return dict(self.params)


class swapped_lora:
    """Context manager: load `params` into the model's LoRA tensors, restore on exit."""

    def __init__(self, model: nn.Module, params: dict):
        self.model, self.params = model, params

    def __enter__(self):
        self.saved = lora_state(self.model)
        self.model.update(tree_unflatten(list(self.params.items())))
        return self.model

    def __exit__(self, *exc):
        self.model.update(tree_unflatten(list(self.saved.items())))
        return False


# --------------------------------------------------------------------------- the teacher stage


def row_contexts(
    mode: str | None,
    tokenizer,
    questions: list[str],
    prompts: list[list[int]],
    references: list[str],
    instruction: str,
    group_size: int,
) -> list[list[int]]:
    """The teacher's context of every row (one per prompt, repeated `group_size` times)."""
    ctx = teacher_contexts(mode, tokenizer, questions, prompts, references, instruction)
    return [ctx[i // group_size] for i in range(len(questions) * group_size)]


def model_logprobs(
    model, contexts, tokens, mask, temperature, micro_batch, share_prefix, frozen=None, rows=None, numpy_passes=True
) -> mx.array:
    """The model's own log-probs `[N, L]` of the rows' tokens (of `rows` only; the others
    0), chunked, without gradient (`numpy_passes`: `token_logprobs`')."""
    return score_in_buckets(
        lambda b: mx.stop_gradient(token_logprobs(model, b, temperature, numpy_passes=numpy_passes)),
        contexts,
        tokens,
        mask,
        micro_batch,
        share_prefix,
        frozen,
        rows,
    )


def teacher_gaps(
    model: nn.Module,
    teacher: Teacher | None,
    contexts: list[list[int]],
    student_contexts: list[list[int]],
    out,
    mask: mx.array,
    *,
    same_context: bool,
    temperature: float,
    micro_batch: int,
    share_prefix: bool,
    defer: bool = False,
) -> tuple[mx.array | None, mx.array | None]:
    """`g = lp_T - lp_old` `[N, L]` (zeros without a teacher) and the teacher log-probs.

    `lp_old` is the sampler's log-probs (`out.logprobs`), except for a teacher on the
    student's own prompt (`same_context`), whose gaps come from the weight lag alone and are
    smaller than the sampler's KV-cache path differs (~1e-4, which would flip tokens at
    random). There `lp_old` is the policy's chunked forward:
    - a teacher that holds the policy's weights (`Teacher.is_policy`) gives g = 0 exactly,
      with nothing scored;
    - with `defer`, the gaps are left to the update, whose forward computes `lp_old` (spec
      step 3: `lp_old = stop_gradient(lp_theta)`); the gaps returned are None;
    - else the policy is scored here by the teacher's chunked forward.
    Deferred gaps are read against the update's log-probs, so the teacher then scores with
    MLX's ops as the update does (bit-identical), not numpy's (`token_logprobs`)."""
    if teacher is None:
        return mx.zeros(mask.shape), None
    if same_context and teacher.is_policy(model):
        return mx.zeros(mask.shape), None
    # the rollout's frozen-block states are the student's context's (the `same` teacher's)
    frozen = out.frozen if contexts == student_contexts else None
    numpy_passes = not (same_context and defer)  # deferred: read against the update's own log-probs
    if frozen is None and numpy_passes and share_prefix and packed.supported(model):
        # its own contexts: every row in one forward where a bucket's positions allow, and
        # the head's logits a full bucket's chunk at a time (`token_logprobs`: 64 a row)
        budget = micro_batch * mask.shape[1] + max(len(c) for c in contexts)
        lp_t = teacher.score_packed(model, contexts, out.tokens, mask, temperature, budget, chunk=64 * micro_batch)
    else:
        lp_t = score_in_buckets(
            lambda b: teacher.score(model, b, temperature, numpy_passes=numpy_passes),
            contexts, out.tokens, mask, micro_batch, share_prefix, frozen,
        )  # fmt: skip
    if same_context and defer:
        return None, lp_t
    if same_context:
        lp_old = model_logprobs(model, contexts, out.tokens, mask, temperature, micro_batch, share_prefix, frozen)
    else:
        lp_old = out.logprobs
    return (lp_t - lp_old) * mask, lp_t


def reference_logprobs(
    model: nn.Module,
    ref_params: dict,
    contexts: list[list[int]],
    out,
    mask: mx.array,
    *,
    temperature: float,
    micro_batch: int,
    share_prefix: bool,
) -> mx.array:
    """Log-probs `[N, L]` of the KL reference (the adapters disabled) on the student's rows."""
    with swapped_lora(model, ref_params):
        ref_lp = model_logprobs(model, contexts, out.tokens, mask, temperature, micro_batch, share_prefix, out.frozen)
        mx.eval(ref_lp)  # inside the swap
    return ref_lp

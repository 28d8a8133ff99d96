"""What each algorithm is, declared once and read everywhere (recipe defaults and checks,
the estimator registry, the dashboard): pure Python, so that a recipe validates without
loading MLX. `cast_mlx.algorithm.estimators` registers one kernel per declared name."""

from __future__ import annotations

from dataclasses import dataclass, fields

SCALE_REWARDS = ("none", "group", "batch")
# What the teacher reads before the completion (spec section 3; `algorithm.teacher` builds them):
# instructed: the question with the task's answer instruction (the authors' answer-free context);
# question-only: the question alone (an ablation); same: the student's own prompt (the veRL
# port's: the gap is the weight lag); privileged: with the gold answer (RLSD; an oracle for CAST).
TEACHER_CONTEXTS = ("instructed", "question-only", "same", "privileged")
RENAMED_CONTEXTS = {"plain": "question-only"}  # old name -> new, so older run folders still load


@dataclass(frozen=True)
class AlgorithmFacts:
    name: str
    uses_teacher: bool  # the kernel reads the teacher's gaps, so the trainer scores a teacher
    flips: bool  # a token's advantage may take the sign opposite to its row's base advantage
    clips_at_a_max: bool  # every token advantage is clipped to [-a_max, a_max]
    answer_free: bool  # the teacher never sees the reference answer (no `privileged` context)
    zero_var_base: bool  # all-correct / all-wrong groups get `±zero_var_base` instead of 0
    scale_rewards: str  # the default of `algorithm.scale_rewards` (spec section 2)
    teacher_context: str  # the default of `teacher.context` (spec section 3)
    summary: str  # what it does, in a line (the dashboard and the run header say this)


ALGORITHMS: dict[str, AlgorithmFacts] = {}


def declare(facts: AlgorithmFacts) -> AlgorithmFacts:
    """Add `facts` to the table after checking every field: a bad or repeated declaration
    raises a ValueError and leaves the table as it was."""
    for f in fields(AlgorithmFacts):
        value = getattr(facts, f.name)
        expected = bool if f.type in ("bool", bool) else str
        if not isinstance(value, expected):
            raise ValueError(f"algorithm {facts.name!r}: {f.name} must be a {expected.__name__}, got {value!r}")
    if not facts.name.strip():
        raise ValueError("algorithm: the name must not be empty")
    if facts.name in ALGORITHMS:
        raise ValueError(f"algorithm {facts.name!r} is declared twice")
    if facts.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"algorithm {facts.name!r}: scale_rewards {facts.scale_rewards!r} not in {SCALE_REWARDS}")
    if facts.teacher_context not in TEACHER_CONTEXTS:
        raise ValueError(
            f"algorithm {facts.name!r}: teacher_context {facts.teacher_context!r} not in {TEACHER_CONTEXTS}"
        )
    if facts.answer_free and facts.teacher_context == "privileged":
        raise ValueError(f"algorithm {facts.name!r}: an answer-free teacher cannot default to 'privileged'")
    if not facts.uses_teacher and (facts.flips or facts.zero_var_base):
        raise ValueError(f"algorithm {facts.name!r}: flips and zero-variance bases need a teacher-shaped rule")
    ALGORITHMS[facts.name] = facts
    return facts


def facts_of(name: str) -> AlgorithmFacts:
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm: unknown name {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


declare(
    AlgorithmFacts(
        "grpo",
        uses_teacher=False,
        flips=False,
        clips_at_a_max=False,
        answer_free=True,
        zero_var_base=False,
        scale_rewards="group",
        teacher_context="instructed",  # unused: no teacher
        summary="GRPO: every token of a completion gets its group-normalised reward",
    )
)
declare(
    AlgorithmFacts(
        "cast",
        uses_teacher=True,
        flips=True,
        clips_at_a_max=True,
        answer_free=True,
        zero_var_base=True,
        scale_rewards="none",
        teacher_context="instructed",
        summary=(
            "CAST's rule: the teacher's gap scales each token's advantage and flips its sign where the teacher "
            "disagrees with the verifier, clipped at ±a_max; all-correct/all-wrong groups get ±zero_var_base"
        ),
    )
)
declare(
    AlgorithmFacts(
        "cast-verl",
        uses_teacher=True,
        flips=False,
        clips_at_a_max=False,
        answer_free=True,
        zero_var_base=True,
        scale_rewards="group",
        teacher_context="same",
        summary=(
            "the veRL port's rule, GRPO with a teacher reweighting: the gap scales each token's advantage within "
            "the boxes (x0.8-1.05 on correct, x0.95-1.2 on wrong completions by default); no flips"
        ),
    )
)
declare(
    AlgorithmFacts(
        "rlsd",
        uses_teacher=True,
        flips=False,
        clips_at_a_max=False,
        answer_free=False,
        zero_var_base=False,
        scale_rewards="group",
        teacher_context="privileged",
        summary="RLSD: GRPO reweighted per token by a teacher that sees the reference solution",
    )
)

"""Answer extraction and math-answer equivalence, exact, safe and bounded (docs/design.md, "The
verifier"):

- `extract`: the answer of a completion (`####`, boxed, last number).
- `normalize`: noise -> a canonical string; exact values of plain numbers.
- `parser`: a whitelist parser that builds sympy objects itself, within `limits`.
- `equivalence`: the ladder string -> exact number -> sympy equality.
- `verdict`: the strict/lenient plan shared by `verify` and `Verifier`.
- `pool`: `TimeoutPool` (workers killed on timeout) and `Verifier` (memoised, parallel).
- `mathverify`: the optional `math_verify` reward (Hugging Face's math-verify), in the workers.

A gold answer that cannot be parsed makes `verify` return None (the row leaves the loss)."""

from __future__ import annotations

from cast_mlx.tasks.verify.equivalence import (
    ParsedAnswer,
    expressions_equal,
    is_equivalent,
    objects_equal,
    parse_gold,
    quick_equivalent,
)
from cast_mlx.tasks.verify.extract import (
    ANSWER_FORMATS,
    extract_answer,
    extract_boxed,
    extract_hash,
    extract_last_number,
    lenient_answer,
)
from cast_mlx.tasks.verify.limits import (
    EXTRACT_TAIL_CHARS,
    MAX_ANSWER_CHARS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_FACTORIAL,
    MAX_NODES,
    MAX_RESULT_DIGITS,
    MAX_SYMBOLIC_EXPONENT,
    MAX_TOKENS,
)
from cast_mlx.tasks.verify.normalize import normalize_answer, parse_number
from cast_mlx.tasks.verify.parser import ParseError, parse_expression, tokenize
from cast_mlx.tasks.verify.pool import TimeoutPool, Verifier
from cast_mlx.tasks.verify.verdict import Verdict, judge

REWARD_MODES = ("strict", "lenient", "strict_or_lenient")

__all__ = [
    "ANSWER_FORMATS",
    "EXTRACT_TAIL_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_FACTORIAL",
    "MAX_NODES",
    "MAX_RESULT_DIGITS",
    "MAX_SYMBOLIC_EXPONENT",
    "MAX_TOKENS",
    "REWARD_MODES",
    "ParseError",
    "ParsedAnswer",
    "TimeoutPool",
    "Verdict",
    "Verifier",
    "expressions_equal",
    "extract_answer",
    "extract_boxed",
    "extract_hash",
    "extract_last_number",
    "is_equivalent",
    "judge",
    "lenient_answer",
    "normalize_answer",
    "objects_equal",
    "parse_expression",
    "parse_gold",
    "parse_number",
    "quick_equivalent",
    "reward",
    "tokenize",
    "verify",
]


def verify(completion: str, gold: str, answer_format: str = "hash") -> Verdict | None:
    """Score one completion against a gold answer (in this process; see `Verifier`).

    Returns None when the gold cannot be parsed, so the row can be dropped.
    """
    return judge(completion, gold, answer_format)


def reward(verdict: Verdict | None, mode: str = "strict_or_lenient") -> float | None:
    """Binary reward from a verdict; None passes through (unusable gold: drop the row).

    - "strict": 1.0 iff the answer is in the required format and correct.
    - "lenient": 1.0 iff the first answer found in any format is correct.
    - "strict_or_lenient" (default): 1.0 iff either is correct. The required format is
      tried first by the lenient chain, so this equals "lenient"; the name records the
      intent (format-following is not required to earn reward).
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    if verdict is None:
        return None
    if mode == "strict":
        return float(verdict.strict)
    if mode == "lenient":
        return float(verdict.lenient)
    return float(verdict.strict or verdict.lenient)

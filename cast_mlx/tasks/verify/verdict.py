"""The strict/lenient plan: which answers of a completion are judged, and how their
verdicts combine. `verify` (in this process) and `Verifier` (memo + worker processes)
both go through `plan` and `Plan.verdict`; they differ only in how one (answer, gold)
pair is decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cast_mlx.tasks.verify.equivalence import ParsedAnswer, equivalent, parse_gold
from cast_mlx.tasks.verify.extract import ANSWER_FORMATS, extract_answer, lenient_answer


@dataclass
class Verdict:
    """strict: the required format was found and is correct. lenient: the first answer
    found (required format, the other format, last number) is correct. pred: that answer."""

    strict: bool
    lenient: bool
    pred: str | None


def check_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


@dataclass
class Plan:
    """The answers to judge for one completion: `strict_answer` in the required format,
    `lenient_answer` the first found in any format (often the same string)."""

    gold: str
    parsed_gold: ParsedAnswer
    strict_answer: str | None
    lenient_answer: str | None

    def answers(self) -> list[str]:
        """The answers that need an (answer, gold) decision."""
        return [a for a in (self.strict_answer, self.lenient_answer) if a is not None]

    def verdict(self, decide: Callable[[str], bool]) -> Verdict:
        """Combine `decide(answer)` (is this answer equal to the gold?) into a verdict."""
        strict = self.strict_answer is not None and decide(self.strict_answer)
        if self.lenient_answer == self.strict_answer:
            lenient = strict  # one answer, one decision
        else:
            lenient = self.lenient_answer is not None and decide(self.lenient_answer)
        return Verdict(strict=strict, lenient=lenient, pred=self.lenient_answer)


def plan(completion: str, gold: str, answer_format: str) -> Plan | None:
    """Extract the strict and lenient answers; None when the gold cannot be parsed."""
    check_format(answer_format)
    parsed_gold = parse_gold(gold)
    if parsed_gold is None:
        return None
    return Plan(gold, parsed_gold, extract_answer(completion, answer_format), lenient_answer(completion, answer_format))


def judge(completion: str, gold: str, answer_format: str) -> Verdict | None:
    """`plan` and `Plan.verdict` with every pair decided here by the full ladder."""
    p = plan(completion, gold, answer_format)
    if p is None:
        return None
    return p.verdict(lambda answer: equivalent(answer, p.parsed_gold))

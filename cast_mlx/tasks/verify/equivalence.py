"""Equivalence of a predicted and a gold answer: the same normalised string, then the same exact
rational, then sympy equality (variables compared at sample points). The cheap rungs
(`quick_equivalent`) need no sympy; an unparseable gold gives None (`parse_gold`). The
ladder in full: docs/design.md, "The verifier"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import sympy

from cast_mlx.tasks.verify.limits import MAX_ANSWER_CHARS
from cast_mlx.tasks.verify.normalize import normalize_answer, parse_number, string_key
from cast_mlx.tasks.verify.parser import ParseError, parse_expression

# Short prose answers (a name, "(C)") and numbers in a base ("4210_5"), compared as text.
_TEXT_ANSWER = re.compile(r"^\(?[A-Za-z][A-Za-z '\-]{0,58}\)?$|^[0-9A-Za-z]+_\d{1,2}$")


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer in every form the ladder compares.

    text: normalised string; number/percent: exact value if it is a plain number;
    expr: sympy object if the parser accepts it; is_text: a short prose answer (a name,
    a multiple-choice letter) compared case-insensitively.
    """

    text: str
    number: Fraction | None
    percent: bool
    expr: object | None
    is_text: bool


def _parse_answer(answer: str) -> ParsedAnswer:
    text = normalize_answer(answer)
    number = parse_number(text)
    expr = None
    if number is None and len(text) <= MAX_ANSWER_CHARS:
        try:
            expr = parse_expression(text)
        except (ParseError, TypeError, ValueError, ArithmeticError, RecursionError):
            expr = None
    is_text = bool(_TEXT_ANSWER.match(text))
    value, percent = number if number is not None else (None, False)
    return ParsedAnswer(text, value, percent, expr, is_text)


@lru_cache(maxsize=16384)
def parse_gold(gold: str) -> ParsedAnswer | None:
    """Parse a reference answer; None when it is empty or not something we can compare.

    A gold is usable when it is an exact number, an expression the parser accepts, or a
    short prose answer (compared as a case-insensitive string).
    """
    if not isinstance(gold, str) or not gold.strip():
        return None
    if len(gold.strip()) > MAX_ANSWER_CHARS:
        return None
    parsed = _parse_answer(gold)
    if not parsed.text:
        return None
    if parsed.number is None and parsed.expr is None and not parsed.is_text:
        return None
    return parsed


@lru_cache(maxsize=65536)
def _parse_prediction(pred: str) -> ParsedAnswer:
    return _parse_answer(pred)


def _numbers_equal(pred: ParsedAnswer, gold: ParsedAnswer) -> bool:
    """Exact comparison with the percent rule.

    The prediction's `%` is dropped (`50%` = `50`); a prediction without `%` may also
    match gold/100 when the gold itself is a percent (`0.5` = `50%`).
    """
    if pred.number == gold.number:
        return True
    if gold.percent and not pred.percent:
        if gold.number is None:  # never: callers compare two numeric answers
            raise TypeError("a percent gold without a number")
        return pred.number == gold.number / 100
    return False


def quick_equivalent(pred: str, gold: ParsedAnswer) -> bool | None:
    """The cheap rungs of the ladder (no sympy); None when sympy has to decide."""
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    text = normalize_answer(pred)
    if not text:
        return False
    if string_key(text) == string_key(gold.text):
        return True
    if gold.is_text and gold.expr is None:
        return text.strip("()").lower() == gold.text.strip("()").lower()
    number = parse_number(text)
    if number is not None and gold.number is not None:
        return _numbers_equal(ParsedAnswer(text, number[0], number[1], None, False), gold)
    if gold.expr is None and gold.number is None:
        return False
    return None


def is_equivalent(pred: str, gold: str) -> bool | None:
    """Whether answer `pred` equals reference `gold`; None when the gold is unusable."""
    parsed_gold = parse_gold(gold)
    if parsed_gold is None:
        return None
    if pred is None:
        return False
    return equivalent(pred, parsed_gold)


def equivalent(pred: str, gold: ParsedAnswer) -> bool:
    """The whole ladder for an answer and an already parsed gold (`is_equivalent`'s core)."""
    quick = quick_equivalent(pred, gold)
    if quick is not None:
        return quick
    parsed = _parse_prediction(pred)
    if parsed.expr is None and parsed.number is None:
        return False
    try:
        return objects_equal(_as_sympy(parsed), _as_sympy(gold))
    except (TypeError, ValueError, ArithmeticError, RecursionError, AttributeError):
        return False


def _as_sympy(parsed: ParsedAnswer):
    if parsed.expr is not None:
        return parsed.expr
    if parsed.number is None:  # never: callers check that one is set (`equivalent` catches this)
        raise AttributeError("an answer with neither an expression nor a number")
    return sympy.Rational(parsed.number.numerator, parsed.number.denominator)


# ---------------------------------------------------------------------------------------
# Equality of parsed (sympy) answers

# Points where two expressions with free symbols are compared: non-integers of both signs
# (so that e.g. sqrt(x^2) and x are told apart), a different point for each symbol.
_SAMPLE_POINTS = tuple(sympy.Rational(p, q) for p, q in ((-7, 3), (11, 5), (3, 13), (29, 7), (-2, 17), (5, 11)))
_NUMERIC_DIGITS = 50
_RELATIVE_TOLERANCE = 1e-30


def _close(a, b) -> bool | None:
    """Whether two numeric sympy values agree to `_RELATIVE_TOLERANCE`; None if undefined."""
    if a.is_Rational and b.is_Rational:  # exact (e.g. a polynomial at a rational point)
        return a == b
    va, vb = a.evalf(_NUMERIC_DIGITS), b.evalf(_NUMERIC_DIGITS)
    if (
        not (va.is_number and vb.is_number)
        or va.has(sympy.zoo, sympy.nan, sympy.oo)
        or vb.has(sympy.zoo, sympy.nan, sympy.oo)
    ):
        return None
    scale = max(abs(va), abs(vb), 1)
    return bool(abs(va - vb) <= _RELATIVE_TOLERANCE * scale)


def expressions_equal(a, b) -> bool:
    """Equality of two scalar sympy expressions: structure, exact value, then numerics.

    - same tree, or a difference that sympy reduces to an exact rational: decided exactly;
    - no free symbols: the values agree to 30 significant digits (as sympy's `equals`);
    - free symbols: the values agree at (at least 3 of) six fixed sample points. This is
      the standard randomised identity test; unlike `expand`/`simplify` it costs the
      same for `(x+1)^64` as for `x + 1`.
    """
    if a == b:
        return True
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return False
    if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False
    diff = a - b
    if diff.is_Rational:
        return diff == 0
    symbols = sorted(diff.free_symbols, key=str)
    if not symbols:
        return bool(_close(a, b))
    agreed = 0
    for k in range(len(_SAMPLE_POINTS)):
        subs = {s: _SAMPLE_POINTS[(k + 2 * j) % len(_SAMPLE_POINTS)] for j, s in enumerate(symbols)}
        verdict = _close(a.xreplace(subs), b.xreplace(subs))
        if verdict is False:
            return False
        agreed += verdict is True
    return agreed >= 3


def _unordered_equal(left, right) -> bool:
    left, right = list(left), list(right)
    if len(left) != len(right):
        return False
    for item in left:
        for j, other in enumerate(right):
            if objects_equal(item, other):
                del right[j]
                break
        else:
            return False
    return True


def objects_equal(a, b) -> bool:
    """Equality of parsed answers: expressions, tuples, sets, intervals, matrices, equations."""
    if isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple):
        return len(a) == len(b) and all(objects_equal(x, y) for x, y in zip(a, b))
    sequences = (sympy.FiniteSet, sympy.Tuple)
    if isinstance(a, sequences) and isinstance(b, sequences):
        return _unordered_equal(a.args, b.args)
    if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
        return (
            a.left_open == b.left_open
            and a.right_open == b.right_open
            and objects_equal(a.start, b.start)
            and objects_equal(a.end, b.end)
        )
    if isinstance(a, sympy.Union) and isinstance(b, sympy.Union):
        return _unordered_equal(a.args, b.args)
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        return a.shape == b.shape and all(objects_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, sympy.Equality) and isinstance(b, sympy.Equality):
        left, right = a.lhs - a.rhs, b.lhs - b.rhs
        return expressions_equal(left, right) or expressions_equal(left, -right)
    if a == b:
        return True
    if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
        if a in (sympy.oo, -sympy.oo) or b in (sympy.oo, -sympy.oo):
            return a == b
        return expressions_equal(a, b)
    return False

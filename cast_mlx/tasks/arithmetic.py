"""Synthetic arithmetic, generated without a download, in levels of increasing difficulty
(see `data`'s docstring); train and eval never share a computation."""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from cast_mlx.tasks.problems import DataError, Problem

ARITHMETIC_LEVELS = (1, 2, 3, 4, 5, 6)
# Level 1 is where the embedded model is neither hopeless nor saturated (scripts/calibrate_arith.py
# measures a model at each level).
DEFAULT_ARITHMETIC_LEVEL = 1
MAX_MISSES_IN_A_ROW = 2000  # arithmetic: give up after this many repeated/other-split draws


_NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Lena",
    "Mia",
    "Noah",
    "Omar",
    "Pia",
    "Sam",
    "Tara",
    "Zoe",
)
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")


_PHRASINGS = ("What is {}?", "Compute {}.", "Calculate {}.")


def _ask(rng: random.Random, expression: str) -> tuple[str, str]:
    """A question about `expression` in one of a few phrasings, and the expression."""
    return rng.choice(_PHRASINGS).format(expression), expression


def _plus_or_minus(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    """`a + b` or `max - min` (never negative), asked in some phrasing."""
    if rng.random() < 0.5:
        return _ask(rng, f"{a} + {b}")
    return _ask(rng, f"{max(a, b)} - {min(a, b)}")


def _level1(rng: random.Random) -> tuple[str, str]:
    """A number up to 50 plus or minus a single digit."""
    return _plus_or_minus(rng, rng.randint(1, 50), rng.randint(1, 9))


def _level2(rng: random.Random) -> tuple[str, str]:
    """1-2 digit addition or subtraction."""
    return _plus_or_minus(rng, rng.randint(1, 99), rng.randint(1, 99))


def _level3(rng: random.Random) -> tuple[str, str]:
    """3-digit addition/subtraction, or a 2-digit number times a 1-digit number."""
    if rng.random() < 0.5:
        return _ask(rng, f"{rng.randint(11, 99)} * {rng.randint(2, 9)}")
    return _plus_or_minus(rng, rng.randint(100, 999), rng.randint(100, 999))


def _word_problem(rng: random.Random) -> tuple[str, str]:
    """A two-step word problem with small numbers."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        return (
            f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag. "
            f"How many {item} does {name} have now?",
            f"{a} + {b} * {c}",
        )
    if kind == 1:
        per_box, boxes, left = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 9)
        return (
            f"A box holds {per_box} {item}. {name} fills {boxes} boxes and has {left} "
            f"{item} left over. How many {item} does {name} have in total?",
            f"{per_box} * {boxes} + {left}",
        )
    if kind == 2:
        share, friends, kept = rng.randint(2, 12), rng.randint(2, 6), rng.randint(1, 20)
        total = share * friends + kept
        return (
            f"{name} has {total} {item}, keeps {kept} and shares the rest equally among "
            f"{friends} friends. How many {item} does each friend get?",
            f"({total} - {kept}) / {friends}",
        )
    wage, hours = rng.randint(5, 20), rng.randint(2, 8)
    spent = rng.randint(1, wage * hours - 1)
    return (
        f"{name} earns ${wage} per hour and works {hours} hours, then spends ${spent}. "
        f"How many dollars does {name} have left?",
        f"{wage} * {hours} - {spent}",
    )


def _level4(rng: random.Random) -> tuple[str, str]:
    """Two-step expressions with small numbers, or a short word problem."""
    if rng.random() < 0.5:
        return _word_problem(rng)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    forms = [
        f"({a} + {b}) * {c}",
        f"{a} * {c} + {b}",
        f"{a} * {c} - {min(b, a * c)}",
        f"({max(a, b)} - {min(a, b)}) * {c}",
    ]
    return _ask(rng, rng.choice(forms))


def _level5(rng: random.Random) -> tuple[str, str]:
    """2-digit by 2-digit products, exact division, or a sum of two products."""
    kind = rng.randrange(3)
    if kind == 0:
        expression = f"{rng.randint(11, 99)} * {rng.randint(11, 99)}"
    elif kind == 1:
        divisor, quotient = rng.randint(3, 12), rng.randint(11, 99)
        expression = f"{divisor * quotient} / {divisor}"
    else:
        a, b, c, d = (rng.randint(2, 20) for _ in range(4))
        expression = f"{a} * {b} + {c} * {d}"
    return _ask(rng, expression)


def _level6(rng: random.Random) -> tuple[str, str]:
    """Three-step expressions with larger numbers (the result may be negative)."""
    a, b, c, d = rng.randint(10, 99), rng.randint(2, 9), rng.randint(10, 99), rng.randint(2, 9)
    forms = [f"({a} + {c}) * {b} - {d}", f"{a} * {b} + {c} * {d}", f"({a} * {b} - {c}) + {d}"]
    return _ask(rng, rng.choice(forms))


_GENERATORS: dict[int, Callable[[random.Random], tuple[str, str]]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
    6: _level6,
}


def evaluate_arithmetic(expression: str) -> int:
    """Exact value of a generated expression (+, -, *, / on integers, parentheses).

    A tiny recursive-descent evaluator over our own generated text (never model text),
    so the generator's answers are computed here and not with `eval`.
    """
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def sum_() -> int:
        nonlocal pos
        value = product()
        while pos < len(tokens) and tokens[pos] in ("+", "-"):
            op = tokens[pos]
            pos += 1
            value = value + product() if op == "+" else value - product()
        return value

    def product() -> int:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] in ("*", "/"):
            op = tokens[pos]
            pos += 1
            right = atom()
            if op == "*":
                value *= right
            else:
                if value % right:
                    raise ValueError(f"inexact division in {expression!r}")
                value //= right
        return value

    def atom() -> int:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "(":
            value = sum_()
            pos += 1  # ")"
            return value
        return int(token)

    result = sum_()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {expression!r}")
    return result


def arithmetic_split_of(expression: str) -> str:
    """ "eval" for one computation in five (by a hash of its expression), else "train".

    The assignment depends on the computation only, so no seed, size or phrasing can put
    the same sum in both splits.
    """
    digest = hashlib.sha256(expression.replace(" ", "").encode()).digest()
    return "eval" if digest[0] % 5 == 0 else "train"


def arithmetic_problems(
    split: str = "train", n: int = 1000, level: int = DEFAULT_ARITHMETIC_LEVEL, seed: int = 0
) -> list[Problem]:
    """`n` distinct generated problems of `level` for split "train" or "eval"/"test".

    Deterministic in (split, level, seed). The solution field holds the computation
    (`"23 + 4 * 5 = 43"`).
    """
    if level not in _GENERATORS:
        raise ValueError(f"arithmetic level must be one of {ARITHMETIC_LEVELS}, got {level}")
    split_name = "eval" if split in ("eval", "test", "validation") else split
    if split_name != "train" and split_name != "eval":
        raise ValueError(f"arithmetic split must be 'train' or 'eval'/'test', got {split!r}")
    rng = random.Random(f"cast-mlx-arithmetic/{split_name}/level{level}/seed{seed}")
    generate = _GENERATORS[level]
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new: the level's space is running out
    while len(problems) < n:
        if misses > MAX_MISSES_IN_A_ROW:
            raise DataError(
                f"arithmetic level {level} cannot produce {n} distinct "
                f"{split_name} problems (got {len(problems)}); ask for fewer"
            )
        question, expression = generate(rng)
        if question in seen or arithmetic_split_of(expression) != split_name:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        value = evaluate_arithmetic(expression)
        problems.append(
            Problem(
                id=f"arith-L{level}-{split_name}-{seed}-{len(problems)}",
                question=question,
                gold=str(value),
                solution=f"{expression} = {value}",
            )
        )
    return problems

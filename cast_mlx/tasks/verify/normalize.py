"""Normalisation: LaTeX / prose noise -> a canonical answer string, and the exact value
of a plain numeric answer.

`18` = `18.00` = `$18` = `1,000`/1000-style separators, `3/4` = `0.75` = `\\frac{3}{4}`:
numbers are compared as exact `Fraction`s, never as floats.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from cast_mlx.tasks.verify.extract import match_braces
from cast_mlx.tasks.verify.limits import MAX_ANSWER_CHARS

_UNICODE = str.maketrans(
    {
        "−": "-",
        "–": "-",
        "×": "\\times ",
        "÷": "\\div ",
        "π": "\\pi ",
        "∞": "\\infty ",
        "√": "\\sqrt ",
        "·": "\\cdot ",
        "°": "",
        "∪": "\\cup ",
        "\u00a0": " ",
        "€": "",
        "£": "",
    }
)
_TEXT_COMMANDS = (
    "\\text",
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\mathrm",
    "\\mathbf",
    "\\mbox",
    "\\textup",
    "\\operatorname",
    "\\boxed",
    "\\fbox",
)
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\quad|\\qquad|\\displaystyle|\\left|\\right|\\limits|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*|^therefore,?\s*", re.IGNORECASE)
_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=]+$)")
_FUNCTION_WORDS = {
    "sqrt",
    "pi",
    "sin",
    "cos",
    "tan",
    "log",
    "ln",
    "exp",
    "infty",
    "inf",
    "infinity",
    "frac",
    "dfrac",
    "tfrac",
    "times",
    "cdot",
    "binom",
    "cup",
}
_UNIT_WORD = re.compile(r"[A-Za-z]{2,}(?:\^\d)?[.,]?")


_UNWRAP = re.compile("(?:" + "|".join(re.escape(name) for name in _TEXT_COMMANDS) + r")\s*\{")


def _unwrap_commands(s: str) -> str:
    """Replace every `\\text{content}` (and friends) by ` content` (brace matched)."""
    for _ in range(50):  # each round removes one command; bounded for safety
        m = _UNWRAP.search(s)
        if m is None:
            return s
        brace = m.end() - 1
        end = match_braces(s, brace)
        if end is None:
            return s
        s = s[: m.start()] + " " + s[brace + 1 : end] + s[end + 1 :]
    return s


def _strip_units(s: str) -> str:
    """Drop trailing words after a number: "18 dollars", "5 cm^2", "12 eggs per day"."""
    words = s.split(" ")
    while (
        len(words) > 1
        and _UNIT_WORD.fullmatch(words[-1])
        and words[-1].rstrip(".,").split("^")[0].lower() not in _FUNCTION_WORDS
    ):
        words.pop()
    rest = " ".join(words)
    return rest if rest != s and re.search(r"\d", rest) else s


def normalize_answer(answer: str) -> str:
    """Canonical form of an answer: no math delimiters, `\\text`, spacing, units, "x =".

    Returns the stripped input unchanged when it is longer than `MAX_ANSWER_CHARS`.
    """
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.translate(_UNICODE)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("\\%", "%").replace("{,}", ",")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _unwrap_commands(s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = s.replace("**", "^")
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 4210_{5} -> 4210_5
    s = re.sub(r"\s+", " ", s).strip()
    s = _ANSWER_PREFIX.sub("", s)
    s = s.strip().rstrip(".").strip()
    s = _VARIABLE_PREFIX.sub("", s)
    return _strip_units(s)


def string_key(s: str) -> str:
    """The key of the first rung of the ladder: a normalised answer without whitespace."""
    return re.sub(r"\s+", "", s)


# ---------------------------------------------------------------------------------------
# Exact numbers

_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_SIGNED_INT = r"[-+]?\d+"
_NUMBER_PATTERNS = [
    ("decimal", re.compile(rf"({_DECIMAL})")),
    ("sci_e", re.compile(rf"({_DECIMAL})[eE]([-+]?\d+)")),
    ("sci_times", re.compile(rf"({_DECIMAL})(?:\\times|\\cdot|\*|x)10\^\{{?([-+]?\d+)\}}?")),
    ("ratio", re.compile(rf"({_DECIMAL})/({_DECIMAL})")),
    ("frac", re.compile(rf"\\frac\{{({_SIGNED_INT})\}}\{{({_SIGNED_INT})\}}")),
    ("mixed_frac", re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")),
]
_MIXED_PLAIN = re.compile(r"^(\d+) (\d+)/(\d+)$")


def _decimal_fraction(text: str) -> Fraction | None:
    text = text.replace(",", "")
    try:
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError):
        return None


def parse_number(answer: str) -> tuple[Fraction, bool] | None:
    """Exact value of a normalised numeric answer and whether it carried a `%`.

    Accepts integers, decimals, thousands separators, `a/b`, `\\frac{a}{b}`, mixed numbers
    (`3\\frac{1}{2}`, `3 1/2`), scientific notation (`1.5e3`, `1.5\\times10^{3}`).
    """
    s = answer.strip()
    if len(s) > 200:
        return None
    m = _MIXED_PLAIN.match(s)
    if m:
        whole, num, den = (int(g) for g in m.groups())
        return (Fraction(whole) + Fraction(num, den), False) if den and num < den else None
    s = s.replace(" ", "")
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    value: Fraction | None = None
    for kind, pattern in _NUMBER_PATTERNS:
        m = pattern.fullmatch(s)
        if not m:
            continue
        g = m.groups()
        if kind == "decimal":
            value = _decimal_fraction(g[0])
        elif kind in ("sci_e", "sci_times"):
            mantissa, exponent = _decimal_fraction(g[0]), int(g[1])
            if mantissa is not None and abs(exponent) <= 400:
                value = mantissa * Fraction(10) ** exponent
        elif kind == "ratio":
            top, bottom = _decimal_fraction(g[0]), _decimal_fraction(g[1])
            if top is not None and bottom:
                value = top / bottom
        elif kind == "frac":
            if int(g[1]) != 0:
                value = Fraction(int(g[0]), int(g[1]))
        elif kind == "mixed_frac":
            whole, num, den = (int(x) for x in g)
            if den and num < den:
                value = whole + Fraction(num, den)
        break
    if value is None:
        return None
    return sign * value, percent

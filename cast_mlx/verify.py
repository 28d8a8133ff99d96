"""Answer extraction and math-answer equivalence: the reward of RL with verifiable rewards.

The reward is the only ground truth the trainer sees, so a silent false negative corrupts
the gradient. This module is built to be exact, safe and bounded:

- **Extraction** (`extract_answer`): the text after the last `####`, the content of the
  last `\\boxed{...}` (or `\\fbox`) with brace matching, or the last number in the text.
- **Equivalence** (`is_equivalent`), a ladder tried in order, gold first:
  1. the same normalised string;
  2. the same exact rational (`18` = `18.00` = `$18` = `1,000`/1000-style separators,
     `3/4` = `0.75` = `\\frac{3}{4}`); a percent sign on the prediction is dropped, and a
     prediction without one may also equal gold/100 only when the *gold* is a percent;
  3. sympy equality of expressions, tuples, sets, intervals and matrices parsed from LaTeX
     or plain text (`\\frac`, `\\sqrt`, `\\pi`, powers, implicit products, ...).
- **Safety**: model text never reaches `eval`, `exec`, `sympify` or `parse_expr`. A
  whitelist tokenizer and a small recursive-descent parser build sympy objects directly
  (`sympy.Integer`, `sympy.Rational`, `sympy.Symbol` of one letter, `sympy.sqrt`, ...);
  any character or command outside the whitelist makes the answer unparseable (= wrong).
- **Bounded work**: answers longer than `MAX_ANSWER_CHARS`, more than `MAX_TOKENS` tokens,
  nesting deeper than `MAX_DEPTH`, huge powers (`9^9^9`), or expression trees over
  `MAX_NODES` are refused before sympy does real work; expressions with variables are
  compared at sample points instead of by `expand`/`simplify`. `Verifier` adds a hard
  wall-clock limit per comparison by running the sympy step in worker processes that
  are killed on timeout, and memoises by (gold, extracted answer).

Gold answers that cannot be parsed make `verify` return None: the row drops out of the
loss instead of counting as a wrong answer.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import wait as _wait_connections
from typing import Sequence

import sympy

# ---------------------------------------------------------------------------------------
# Limits. They keep every step polynomial in a small input; the pool timeout is the net.

MAX_ANSWER_CHARS = 1000  # a longer extracted answer is compared as a string only
EXTRACT_TAIL_CHARS = 20_000  # the last number is searched in this tail of a completion
MAX_TOKENS = 400  # tokens of one answer the parser accepts
MAX_DEPTH = 40  # nesting of brackets / \frac / \sqrt groups
MAX_NODES = 400  # nodes of a built sympy tree
MAX_EXPONENT = 1000  # |n| of a numeric exponent
MAX_SYMBOLIC_EXPONENT = 64  # |n| of an integer exponent on a non-numeric base
MAX_RESULT_DIGITS = 300  # digits of a number literal or an exact power like 2^900
MAX_FACTORIAL = 300

ANSWER_FORMATS = ("hash", "boxed", "last_number")
REWARD_MODES = ("strict", "lenient", "strict_or_lenient")

# ---------------------------------------------------------------------------------------
# Extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# A number in running text: 1,234.5 / -7 / .5 / 3/4 / 12%, the sign only when the minus
# is not part of "5-3" (a minus right after a word character or ")" is an operator).
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
    r"%?"
)


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None if unbalanced.

    Escaped braces (`\\{`, `\\}`) do not count.
    """
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (also `\\boxed 5`), else None.

    The last box wins; if it is unbalanced (e.g. cut off by the length limit) there is no
    answer, rather than a guess from an earlier box.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == "{":
        end = _match_braces(text, i)
        if end is None:
            return None
        content = text[i + 1 : end]
    elif i < len(text) and text[i] == " ":
        # `\boxed 5`: the next whitespace-delimited token.
        m = re.match(r" +([^\s$]+)", text[i : i + MAX_ANSWER_CHARS])
        if not m:
            return None
        content = m.group(1)
    else:
        return None
    content = content.strip()
    return content or None


def extract_hash(text: str) -> str | None:
    """The rest of the line after the last `####` that has something after it."""
    idx = text.rfind("####")
    while idx >= 0:
        line = text[idx + 4 : idx + 4 + MAX_ANSWER_CHARS + 1].split("\n", 1)[0]
        answer = line.strip().lstrip("#").strip().strip("*").strip().rstrip(".").strip()
        if answer:
            return answer
        idx = text.rfind("####", 0, idx)
    return None


def extract_last_number(text: str) -> str | None:
    """The last number of the text (searched in its last `EXTRACT_TAIL_CHARS` characters)."""
    tail = text[-EXTRACT_TAIL_CHARS:]
    last = None
    for last in _NUMBER_IN_TEXT.finditer(tail):
        pass
    return last.group(0) if last else None


def extract_answer(text: str, fmt: str) -> str | None:
    """Extract the answer of a completion in format `fmt` ("hash", "boxed", "last_number")."""
    if fmt == "hash":
        return extract_hash(text)
    if fmt == "boxed":
        return extract_boxed(text)
    if fmt == "last_number":
        return extract_last_number(text)
    raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {fmt!r}")


def lenient_answer(text: str, fmt: str) -> str | None:
    """The first answer found in the order: `fmt`, the other marked format, last number.

    Lenient scoring uses this one answer (not "any of them"), so a completion cannot
    collect reward by writing several different answers.
    """
    order = {
        "hash": ("hash", "boxed", "last_number"),
        "boxed": ("boxed", "hash", "last_number"),
        "last_number": ("last_number", "boxed", "hash"),
    }[fmt]
    for f in order:
        answer = extract_answer(text, f)
        if answer is not None:
            return answer
    return None


# ---------------------------------------------------------------------------------------
# Normalisation: LaTeX / prose noise -> a canonical answer string


_UNICODE = str.maketrans(
    {"−": "-", "–": "-", "×": "\\times ", "÷": "\\div ", "π": "\\pi ", "∞": "\\infty ",
     "√": "\\sqrt ", "·": "\\cdot ", "°": "", "∪": "\\cup ", "\u00a0": " ",
     "€": "", "£": ""}
)
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf",
                  "\\mbox", "\\textup", "\\operatorname", "\\boxed", "\\fbox")
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\quad|\\qquad|\\displaystyle|\\left|\\right|\\limits|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*|^therefore,?\s*", re.IGNORECASE
)
_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=]+$)")
_FUNCTION_WORDS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "infty", "inf",
                   "infinity", "frac", "dfrac", "tfrac", "times", "cdot", "binom", "cup"}
_UNIT_WORD = re.compile(r"[A-Za-z]{2,}(?:\^\d)?[.,]?")


_UNWRAP = re.compile(
    "(?:" + "|".join(re.escape(name) for name in _TEXT_COMMANDS) + r")\s*\{"
)


def _unwrap_commands(s: str) -> str:
    """Replace every `\\text{content}` (and friends) by ` content` (brace matched)."""
    for _ in range(50):  # each round removes one command; bounded for safety
        m = _UNWRAP.search(s)
        if m is None:
            return s
        brace = m.end() - 1
        end = _match_braces(s, brace)
        if end is None:
            return s
        s = s[: m.start()] + " " + s[brace + 1 : end] + s[end + 1 :]
    return s


def _strip_units(s: str) -> str:
    """Drop trailing words after a number: "18 dollars", "5 cm^2", "12 eggs per day"."""
    words = s.split(" ")
    while (len(words) > 1 and _UNIT_WORD.fullmatch(words[-1])
           and words[-1].rstrip(".,").split("^")[0].lower() not in _FUNCTION_WORDS):
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


def _string_key(s: str) -> str:
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
    value = None
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
            num, den = _decimal_fraction(g[0]), _decimal_fraction(g[1])
            if num is not None and den:
                value = num / den
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


# ---------------------------------------------------------------------------------------
# A whitelist tokenizer and recursive-descent parser that build sympy objects directly


class ParseError(ValueError):
    """The answer is not in the accepted grammar, or is too large to handle safely."""


_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>\d+(?:\.\d*)?|\.\d+)"
    r"|(?P<env>\\(?:begin|end)\s*\{[a-zA-Z*]*\})"
    r"|(?P<cmd>\\[a-zA-Z]+|\\[{}]|\\\\)"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op>[-+*/^()\[\]{},!|=_&])"
)
# Commands the parser understands; any other LaTeX command is refused.
_COMMANDS = {"\\frac", "\\sqrt", "\\pi", "\\infty", "\\cdot", "\\times", "\\div", "\\cup",
             "\\binom", "\\sin", "\\cos", "\\tan", "\\log", "\\ln", "\\exp", "\\{", "\\}",
             "\\\\"}
_MATRIX_ENVIRONMENTS = ("pmatrix", "bmatrix", "matrix")
_WORD_COMMANDS = {"sqrt": "\\sqrt", "pi": "\\pi", "sin": "\\sin", "cos": "\\cos",
                  "tan": "\\tan", "log": "\\log", "ln": "\\ln", "exp": "\\exp",
                  "inf": "\\infty", "infty": "\\infty", "infinity": "\\infty", "oo": "\\infty"}
_FUNCTIONS = {"\\sin": sympy.sin, "\\cos": sympy.cos, "\\tan": sympy.tan,
              "\\ln": sympy.log, "\\exp": sympy.exp}
_ATOM_COMMANDS = {"\\frac", "\\sqrt", "\\pi", "\\infty", "\\binom", "\\log"}
_MAX_WORD_AS_PRODUCT = 3  # "xy" = x*y; longer letter runs are words, not products


def tokenize(text: str) -> list[tuple[str, str]]:
    """Split an answer into (kind, value) tokens; anything off the whitelist raises."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        value = m.group()
        if kind == "ws":
            continue
        if kind == "env":
            name = re.sub(r"[\s{}]", "", value)  # \begin{pmatrix} -> \beginpmatrix
            tokens.append(("env", name[1:]))
        elif kind == "cmd":
            if value not in _COMMANDS:
                raise ParseError(f"unsupported command {value}")
            tokens.append(("cmd", value))
        elif kind == "word":
            if value in _WORD_COMMANDS:
                tokens.append(("cmd", _WORD_COMMANDS[value]))
            elif len(value) <= _MAX_WORD_AS_PRODUCT:
                tokens.extend(("var", ch) for ch in value)
            else:
                raise ParseError(f"word {value!r} is not an expression")
        else:
            tokens.append((kind, value))
        if len(tokens) > MAX_TOKENS:
            raise ParseError("answer has too many tokens")
    return tokens


def _check_size(expr) -> None:
    """Refuse trees that are big or whose later expansion could be expensive."""
    count = 0
    for node in sympy.preorder_traversal(expr):
        count += 1
        if count > MAX_NODES:
            raise ParseError("expression too large")
        if isinstance(node, sympy.Pow) and node.exp.is_Integer:
            if abs(node.exp) > MAX_SYMBOLIC_EXPONENT and not node.base.is_Number:
                raise ParseError("symbolic power too large")


def _safe_pow(base, exponent):
    """`base ** exponent`, refusing powers whose exact value or expansion would explode."""
    if exponent.is_Number:
        if abs(exponent) > MAX_EXPONENT:
            raise ParseError("exponent too large")
        if base.is_Rational and exponent.is_Integer:
            size = max(abs(base.p), abs(base.q), 2)
            if abs(int(exponent)) * math.log10(size) > MAX_RESULT_DIGITS:
                raise ParseError("power too large")
        if exponent.is_Integer and not base.is_Number and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise ParseError("symbolic power too large")
    elif base.is_Number and abs(base) != 1 and exponent.free_symbols == set():
        # e.g. 2^(9^9^(1/2)): refuse numeric exponents we cannot bound cheaply
        approx = exponent.evalf(15)
        if not approx.is_Number or abs(approx) > MAX_EXPONENT:
            raise ParseError("exponent too large")
    result = sympy.Pow(base, exponent)
    if isinstance(result, sympy.Pow) and result.exp.is_Integer and not result.base.is_Number:
        if abs(result.exp) > MAX_SYMBOLIC_EXPONENT:  # (x^64)^64 folds into x^4096
            raise ParseError("symbolic power too large")
    return result


class _Bracket:
    """A parsed `(a, b)` / `[a, b)` group before deciding: tuple or interval."""

    def __init__(self, open_: str, close: str, items: list):
        self.open, self.close, self.items = open_, close, items


class _Parser:
    """Recursive descent over the token list. Grammar (lowest to highest precedence):

        answer  := item (('\\cup' item)* | (',' item)* | '=' item)
        item    := bracket-list | '\\{' list '\\}' | matrix | sum
        sum     := term (('+' | '-') term)*
        term    := unary (('*' | '/' | '\\cdot' | '\\times' | '\\div' | implicit) unary)*
        unary   := ('-' | '+') unary | power
        power   := postfix ('^' unary)?
        postfix := atom '!'*
        atom    := number | letter | '\\pi' | '\\infty' | '(' sum ')' | '{' sum '}'
                 | '|' sum '|' | '\\frac' group group | '\\sqrt' ('[' sum ']')? group
                 | '\\binom' group group | function argument
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    # -- token helpers
    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def at(self, value: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[1] == value and tok[0] in ("op", "cmd")

    def take(self, value: str) -> None:
        if not self.at(value):
            raise ParseError(f"expected {value!r}")
        self.pos += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nesting too deep")

    # -- top level
    def parse_answer(self):
        first = self.parse_item()
        if self.at("\\cup"):
            parts = [first]
            while self.at("\\cup"):
                self.pos += 1
                parts.append(self.parse_item())
            return sympy.Union(*[_as_set(p) for p in parts], evaluate=True)
        if self.at(","):
            items = [first]
            while self.at(","):
                self.pos += 1
                items.append(self.parse_item())
            return sympy.FiniteSet(*[_resolve(i) for i in items])
        if self.at("="):
            self.pos += 1
            right = self.parse_item()
            return sympy.Eq(_resolve(first), _resolve(right), evaluate=False)
        return _resolve(first)

    def parse_item(self):
        tok = self.peek()
        if tok is None:
            raise ParseError("empty answer")
        if tok in (("op", "("), ("op", "[")):
            start = self.pos
            bracket = self.try_bracket_list()
            if bracket is not None:
                return bracket
            self.pos = start
        if tok == ("cmd", "\\{"):
            return self.parse_set()
        if tok[0] == "env":
            return self.parse_matrix()
        return self.parse_sum()

    def try_bracket_list(self):
        """`(a, b, ...)` or `[a, b)`: returns a _Bracket, or None if it is a plain group."""
        open_ = self.peek()[1]
        self.pos += 1
        self.enter()
        try:
            items = [self.parse_sum()]
            while self.at(","):
                self.pos += 1
                items.append(self.parse_sum())
        except ParseError:
            self.depth -= 1
            return None
        self.depth -= 1
        tok = self.peek()
        if len(items) < 2 or tok not in (("op", ")"), ("op", "]")):
            return None
        self.pos += 1
        after = self.peek()
        if after is not None and after[1] not in (",", "\\cup", "="):
            return None
        return _Bracket(open_, tok[1], items)

    def parse_set(self):
        self.take("\\{")
        self.enter()
        items = [self.parse_sum()]
        while self.at(","):
            self.pos += 1
            items.append(self.parse_sum())
        self.take("\\}")
        self.depth -= 1
        return sympy.FiniteSet(*items)

    def parse_matrix(self):
        env = self.peek()[1]
        if env not in tuple("begin" + name for name in _MATRIX_ENVIRONMENTS):
            raise ParseError(f"unsupported environment {env!r}")
        self.pos += 1
        rows: list[list] = [[]]
        while self.peek() != ("env", "end" + env[len("begin"):]):
            if self.peek() is None:
                raise ParseError("unterminated matrix")
            if self.at("\\\\"):
                self.pos += 1
                rows.append([])
            elif self.at("&"):
                self.pos += 1
            else:
                rows[-1].append(self.parse_sum())
        self.pos += 1
        rows = [r for r in rows if r]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        return sympy.ImmutableMatrix(rows)

    # -- expressions
    def parse_sum(self):
        value = self.parse_term()
        while self.at("+") or self.at("-"):
            op = self.peek()[1]
            self.pos += 1
            right = self.parse_term()
            value = value + right if op == "+" else value - right
        return value

    def starts_atom(self) -> bool:
        tok = self.peek()
        if tok is None:
            return False
        kind, value = tok
        if kind in ("num", "var"):
            return True
        if kind == "cmd":
            return value in _ATOM_COMMANDS or value in _FUNCTIONS
        return value in ("(", "{")

    def parse_term(self):
        value = self.parse_unary()
        while True:
            if self.at("*") or self.at("\\cdot") or self.at("\\times"):
                self.pos += 1
                value = value * self.parse_unary()
            elif self.at("/") or self.at("\\div"):
                self.pos += 1
                divisor = self.parse_unary()
                if divisor == 0:
                    raise ParseError("division by zero")
                value = value / divisor
            elif self.starts_atom():
                previous = self.tokens[self.pos - 1]
                if previous[0] == "num" and self.peek()[0] == "num":
                    raise ParseError("two numbers in a row")
                value = value * self.parse_power()
            else:
                return value

    def parse_unary(self):
        if self.at("-"):
            self.pos += 1
            self.enter()
            value = -self.parse_unary()
            self.depth -= 1
            return value
        if self.at("+"):
            self.pos += 1
            self.enter()
            value = self.parse_unary()
            self.depth -= 1
            return value
        return self.parse_power()

    def parse_power(self):
        base = self.parse_postfix()
        if self.at("^"):
            self.pos += 1
            self.enter()
            exponent = self.parse_unary()
            self.depth -= 1
            return _safe_pow(base, exponent)
        return base

    def parse_postfix(self):
        value = self.parse_atom()
        while self.at("!"):
            self.pos += 1
            if not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
                raise ParseError("factorial of a non-integer or too large")
            value = sympy.factorial(value)
        return value

    def parse_group(self):
        """A `{...}` group, a parenthesised group, or a single atom (as in `\\frac12`)."""
        if self.at("{"):
            self.pos += 1
            self.enter()
            value = self.parse_sum()
            self.take("}")
            self.depth -= 1
            return value
        return self.parse_atom()

    def parse_atom(self):
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of answer")
        kind, value = tok
        self.pos += 1
        if kind == "num":
            return _number(value)
        if kind == "var":
            return sympy.I if value == "i" else sympy.Symbol(value)
        if value in ("(", "{", "|"):
            close = {"(": ")", "{": "}", "|": "|"}[value]
            self.enter()
            inner = self.parse_sum()
            self.take(close)
            self.depth -= 1
            return sympy.Abs(inner) if value == "|" else inner
        if value == "\\pi":
            return sympy.pi
        if value == "\\infty":
            return sympy.oo
        if value == "\\frac":
            self.enter()
            num = self.parse_group()
            den = self.parse_group()
            self.depth -= 1
            if den == 0:
                raise ParseError("division by zero")
            return num / den
        if value == "\\binom":
            self.enter()
            n, k = self.parse_group(), self.parse_group()
            self.depth -= 1
            if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_FACTORIAL):
                raise ParseError("binomial arguments must be small integers")
            return sympy.binomial(n, k)
        if value == "\\sqrt":
            self.enter()
            index = None
            if self.at("["):
                self.pos += 1
                index = self.parse_sum()
                self.take("]")
            radicand = self.parse_group()
            self.depth -= 1
            if index is None:
                return sympy.sqrt(radicand)
            if not (index.is_Integer and 2 <= index <= MAX_SYMBOLIC_EXPONENT):
                raise ParseError("root index must be a small integer")
            return sympy.root(radicand, index)
        if value == "\\log":
            self.enter()
            base = None
            if self.at("_"):
                self.pos += 1
                base = self.parse_group()
            argument = self.parse_power()
            self.depth -= 1
            return sympy.log(argument) if base is None else sympy.log(argument, base)
        if value in _FUNCTIONS:
            self.enter()
            argument = self.parse_power()
            self.depth -= 1
            return _FUNCTIONS[value](argument)
        raise ParseError(f"unexpected token {value!r}")


def _number(text: str):
    if len(text) > MAX_RESULT_DIGITS:
        raise ParseError("number literal too long")
    value = Fraction(Decimal(text))
    return sympy.Rational(value.numerator, value.denominator)


def _as_set(item):
    if isinstance(item, _Bracket):
        return _make_interval(item)
    if isinstance(item, sympy.Set):
        return item
    raise ParseError("\\cup needs intervals or sets")


def _make_interval(bracket: _Bracket):
    if len(bracket.items) != 2:
        raise ParseError("an interval has two endpoints")
    start, end = bracket.items
    if start.is_number and end.is_number and bool(start > end):
        raise ParseError("interval endpoints out of order")
    return sympy.Interval(start, end, bracket.open == "(", bracket.close == ")")


def _resolve(item):
    """Turn a _Bracket into a tuple or an interval, leave other objects as they are.

    `(a, b)` is an ordered pair unless an endpoint is infinite; `[a, b]`, `[a, b)` and
    `(a, b]` are intervals; three or more items are a tuple.
    """
    if not isinstance(item, _Bracket):
        return item
    if len(item.items) == 2:
        infinite = any(x in (sympy.oo, -sympy.oo) for x in item.items)
        if not (item.open == "(" and item.close == ")") or infinite:
            return _make_interval(item)
    return sympy.Tuple(*item.items)


def parse_expression(text: str):
    """Parse a normalised answer string into a sympy object (raises ParseError).

    Safe for untrusted text: only whitelisted tokens are accepted, and sympy objects are
    constructed directly; no string is ever evaluated.
    """
    if len(text) > MAX_ANSWER_CHARS:
        raise ParseError("answer too long")
    tokens = tokenize(text)
    if not tokens:
        raise ParseError("empty answer")
    parser = _Parser(tokens)
    result = parser.parse_answer()
    if parser.pos != len(tokens):
        raise ParseError(f"unexpected {parser.peek()[1]!r}")
    if isinstance(result, sympy.Basic):
        _check_size(result)
        if result.has(sympy.zoo, sympy.nan):
            raise ParseError("undefined value")
    return result


# ---------------------------------------------------------------------------------------
# Parsed answers and the equivalence ladder

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
        return pred.number == gold.number / 100
    return False


def quick_equivalent(pred: str, gold: ParsedAnswer) -> bool | None:
    """The cheap rungs of the ladder (no sympy); None when sympy has to decide."""
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    text = normalize_answer(pred)
    if not text:
        return False
    if _string_key(text) == _string_key(gold.text):
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
    return _equivalent(pred, parsed_gold)


def _equivalent(pred: str, gold: ParsedAnswer) -> bool:
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
    return sympy.Rational(parsed.number.numerator, parsed.number.denominator)


# Points where two expressions with free symbols are compared: non-integers of both signs
# (so that e.g. sqrt(x^2) and x are told apart), a different point for each symbol.
_SAMPLE_POINTS = tuple(sympy.Rational(p, q) for p, q in
                       ((-7, 3), (11, 5), (3, 13), (29, 7), (-2, 17), (5, 11)))
_NUMERIC_DIGITS = 50
_RELATIVE_TOLERANCE = 1e-30


def _close(a, b) -> bool | None:
    """Whether two numeric sympy values agree to `_RELATIVE_TOLERANCE`; None if undefined."""
    if a.is_Rational and b.is_Rational:  # exact (e.g. a polynomial at a rational point)
        return a == b
    va, vb = a.evalf(_NUMERIC_DIGITS), b.evalf(_NUMERIC_DIGITS)
    if not (va.is_number and vb.is_number) or va.has(sympy.zoo, sympy.nan, sympy.oo) \
            or vb.has(sympy.zoo, sympy.nan, sympy.oo):
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
        return (a.left_open == b.left_open and a.right_open == b.right_open
                and objects_equal(a.start, b.start) and objects_equal(a.end, b.end))
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


# ---------------------------------------------------------------------------------------
# Verdicts and rewards


@dataclass
class Verdict:
    """strict: the required format was found and is correct. lenient: the first answer
    found (required format, the other format, last number) is correct. pred: that answer."""

    strict: bool
    lenient: bool
    pred: str | None


def _check_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def verify(completion: str, gold: str, answer_format: str = "hash") -> Verdict | None:
    """Score one completion against a gold answer (in this process; see `Verifier`).

    Returns None when the gold cannot be parsed, so the row can be dropped.
    """
    _check_format(answer_format)
    parsed_gold = parse_gold(gold)
    if parsed_gold is None:
        return None
    strict_answer = extract_answer(completion, answer_format)
    loose = lenient_answer(completion, answer_format)
    strict = strict_answer is not None and _equivalent(strict_answer, parsed_gold)
    if loose == strict_answer:
        lenient = strict
    else:
        lenient = loose is not None and _equivalent(loose, parsed_gold)
    return Verdict(strict=strict, lenient=lenient, pred=loose)


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


# ---------------------------------------------------------------------------------------
# Batch verification with a memo and a hard per-comparison timeout


def _worker_main(conn) -> None:
    """Worker process loop: receive (function, args), send back the function's result."""
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        function, args = job
        try:
            result = function(*args)
        except Exception:  # e.g. a sympy internal error: the caller gets the default
            result = None
        conn.send(result)


class _Worker:
    """One spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.kill()


class TimeoutPool:
    """Run module-level functions in worker processes with a hard wall-clock limit each.

    A call that runs past `timeout` seconds has its worker killed (SIGKILL) and replaced,
    and yields `default`. Workers use the "spawn" start method (no fork of a process that
    may hold MLX threads) and are started, and imported, before any deadline counts; as
    with any spawned process, the main script must be importable (a `__main__` guard).
    """

    def __init__(self, workers: int = 2, timeout: float = 2.0):
        if workers < 1 or timeout <= 0:
            raise ValueError("a TimeoutPool needs workers >= 1 and timeout > 0")
        self.size = workers
        self.timeout = timeout
        self.timeouts = 0  # calls killed for running too long
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers

    def _start_missing(self) -> None:
        started = []
        for slot, worker in enumerate(self._workers):
            if worker is None:
                self._workers[slot] = _Worker(self._ctx)
                started.append(self._workers[slot])
        for worker in started:
            try:
                ready = worker.conn.poll(120) and worker.conn.recv() == "ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                raise RuntimeError(
                    "a verifier worker process failed to start (spawned workers re-import "
                    "the main script: guard it with `if __name__ == '__main__':`)"
                )

    def _retire(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = None

    def run(self, calls: Sequence[tuple], default=None) -> list:
        """Results of `function(*args)` for each (function, args), in order."""
        results = [default] * len(calls)
        pending = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, deadline)
        while pending or busy:
            if pending and len(busy) < self.size:
                self._start_missing()
                for slot in range(self.size):
                    if slot not in busy and pending:
                        index = pending.popleft()
                        self._workers[slot].conn.send(calls[index])
                        busy[slot] = (index, time.monotonic() + self.timeout)
            conns = {self._workers[slot].conn: slot for slot in busy}
            next_deadline = min(deadline for _, deadline in busy.values())
            ready = _wait_connections(list(conns), max(0.0, next_deadline - time.monotonic()))
            for conn in ready:
                slot = conns[conn]
                index, _ = busy.pop(slot)
                try:
                    result = conn.recv()
                except (EOFError, OSError):  # the worker died: replace it
                    self._retire(slot)
                    continue
                if result is not None:
                    results[index] = result
            now = time.monotonic()
            for slot, (index, deadline) in list(busy.items()):
                if now >= deadline:
                    self.timeouts += 1
                    self._retire(slot)
                    del busy[slot]
        return results

    def close(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[slot] = None


def _equivalence_job(pred: str, gold: str) -> bool:
    """What a worker computes: the full ladder for one (answer, gold) pair."""
    return bool(is_equivalent(pred, gold))


class Verifier:
    """Verify many completions: memoised, parallel, and with a hard time limit.

    Extraction and the cheap rungs (same string, exact numbers) run in this process;
    comparisons that need sympy run in a `TimeoutPool` of `workers` processes, where one
    that takes longer than `timeout` seconds is killed and counts as wrong. Results are
    memoised by (gold, extracted answer). With `workers=0` everything runs in this process
    (no hard timeout; the parser's size limits still bound the work).
    """

    def __init__(self, workers: int = 2, timeout: float = 2.0, memo_size: int = 200_000):
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.memo_size = memo_size
        self._memo: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._pool = TimeoutPool(workers, timeout) if workers > 0 else None

    @property
    def timeouts(self) -> int:
        """How many comparisons hit the time limit so far (worth logging as a metric)."""
        return self._pool.timeouts if self._pool else 0

    def verify(self, completion: str, gold: str, answer_format: str = "hash") -> Verdict | None:
        return self.verify_batch([(completion, gold, answer_format)])[0]

    def verify_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict | None]:
        """Verdicts for (completion, gold, answer_format) triples, in order."""
        plans = []
        pairs: dict[tuple[str, str], None] = {}  # ordered set of (gold, answer)
        for completion, gold, answer_format in items:
            _check_format(answer_format)
            if parse_gold(gold) is None:
                plans.append(None)
                continue
            strict_answer = extract_answer(completion, answer_format)
            loose = lenient_answer(completion, answer_format)
            plans.append((gold, strict_answer, loose))
            for answer in (strict_answer, loose):
                if answer is not None:
                    pairs[(gold, answer)] = None
        decided = self._decide(list(pairs))
        verdicts: list[Verdict | None] = []
        for plan in plans:
            if plan is None:
                verdicts.append(None)
                continue
            gold, strict_answer, loose = plan
            strict = strict_answer is not None and decided[(gold, strict_answer)]
            lenient = loose is not None and decided[(gold, loose)]
            verdicts.append(Verdict(strict=strict, lenient=lenient, pred=loose))
        return verdicts

    def close(self) -> None:
        """Stop the worker processes (they are daemons and also die with this process)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decide(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        decided: dict[tuple[str, str], bool] = {}
        slow = []
        for key in pairs:
            if key in self._memo:
                decided[key] = self._memo[key]
                continue
            gold, answer = key
            quick = quick_equivalent(answer, parse_gold(gold))
            if quick is None:
                slow.append(key)
            else:
                decided[key] = quick
        if slow and self._pool is None:
            for gold, answer in slow:
                decided[(gold, answer)] = bool(_equivalent(answer, parse_gold(gold)))
        elif slow:
            calls = [(_equivalence_job, (answer, gold)) for gold, answer in slow]
            for key, result in zip(slow, self._pool.run(calls, default=False)):
                decided[key] = bool(result)
        for key, value in decided.items():
            self._memo[key] = value
            self._memo.move_to_end(key)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return decided

"""A whitelist tokenizer and a recursive-descent parser that build sympy objects directly from
an answer in LaTeX or plain text. Model text never reaches `eval`, `exec`, `sympify` or
`parse_expr`; input past the size limits of `limits` is refused before sympy works
(docs/design.md, "The verifier")."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import cast

import sympy

from cast_mlx.tasks.verify.limits import (
    MAX_ANSWER_CHARS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_FACTORIAL,
    MAX_NODES,
    MAX_RESULT_DIGITS,
    MAX_SYMBOLIC_EXPONENT,
    MAX_TOKENS,
)


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
_COMMANDS = {
    "\\frac",
    "\\sqrt",
    "\\pi",
    "\\infty",
    "\\cdot",
    "\\times",
    "\\div",
    "\\cup",
    "\\binom",
    "\\sin",
    "\\cos",
    "\\tan",
    "\\log",
    "\\ln",
    "\\exp",
    "\\{",
    "\\}",
    "\\\\",
}
_MATRIX_ENVIRONMENTS = ("pmatrix", "bmatrix", "matrix")
_WORD_COMMANDS = {
    "sqrt": "\\sqrt",
    "pi": "\\pi",
    "sin": "\\sin",
    "cos": "\\cos",
    "tan": "\\tan",
    "log": "\\log",
    "ln": "\\ln",
    "exp": "\\exp",
    "inf": "\\infty",
    "infty": "\\infty",
    "infinity": "\\infty",
    "oo": "\\infty",
}
_FUNCTIONS = {"\\sin": sympy.sin, "\\cos": sympy.cos, "\\tan": sympy.tan, "\\ln": sympy.log, "\\exp": sympy.exp}
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
        kind = cast(str, m.lastgroup)  # every alternative of _TOKEN is a named group
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
        while self.peek() != ("env", "end" + env[len("begin") :]):
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
        raise ParseError(f"unexpected {tokens[parser.pos][1]!r}")  # pos < len(tokens) here
    if isinstance(result, sympy.Basic):
        _check_size(result)
        if result.has(sympy.zoo, sympy.nan):
            raise ParseError("undefined value")
    return result

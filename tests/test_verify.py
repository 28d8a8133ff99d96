"""Tests of cast_mlx.tasks.verify: extraction, the equivalence ladder, safety and time bounds."""

import json
import time
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cast_mlx.tasks.verify import (
    TimeoutPool,
    Verdict,
    Verifier,
    extract_answer,
    is_equivalent,
    lenient_answer,
    normalize_answer,
    parse_gold,
    parse_number,
    reward,
    verify,
)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
H, B = "hash", "boxed"

# ---------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        ("so #### 1,234.", H, "1,234"),
        ("#### 18\nThanks!", H, "18"),
        ("#### 3\n#### 5", H, "5"),
        ("#### 5\n####   \n", H, "5"),  # an empty last marker falls back to the previous one
        ("##### 8", H, "8"),
        ("#### **8**", H, "8"),
        ("no marker 5", H, None),
        ("####", H, None),
        # a quoted marker is named, not used (committed samples: 'The final answer after "####" is 30.')
        ('The final answer after "####" is 30.', H, None),
        ("You say \u201c####\u201d, then #### 48", H, "48"),
        ('#### 3\nmy answer went after "#####".', H, "3"),
        ('####"30"', H, '"30"'),  # quoted on one side only: a use of the marker
        ("\\boxed{\\frac{1}{2}}", B, "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{\\{2\\}}}", B, "\\frac{\\sqrt{3}}{\\{2\\}}"),  # nested
        ("\\boxed{3} and then \\boxed{5}", B, "5"),  # last wins
        ("\\boxed{\\boxed{7}}", B, "7"),
        ("\\boxed 5$.", B, "5"),
        ("\\fbox{9}", B, "9"),
        ("\\boxed{2} \\fbox{4}", B, "4"),
        ("\\boxed{3} \\boxed{5", B, None),  # unbalanced last box: no answer
        ("\\boxed{}", B, None),
        ("\\boxed", B, None),
        ("answer 12, then 13.", "last_number", "13"),
        ("it is -4.", "last_number", "-4"),
        ("5-3 gives 2", "last_number", "2"),
        ("(5)-3", "last_number", "3"),
        ("costs $1,250.50 total", "last_number", "1,250.50"),
        ("about 3/4 of it", "last_number", "3/4"),
        ("up 50%.", "last_number", "50%"),
        ("none at all", "last_number", None),
    ],
)
def test_extract_answer(text, fmt, expected):
    assert extract_answer(text, fmt) == expected


def test_extract_answer_rejects_unknown_format():
    with pytest.raises(ValueError, match="answer format"):
        extract_answer("#### 1", "json")


def test_a_quoted_marker_leaves_the_answer_to_the_lenient_chain():
    """The agreement study with math-verify (docs/verify-agreement.md) found completions that
    mention the marker in quotes; the prose after it was read as their answer."""
    text = 'We add 26 and 4: 26 + 4 = 30.\n\nThe final answer after "####" is 30.'
    assert verify(text, "30") == Verdict(strict=False, lenient=True, pred="30")
    assert verify('1 + 6 = 7\n\nThis is the final answer after the step "####".', "7").lenient


def test_lenient_answer_order():
    text = "#### 3\nand \\boxed{4} and 5"
    assert lenient_answer(text, "hash") == "3"
    assert lenient_answer(text, "boxed") == "4"
    assert lenient_answer("just 5 and 6", "hash") == "6"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$18.00", "18.00"),
        ("\\$1{,}000", "1,000"),
        ("\\text{(C)}", "(C)"),
        ("x = 5", "5"),
        ("5 \\text{ cm}^2", "5"),
        ("18 dollars per day.", "18"),
        ("90^\\circ", "90"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("The answer is 7", "7"),
        ("4 \\pi square units", "4 \\pi"),
        ("Monday", "Monday"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("18", (Fraction(18), False)),
        ("-1,234.50", (Fraction(-246900, 200), False)),
        ("50%", (Fraction(50), True)),
        ("3/4", (Fraction(3, 4), False)),
        ("\\frac{-3}{4}", (Fraction(-3, 4), False)),
        ("3\\frac{1}{2}", (Fraction(7, 2), False)),
        ("3 1/2", (Fraction(7, 2), False)),
        ("1.5e3", (Fraction(1500), False)),
        ("2\\times10^{-2}", (Fraction(1, 50), False)),
        ("1,2", None),
        ("1/0", None),
        ("x", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ---------------------------------------------------------------------------------------
# The equivalence table: (gold, completion, answer_format, strict, lenient)

COLUMN_12 = "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"

TABLE = [
    # integers
    ("18", "#### 18", H, True, True),
    ("18", "#### 18.", H, True, True),
    ("18", "#### 18.00", H, True, True),
    ("18", "#### 17", H, False, False),
    ("18", "#### 180", H, False, False),
    ("18", "\\boxed{18}", B, True, True),
    ("18", "\\boxed{18}", H, False, True),  # right answer, wrong format
    ("18", "#### 18", B, False, True),
    ("18", "The answer is 18.", H, False, True),
    ("18", "The answer is 18.", B, False, True),
    ("0", "#### 0", H, True, True),
    ("0", "#### -0", H, True, True),
    ("7", "#### 007", H, True, True),
    ("8", "#### **8**", H, True, True),
    ("8", "##### 8", H, True, True),
    ("6", "\\boxed{3!}", B, True, True),
    ("10", "\\boxed{\\binom{5}{2}}", B, True, True),
    ("3", "\\boxed{\\log_2 8}", B, True, True),
    # negatives
    ("-3", "#### -3", H, True, True),
    ("-3", "#### 3", H, False, False),
    ("-3", "\\boxed{-3}", B, True, True),
    ("-5", "\\boxed{−5}", B, True, True),  # unicode minus
    ("-3", "The temperature dropped to -3 degrees", H, False, True),
    ("2", "I computed 5-3=2", H, False, True),
    ("-2", "I computed 5-3=2", H, False, False),
    # decimals and plain fractions
    ("0.5", "#### .5", H, True, True),
    ("0.5", "#### 0.50", H, True, True),
    ("2.5", "#### 2.6", H, False, False),
    ("2.5", "#### 5/2", H, True, True),
    ("0.75", "#### 3/4", H, True, True),
    ("3/4", "#### 0.75", H, True, True),
    ("0.333", "#### 1/3", H, False, False),
    ("1/3", "\\boxed{0.333}", B, False, False),
    ("0.5", "\\boxed{\\frac{1}{2}}", B, True, True),
    # thousands separators
    ("1000", "#### 1,000", H, True, True),
    ("1234567", "#### 1,234,567", H, True, True),
    ("1234", "#### 1,234.", H, True, True),
    ("1234", "#### $1,234.00", H, True, True),
    ("1000", "#### 1{,}000", H, True, True),
    ("1000", "\\boxed{1\\,000}", B, True, True),
    ("1000", "#### 10,00", H, False, False),
    ("70000", "He made $70,000 in profit.", H, False, True),
    # currency
    ("18", "#### $18", H, True, True),
    ("18", "#### \\$18", H, True, True),
    ("18", "#### $18.00", H, True, True),
    ("5", "#### €5", H, True, True),
    ("18", "#### 18 dollars", H, True, True),
    ("18", "#### \\$18 per day", H, True, True),
    # percent
    ("50", "#### 50%", H, True, True),
    ("0.5", "#### 50%", H, False, False),
    ("50\\%", "#### 50%", H, True, True),
    ("50\\%", "#### 0.5", H, True, True),
    ("50\\%", "#### 50", H, True, True),
    ("50%", "\\boxed{50\\%}", B, True, True),
    ("25\\%", "#### 0.3", H, False, False),
    # units in text
    ("5", "\\boxed{5 \\text{ cm}}", B, True, True),
    ("5", "\\boxed{5\\text{cm}^2}", B, True, True),
    ("12", "#### 12 eggs per day", H, True, True),
    ("90", "\\boxed{90^\\circ}", B, True, True),
    ("90", "\\boxed{90°}", B, True, True),
    ("3", "#### 3 hours.", H, True, True),
    ("4\\pi", "\\boxed{4 \\pi \\text{ square units}}", B, True, True),
    # \frac, \dfrac, signs
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{\\tfrac12}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{1/2}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{0.5}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{\\frac{2}{4}}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", B, False, False),
    ("-\\frac{3}{4}", "\\boxed{\\frac{-3}{4}}", B, True, True),
    ("-\\frac{3}{4}", "\\boxed{-0.75}", B, True, True),
    ("-\\frac{3}{4}", "\\boxed{\\frac{3}{4}}", B, False, False),
    ("\\frac{x}{2}", "\\boxed{x/2}", B, True, True),
    ("\\frac{x}{2}", "\\boxed{0.5x}", B, True, True),
    # mixed numbers
    ("3\\frac{1}{2}", "\\boxed{7/2}", B, True, True),
    ("7/2", "\\boxed{3\\frac{1}{2}}", B, True, True),
    ("7/2", "#### 3 1/2", H, True, True),
    ("3.5", "\\boxed{3\\frac12}", B, True, True),
    ("7/2", "\\boxed{3\\frac{1}{3}}", B, False, False),
    # roots
    ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", B, True, True),
    ("\\sqrt{2}", "\\boxed{\\sqrt2}", B, True, True),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", B, True, True),
    ("\\sqrt{2}/2", "\\boxed{1/\\sqrt{2}}", B, True, True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", B, True, True),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", B, False, False),
    ("\\sqrt{2}", "\\boxed{1.414}", B, False, False),
    ("2", "\\boxed{\\sqrt{4}}", B, True, True),
    ("3", "\\boxed{\\sqrt[3]{27}}", B, True, True),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\sin(\\pi/3)}", B, True, True),
    ("\\sqrt{2}+\\sqrt{3}", "\\boxed{\\sqrt{5+2\\sqrt{6}}}", B, True, True),
    # pi
    ("2\\pi", "\\boxed{2 \\pi}", B, True, True),
    ("2\\pi", "\\boxed{2\\pi}", B, True, True),
    ("2\\pi", "\\boxed{\\pi \\cdot 2}", B, True, True),
    ("2\\pi", "\\boxed{6.28}", B, False, False),
    ("\\frac{\\pi}{4}", "\\boxed{\\pi/4}", B, True, True),
    ("\\frac{\\pi}{4}", "\\boxed{0.25\\pi}", B, True, True),
    ("\\pi", "\\boxed{3.14159}", B, False, False),
    ("\\pi", "\\boxed{π}", B, True, True),
    # scientific notation
    ("1500", "\\boxed{1.5 \\times 10^{3}}", B, True, True),
    ("1500", "\\boxed{1.5e3}", B, True, True),
    ("0.0015", "\\boxed{1.5 \\times 10^{-3}}", B, True, True),
    ("1500", "\\boxed{1.5 \\times 10^{4}}", B, False, False),
    ("1.5\\times10^{3}", "#### 1500", H, True, True),
    # tuples, sets, intervals, matrices
    ("(1,2)", "\\boxed{(1, 2)}", B, True, True),
    ("(1,2)", "\\boxed{(2, 1)}", B, False, False),
    ("(1,2)", "\\boxed{(1,2,3)}", B, False, False),
    ("(\\frac{1}{2}, \\sqrt{2})", "\\boxed{(0.5, \\sqrt{2})}", B, True, True),
    ("[0,1)", "\\boxed{[0,1)}", B, True, True),
    ("[0,1]", "\\boxed{[0,1)}", B, False, False),
    ("(0,1]", "\\boxed{(0, 1]}", B, True, True),
    ("(-\\infty, 0)", "\\boxed{(-\\infty,0)}", B, True, True),
    ("(-\\infty, 0) \\cup (1, \\infty)", "\\boxed{(-\\infty,0)\\cup(1,\\infty)}", B, True, True),
    ("(-\\infty, 0) \\cup (1, \\infty)", "\\boxed{(1,\\infty)\\cup(-\\infty,0)}", B, True, True),
    ("(-\\infty, 0) \\cup (1, \\infty)", "\\boxed{(-\\infty,0]\\cup(1,\\infty)}", B, False, False),
    ("[1, 3]", "\\boxed{[1,2] \\cup [2,3]}", B, True, True),
    ("1, 2", "\\boxed{2, 1}", B, True, True),
    ("\\{1, 2\\}", "\\boxed{\\{2,1\\}}", B, True, True),
    ("1, 2", "\\boxed{1, 3}", B, False, False),
    (COLUMN_12, "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", B, True, True),
    (COLUMN_12, "\\boxed{\\begin{pmatrix}2\\\\1\\end{pmatrix}}", B, False, False),
    # multiple boxes: the last one wins
    ("5", "\\boxed{3} then \\boxed{5}", B, True, True),
    ("3", "\\boxed{3} then \\boxed{5}", B, False, False),
    ("5", "\\boxed{\\boxed{5}}", B, True, True),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} and \\fbox{\\frac{1}{2}}", B, True, True),
    ("5", "\\fbox{5}", B, True, True),
    ("5", "\\boxed 5", B, True, True),
    ("5", "\\boxed 5$.", B, True, True),
    # unbalanced braces
    ("5", "\\boxed{5", B, False, True),  # no box; lenient falls back to the last number
    ("5", "\\boxed{\\frac{1}{2}", B, False, False),
    ("5", "\\boxed{3} \\boxed{5", B, False, True),
    # answer then more text
    ("18", "#### 18\nI hope this helps! Next: 5+5 is 10", H, True, True),
    ("18", "\\boxed{18}. Check: 9*2=18, plus 7 more", B, True, True),
    ("18", "#### 18 is the total, not 20", H, False, False),
    # no answer
    ("18", "I don't know.", H, False, False),
    ("18", "", H, False, False),
    ("18", "#### ", H, False, False),
    ("18", "\\boxed{}", B, False, False),
    # prose and multiple-choice answers
    ("\\text{(C)}", "\\boxed{C}", B, True, True),
    ("\\text{(C)}", "\\boxed{(C)}", B, True, True),
    ("\\text{(C)}", "\\boxed{D}", B, False, False),
    ("\\text{Evelyn}", "\\boxed{\\text{evelyn}}", B, True, True),
    ("\\text{Evelyn}", "\\boxed{Emily}", B, False, False),
    # expressions with variables, equations, complex numbers
    ("x^2+2x+1", "\\boxed{(x+1)^2}", B, True, True),
    ("x^2+2x+1", "\\boxed{(x-1)^2}", B, False, False),
    ("2x+3", "\\boxed{y = 3 + 2x}", B, True, True),
    ("\\frac{x+1}{x}", "\\boxed{1 + \\frac{1}{x}}", B, True, True),
    ("\\sqrt{x^2}", "\\boxed{x}", B, False, False),
    ("x+y=3", "\\boxed{3 = y + x}", B, True, True),
    ("5", "\\boxed{x=5}", B, True, True),
    ("3+4i", "\\boxed{4i+3}", B, True, True),
    ("3+4i", "\\boxed{3-4i}", B, False, False),
]


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 120
    assert sum(not lenient for *_, lenient in TABLE) >= 30


@pytest.mark.parametrize("gold, completion, fmt, strict, lenient", TABLE)
def test_equivalence_table(gold, completion, fmt, strict, lenient):
    verdict = verify(completion, gold, fmt)
    assert verdict is not None
    assert (verdict.strict, verdict.lenient) == (strict, lenient), verdict


def test_verifier_pool_matches_in_process_on_the_table():
    with Verifier(workers=2, timeout=5.0) as verifier:
        verdicts = verifier.verify_batch([(c, g, f) for g, c, f, _, _ in TABLE])
    got = [(v.strict, v.lenient) for v in verdicts]
    assert got == [(strict, lenient) for *_, strict, lenient in TABLE]


@pytest.mark.parametrize("gold", ["", "   ", "\\overline{AB}", "x \\pm 1", "a < b", "9^9^9", "#####", "1" * 2000])
def test_unparseable_gold_gives_none(gold):
    assert parse_gold(gold) is None
    assert verify("#### 1", gold, "hash") is None
    assert is_equivalent("1", gold) is None
    assert reward(verify("#### 1", gold, "hash"), "strict") is None


def test_is_equivalent_examples():
    assert is_equivalent("0.5", "1/2") is True
    assert is_equivalent("50%", "0.5") is False
    assert is_equivalent("\\frac{1}{2}", "0.5") is True
    assert is_equivalent("\\sqrt{2}/2", "1/\\sqrt{2}") is True
    assert is_equivalent("(1,2)", "(1, 2)") is True
    assert is_equivalent("[0,1)", "[0,1]") is False
    assert is_equivalent("2\\pi", "2 \\pi") is True
    assert is_equivalent(None, "3") is False


def test_reward_modes():
    right_format = Verdict(strict=True, lenient=True, pred="3")
    other_format = Verdict(strict=False, lenient=True, pred="3")
    wrong = Verdict(strict=False, lenient=False, pred="4")
    assert [reward(v, "strict") for v in (right_format, other_format, wrong)] == [1.0, 0.0, 0.0]
    assert [reward(v, "lenient") for v in (right_format, other_format, wrong)] == [1.0, 1.0, 0.0]
    assert [reward(v) for v in (right_format, other_format, wrong)] == [1.0, 1.0, 0.0]
    assert reward(None, "lenient") is None
    with pytest.raises(ValueError, match="reward mode"):
        reward(wrong, "partial")
    with pytest.raises(ValueError, match="answer_format"):
        verify("#### 1", "1", "xml")


def test_lenient_uses_one_answer_not_any():
    # The marked answer is wrong; a correct number later must not earn lenient credit.
    verdict = verify("#### 5\nor maybe 6", "6", "hash")
    assert (verdict.strict, verdict.lenient, verdict.pred) == (False, False, "5")


# ---------------------------------------------------------------------------------------
# Property tests: numbers written in other ways are the same number


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integer_variants_round_trip(n):
    gold = str(n)
    variants = [str(n), f"{n:,}", f"{n}.00", f"{n:,}.0", f"\\boxed{{{n}}}", f"{n} units"]
    if n >= 0:
        variants += [f"${n:,}", f"\\${n}"]
    for variant in variants:
        assert is_equivalent(variant, gold) is True, variant
    assert is_equivalent(str(n + 1), gold) is False


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=1, max_value=10**4),
    st.integers(min_value=1, max_value=50),
)
def test_fraction_variants_round_trip(p, q, k):
    value = Fraction(p, q)
    gold = f"{value.numerator}/{value.denominator}"
    sign = "-" if value < 0 else ""
    a, b = abs(value.numerator), value.denominator
    variants = [f"{p * k}/{q * k}", f"{sign}\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{p}}}{{{q}}}"]
    # a terminating decimal when the denominator only has factors 2 and 5
    d = b
    for f in (2, 5):
        while d % f == 0:
            d //= f
    if d == 1:
        with localcontext() as ctx:
            ctx.prec = 60
            variants.append(str(Decimal(value.numerator) / Decimal(value.denominator)))
    for variant in variants:
        assert is_equivalent(variant, gold) is True, variant
    assert is_equivalent(f"{value.numerator + 1}/{value.denominator}", gold) is False


# ---------------------------------------------------------------------------------------
# GSM8K golds verify against themselves in every format


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="shared GSM8K data not present")
def test_every_gsm8k_test_gold_verifies_against_itself():
    golds = []
    with open(GSM8K_TEST, encoding="utf-8") as f:
        for line in f:
            golds.append(json.loads(line)["answer"].split("####")[-1].strip().replace(",", ""))
    assert len(golds) == 1319
    failures = []
    for gold in golds:
        checks = [
            verify(f"Some reasoning.\n#### {gold}", gold, "hash").strict,
            verify(f"So the answer is $\\boxed{{{gold}}}$.", gold, "boxed").strict,
            verify(f"So the answer is {gold}.", gold, "hash").lenient,
        ]
        if not all(checks):
            failures.append(gold)
    assert failures == []


# ---------------------------------------------------------------------------------------
# Safety: model text is never executed

SENTINEL = Path("/tmp/pwned_cast")
INJECTIONS = [
    "__import__('os').system('touch /tmp/pwned_cast')",
    "exec(\"open('/tmp/pwned_cast','w').close()\")",
    "eval(\"__import__('os').system('touch /tmp/pwned_cast')\")",
    "os.system('touch /tmp/pwned_cast')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: __import__('os').system('touch /tmp/pwned_cast')",
    "Symbol('x').__class__.__init__.__globals__",
    "\\text{__import__('os').system('touch /tmp/pwned_cast')}",
    "$(touch /tmp/pwned_cast)",
    "`touch /tmp/pwned_cast`",
]


@pytest.fixture
def no_sentinel():
    if SENTINEL.exists():
        SENTINEL.unlink()
    yield
    assert not SENTINEL.exists(), "an injected command ran"


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_does_nothing(payload, no_sentinel):
    for completion in (payload, f"#### {payload}", f"\\boxed{{{payload}}}"):
        for fmt in ("hash", "boxed"):
            verdict = verify(completion, "1", fmt)
            assert isinstance(verdict, Verdict) and not verdict.strict
    assert is_equivalent(payload, "x") is False
    assert parse_gold(payload) is None or parse_gold(payload).expr is None


def test_injection_through_the_pool_does_nothing(no_sentinel):
    with Verifier(workers=1, timeout=5.0) as verifier:
        items = [(f"\\boxed{{{p}}}", "\\sqrt{2}", "boxed") for p in INJECTIONS]
        verdicts = verifier.verify_batch(items)
    assert all(not v.strict and not v.lenient for v in verdicts)


# ---------------------------------------------------------------------------------------
# Time bounds

PATHOLOGICAL = {
    "tower": "\\boxed{9^9^9^9}",
    "tower_python": "#### 9**9**9**9",
    "tower_braces": "\\boxed{9^{9^{9^{9}}}}",
    "huge_power": "\\boxed{10^{10^{10}}}",
    "parens_10k": "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "one_megabyte": "x" * 1_000_000 + " so the answer is 5",
    "megabyte_of_digits": "1" * 1_000_000,
    "frac_500_deep": "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}",
    "boxes_unclosed": "\\boxed{" * 100_000,
    "braces_5000": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "big_symbolic_power": "\\boxed{(x+1)^{64}(x-1)^{64}}",
    "folded_power": "\\boxed{((x+1)^{60})^{60}}",
    "factorial_tower": "\\boxed{(300!)!}",
    "sin_huge": "\\boxed{\\sin(10^{299})}",
    "long_sum": "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(200)) + "}",
    "many_big_factors": "\\boxed{" + "*".join(["(2^{900})"] * 100) + "}",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
@pytest.mark.parametrize("gold", ["1", "\\frac{\\sqrt{3}}{2}", "x^2"])
def test_pathological_inputs_return_quickly_in_process(name, gold):
    start = time.monotonic()
    verdict = verify(PATHOLOGICAL[name], gold, "boxed")
    elapsed = time.monotonic() - start
    assert verdict is not None and not verdict.strict
    assert elapsed < 1.0, f"{name} took {elapsed:.2f}s"


def test_pathological_inputs_finish_within_pool_timeout():
    timeout = 2.0
    with Verifier(workers=2, timeout=timeout) as verifier:
        verifier.verify("\\boxed{\\sqrt{8}/2}", "\\sqrt{2}", "boxed")  # start the workers
        for name, completion in PATHOLOGICAL.items():
            start = time.monotonic()
            verdict = verifier.verify(completion, "\\frac{\\sqrt{3}}{2}", "boxed")
            elapsed = time.monotonic() - start
            assert not verdict.strict
            assert elapsed < timeout + 1.0, f"{name} took {elapsed:.2f}s"


def test_timeout_pool_kills_a_slow_call_and_recovers():
    pool = TimeoutPool(workers=1, timeout=1.0)
    try:
        assert pool.run([(abs, (-2,))]) == [2]  # start the worker outside the timing
        start = time.monotonic()
        results = pool.run([(time.sleep, (30,)), (abs, (-3,))], default="timeout")
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    assert results == ["timeout", 3]
    assert pool.timeouts == 1
    assert elapsed < 1.0 + 15.0  # the timeout plus one worker restart (spawn + imports)


def test_verifier_memoises_by_gold_and_answer():
    with Verifier(workers=0) as verifier:
        first = verifier.verify("\\boxed{\\sqrt{8}/2}", "\\sqrt{2}", "boxed")
        assert ("\\sqrt{2}", "\\sqrt{8}/2") in verifier._memo
        again = verifier.verify("other words \\boxed{\\sqrt{8}/2}", "\\sqrt{2}", "boxed")
    assert first == again == Verdict(True, True, "\\sqrt{8}/2")


def test_verifier_gives_none_for_unparseable_gold():
    with Verifier(workers=0) as verifier:
        assert verifier.verify_batch([("#### 1", "", "hash"), ("#### 1", "1", "hash")]) == [
            None,
            Verdict(True, True, "1"),
        ]


def test_verifier_throughput_memoised():
    items = [(f"Step... #### {i % 50}", str(i % 50), "hash") for i in range(2000)]
    with Verifier(workers=0) as verifier:
        verifier.verify_batch(items)
        start = time.monotonic()
        verifier.verify_batch(items)
        rate = len(items) / (time.monotonic() - start)
    assert rate > 2000, f"{rate:.0f} completions/s memoised"

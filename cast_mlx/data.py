"""Tasks: GSM8K, MATH and a synthetic arithmetic generator, and chat prompts for them.

Every task yields `Problem`s with a gold answer that `cast_mlx.verify` can parse; rows
that are malformed (missing fields, empty or unparseable gold, bad JSON) are skipped,
counted, and reported once with their first few 1-based line numbers. A source with no
usable row is an error.

- `gsm8k`: the hub dataset `openai/gsm8k` ("main") when no path is given, or a local
  `.jsonl` file / a folder holding `{split}.jsonl` with `{"question", "answer"}`; the
  gold is the text after `####`, without thousands separators.
- `math`: the hub dataset `HuggingFaceH4/MATH-500`, or a local `.jsonl` with `problem`
  and `answer` (or `solution`, whose last `\\boxed{}` is the gold).
- `arithmetic`: generated, no download. Levels of increasing difficulty:
  1: a number up to 50 plus/minus a digit; 2: 1-2 digit plus/minus; 3: 3-digit plus/minus
  or 2-digit times 1-digit; 4: two-step expressions and short word problems; 5: 2-digit
  products, exact division, sums of products; 6: three-step expressions.
  Train and eval never share a computation: each expression is assigned to one split by
  a hash of its text, and each split draws from its own seeded random stream.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from cast_mlx.verify import extract_boxed, parse_gold

TASKS = ("gsm8k", "math", "arithmetic")
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math": ("HuggingFaceH4/MATH-500", None)}

# The answer-format instruction appended to the user message. Change these (or pass
# `instruction=` to `build_prompt`) to try other phrasings.
ANSWER_INSTRUCTIONS = {
    "hash": 'Give the final answer after "####".',
    "boxed": "Put the final answer in \\boxed{}.",
}
DEFAULT_SYSTEM_PROMPT: str | None = None  # None: the chat template's own default

ARITHMETIC_LEVELS = (1, 2, 3, 4, 5, 6)
# SmolLM2-135M-Instruct, greedy, default prompt, 96 new tokens (scripts/calibrate_arith.py):
# level 1 about 54% lenient (48 problems, numbers up to 30 at the time), level 2 about 9%
# (64 problems), level 3 about 6% (16 problems); strict ("####" present) 0% at every level.
DEFAULT_ARITHMETIC_LEVEL = 1
MAX_REPORTED_LINES = 5
MAX_MISSES_IN_A_ROW = 2000  # arithmetic: give up after this many repeated/other-split draws


@dataclass
class Problem:
    """One task item. `question` is the raw problem text (also the teacher's plain
    context); `gold` is the reference answer; `solution` a worked solution if known."""

    id: str
    question: str
    gold: str
    solution: str | None = None


class MalformedRowsWarning(UserWarning):
    """Some rows of a data source were skipped."""


# ---------------------------------------------------------------------------------------
# Row parsing (shared by local files and the hub)


def _gsm8k_row(row: dict) -> tuple[str, str, str | None]:
    """(question, gold, solution) of a GSM8K row; raises ValueError naming the problem."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing field 'question'")
    if not isinstance(answer, str):
        raise ValueError("missing field 'answer'")
    if "####" not in answer:
        raise ValueError("no '####' in 'answer'")
    gold = answer.split("####")[-1].strip().replace(",", "")
    return question.strip(), gold, answer


def _math_row(row: dict) -> tuple[str, str, str | None]:
    """(question, gold, solution) of a MATH row: `answer`, else the solution's last box."""
    question = row.get("problem")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing field 'problem'")
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    gold = row.get("answer")
    if not isinstance(gold, str) or not gold.strip():
        if solution is None:
            raise ValueError("missing field 'answer' (and no 'solution')")
        gold = extract_boxed(solution)
        if gold is None:
            raise ValueError("no \\boxed{} answer in 'solution'")
    return question.strip(), gold.strip(), solution


_ROW_PARSERS: dict[str, Callable[[dict], tuple[str, str, str | None]]] = {
    "gsm8k": _gsm8k_row,
    "math": _math_row,
}


def _problems_from_rows(
    task: str, rows: Iterable[tuple[int, object]], source: str, split: str, n: int | None
) -> list[Problem]:
    """Convert numbered rows to Problems, skipping and reporting malformed ones.

    `rows` yields (1-based row number, decoded row or an Exception for a bad line).
    """
    parse_row = _ROW_PARSERS[task]
    problems: list[Problem] = []
    skipped: list[tuple[int, str]] = []
    for number, row in rows:
        if n is not None and len(problems) >= n:
            break
        try:
            if isinstance(row, Exception):
                raise ValueError(f"bad JSON ({row})")
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            question, gold, solution = parse_row(row)
            if not gold:
                raise ValueError("empty gold answer")
            if parse_gold(gold) is None:
                raise ValueError(f"gold answer {gold[:40]!r} cannot be parsed")
        except ValueError as exc:
            skipped.append((number, str(exc)))
            continue
        row_id = row.get("unique_id") or row.get("id") or f"{task}-{split}-{number}"
        problems.append(Problem(str(row_id), question, gold, solution))
    if skipped:
        lines = ", ".join(str(number) for number, _ in skipped[:MAX_REPORTED_LINES])
        more = ", ..." if len(skipped) > MAX_REPORTED_LINES else ""
        warnings.warn(
            f"{source}: skipped {len(skipped)} malformed row(s) (lines {lines}{more}); first: {skipped[0][1]}",
            MalformedRowsWarning,
            stacklevel=3,
        )
    if not problems:
        raise ValueError(f"{source}: no usable {task} rows")
    return problems


def _read_jsonl(path: Path) -> Iterable[tuple[int, object]]:
    """(1-based line number, decoded object or the JSONDecodeError) for non-blank lines."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, exc


def _local_file(path: str | Path, split: str) -> Path:
    """A `.jsonl` file, or `{split}.jsonl` inside a folder."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{split}.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    return p


def _hub_rows(task: str, split: str) -> Iterable[tuple[int, object]]:
    """Rows of the task's hub dataset; a plain error when the hub is unreachable."""
    name, config = HUB_DATASETS[task]
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing split, missing package: all say the same
        raise RuntimeError(
            f"could not load {name} (split {split!r}) from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc)[:200]}); the hub may be unreachable: "
            f"pass a local path to a .jsonl file or a folder with {split}.jsonl"
        ) from exc
    return ((i + 1, dict(row)) for i, row in enumerate(dataset))


def load_task(
    name: str,
    split: str = "train",
    path: str | Path | None = None,
    n: int | None = None,
    level: int = DEFAULT_ARITHMETIC_LEVEL,
    seed: int = 0,
) -> list[Problem]:
    """Problems of task `name` ("gsm8k", "math", "arithmetic") for `split`.

    path: local data (file or folder) for gsm8k/math; None loads from the hub.
    n: at most this many problems (the first n usable ones; for arithmetic, exactly n,
    default 1000). level, seed: arithmetic only.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of problems, got {n}")
    if name == "arithmetic":
        return arithmetic_problems(split, n=1000 if n is None else n, level=level, seed=seed)
    if path is None:
        rows = _hub_rows(name, split)
        source = f"{HUB_DATASETS[name][0]} ({split})"
    else:
        file = _local_file(path, split)
        rows = _read_jsonl(file)
        source = str(file)
    return _problems_from_rows(name, rows, source, split, n)


# ---------------------------------------------------------------------------------------
# Synthetic arithmetic

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
            raise ValueError(
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


# ---------------------------------------------------------------------------------------
# Prompts


def user_message(problem: Problem, answer_format: str = "hash", instruction: str | None = None) -> str:
    """The problem text followed by the answer-format instruction."""
    if instruction is None:
        if answer_format not in ANSWER_INSTRUCTIONS:
            raise ValueError(f"answer_format must be one of {tuple(ANSWER_INSTRUCTIONS)}, got {answer_format!r}")
        instruction = ANSWER_INSTRUCTIONS[answer_format]
    return f"{problem.question}\n\n{instruction}" if instruction else problem.question


def build_prompt(
    tokenizer,
    problem: Problem,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    answer_format: str = "hash",
    instruction: str | None = None,
) -> str:
    """The student's prompt: the model's chat template over [system], user, with the
    assistant turn opened. `instruction` overrides the format's default instruction."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_message(problem, answer_format, instruction)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(
    tokenizer, problem: Problem, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, answer_format: str = "hash"
) -> list[int]:
    """`build_prompt` as token ids (the template already holds any special tokens), the form
    the rollout engine takes; training and evaluation both go through it."""
    return tokenizer.encode(build_prompt(tokenizer, problem, system_prompt, answer_format), add_special_tokens=False)

"""Tasks: loading GSM8K and MATH, dispatching to the arithmetic generator (`arithmetic`) and
to datasets of one's own (`custom`), and the chat prompts of every task. Malformed rows are
skipped and reported; an unusable source raises `DataError`. The tasks and their sources:
docs/design.md, "Tasks and data"."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

# the tasks' public names, one import away (the generator and the item type live in their modules)
from cast_mlx.tasks.arithmetic import (  # noqa: F401
    ARITHMETIC_LEVELS,
    DEFAULT_ARITHMETIC_LEVEL,
    arithmetic_problems,
    arithmetic_split_of,
    evaluate_arithmetic,
)
from cast_mlx.tasks.problems import DataError, MalformedRowsWarning, Problem  # noqa: F401
from cast_mlx.tasks.verify import extract_boxed, parse_gold

TASKS = ("gsm8k", "math", "arithmetic")  # the built-in tasks of `load_task`
CUSTOM_TASK = "custom"  # a dataset of one's own: `load_custom`
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math": ("HuggingFaceH4/MATH-500", None)}

# The answer-format instruction appended to the user message. Change these (or pass
# `instruction=` to `build_prompt`) to try other phrasings.
ANSWER_INSTRUCTIONS = {
    "hash": 'Give the final answer after "####".',
    "boxed": "Put the final answer in \\boxed{}.",
}
ANSWER_MARKS = {"hash": "####", "boxed": "\\boxed{}"}  # what each instruction asks the answer to follow
DEFAULT_SYSTEM_PROMPT: str | None = None  # None: the chat template's own default

MAX_REPORTED_LINES = 5


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
    return question.strip(), hash_gold(answer), answer


def hash_gold(answer: str) -> str:
    """The final answer of a GSM8K-style solution: the text after its last `####`, without
    thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


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


class _InvalidJSON:
    """Stands for a line that is not JSON (the decoder's column is of no use to the user)."""


def _problems_from_rows(
    task: str, rows: Iterable[tuple[int, object]], source: str, split: str, n: int | None, unit: str = "line"
) -> list[Problem]:
    """Problems of a built-in task from numbered rows (see `collect_problems`)."""
    parse_row = _ROW_PARSERS[task]

    def to_problem(row: dict, number: int) -> Problem:
        question, gold, solution = parse_row(row)
        row_id = row.get("unique_id") or row.get("id") or f"{task}-{split}-{number}"
        return Problem(str(row_id), question, gold, solution)

    return collect_problems(rows, to_problem, source, n, unit, what=f"{task} row")


def collect_problems(
    rows: Iterable[tuple[int, object]],
    to_problem: Callable[[dict, int], Problem],
    source: str,
    n: int | None,
    unit: str = "line",
    what: str = "row",
    parse_golds: bool = True,
    stacklevel: int = 4,
) -> list[Problem]:
    """Convert numbered rows to Problems, skipping and reporting malformed ones.

    `rows` yields (1-based `unit` number: a file's line or a dataset's row, decoded row or
    `_InvalidJSON`); `to_problem` raises ValueError naming what is wrong with a row. With
    `parse_golds`, a gold the math verifier cannot parse is a malformed row.
    """
    problems: list[Problem] = []
    skipped: dict[str, list[int]] = {}  # reason -> its line numbers, in order
    for number, row in rows:
        if n is not None and len(problems) >= n:
            break
        try:
            if row is _InvalidJSON:
                raise ValueError("invalid JSON")
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            problem = to_problem(row, number)
            if not problem.gold:
                raise ValueError("empty gold answer")
            if parse_golds and parse_gold(problem.gold) is None:
                raise ValueError("gold answer cannot be parsed")
        except ValueError as exc:
            skipped.setdefault(str(exc), []).append(number)
            continue
        problems.append(problem)
    n_skipped = sum(len(numbers) for numbers in skipped.values())
    if not problems and not skipped:
        raise DataError(f"{source}: empty (no rows)")
    if not problems:
        raise DataError(f"{source}: no usable {what}; skipped {n_skipped}: {_reasons(skipped, unit)}")
    if skipped:
        warnings.warn(
            f"{source}: kept {len(problems)} rows, skipped {n_skipped}: {_reasons(skipped, unit)}",
            MalformedRowsWarning,
            stacklevel=stacklevel,  # the warning points at the loader's caller
        )
    return problems


def _reasons(skipped: dict[str, list[int]], unit: str) -> str:
    """`invalid JSON at lines 4, 7; missing field 'answer' at line 9` (the first few of each)."""
    parts = []
    for reason, numbers in skipped.items():
        shown = ", ".join(str(number) for number in numbers[:MAX_REPORTED_LINES])
        more = f" and {len(numbers) - MAX_REPORTED_LINES} more" if len(numbers) > MAX_REPORTED_LINES else ""
        parts.append(f"{reason} at {unit}{'s' if len(numbers) > 1 else ''} {shown}{more}")
    return "; ".join(parts)


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, decoded object or `_InvalidJSON`) for the non-blank lines.

    A line that is not UTF-8 is a DataError, not a skipped row: the whole file is most
    likely in another encoding.
    """
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is fine
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}: line {number} is not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except (ValueError, RecursionError):  # also a 5000-digit number, [[[[...
                    yield number, _InvalidJSON
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _local_file(path: str | Path, split: str) -> Path:
    """A `.jsonl` file (the same for every split), or `{split}.jsonl` inside a folder."""
    p = Path(path)
    if p.is_dir():
        file = p / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"{p}: no {split}.jsonl in this data folder (it needs one file per split)")
        return file
    if not p.exists():
        raise DataError(f"{p}: no such data file or folder")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
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
    default 1000). level, seed: arithmetic only. The custom task is `load_custom`.
    """
    if name == CUSTOM_TASK:  # its columns, splits and format live in the recipe's data section
        raise ValueError("task 'custom' is loaded by custom.load_custom(recipe.data, split, n, seed), not load_task")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of problems, got {n}")
    if name == "arithmetic":
        return arithmetic_problems(split, n=1000 if n is None else n, level=level, seed=seed)
    if path is None:
        source = f"{HUB_DATASETS[name][0]} ({split})"
        return _problems_from_rows(name, _hub_rows(name, split), source, split, n, unit="row")
    file = _local_file(path, split)
    return _problems_from_rows(name, read_jsonl(file), str(file), split, n)


# ---------------------------------------------------------------------------------------
# Prompts


def user_message(problem: Problem, answer_format: str = "hash", instruction: str | None = None) -> str:
    """The problem text followed by the answer-format instruction (none for answer_format
    "none": a free-form answer has no format to ask for)."""
    return _with_instruction(problem.question, answer_format, instruction)


def strict_label(answer_format: str | None) -> str | None:
    """How the views (dashboard, report) name strict accuracy for a recipe's
    `data.answer_format`: strict is the answer in the format the prompt's instruction asks
    for (every task's prompt gets it, arithmetic's too), so "strict (#### format)" for
    hash. None for "none": the prompt asks for no format and strict equals lenient; leave
    it out. "strict" when the format is not known (a run without its recipe)."""
    if answer_format is None:
        return "strict"
    mark = ANSWER_MARKS.get(answer_format)
    return None if mark is None else f"strict ({mark} format)"


def _with_instruction(text: str, answer_format: str, instruction: str | None) -> str:
    if instruction is None:
        if answer_format == "none":
            return text
        if answer_format not in ANSWER_INSTRUCTIONS:
            formats = (*ANSWER_INSTRUCTIONS, "none")
            raise ValueError(f"answer_format must be one of {formats}, got {answer_format!r}")
        instruction = ANSWER_INSTRUCTIONS[answer_format]
    return f"{text}\n\n{instruction}" if instruction else text


def build_prompt(
    tokenizer,
    problem: Problem,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    answer_format: str = "hash",
    instruction: str | None = None,
) -> str:
    """The student's prompt: the model's chat template over [system], user (or the
    problem's own chat, `problem.messages`), with the assistant turn opened. The format
    instruction goes after the last user message; `instruction` overrides the format's
    default one. A chat's own system message wins over `system_prompt`."""
    if problem.messages is not None:
        messages = [dict(m) for m in problem.messages]  # the problem's chat stays as loaded
        last = messages[-1]  # the user's: load_custom drops a trailing assistant message
        last["content"] = _with_instruction(last["content"], answer_format, instruction)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
    else:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_message(problem, answer_format, instruction)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(
    tokenizer, problem: Problem, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, answer_format: str = "hash"
) -> list[int]:
    """`build_prompt` as token ids (the template already holds any special tokens), the form
    the rollout engine takes; training and evaluation both go through it."""
    return tokenizer.encode(build_prompt(tokenizer, problem, system_prompt, answer_format), add_special_tokens=False)

"""Tasks: GSM8K, MATH and a synthetic arithmetic generator, and chat prompts for them.

Every task yields `Problem`s with a gold answer that `cast_mlx.tasks.verify` can parse; rows
that are malformed (missing fields, empty or unparseable gold, invalid JSON) are skipped and
reported in one `MalformedRowsWarning`, by reason with their first few 1-based line numbers.
A source that cannot be used (missing, unreadable, not UTF-8, empty, no usable row) raises
`DataError`, a ValueError with one line naming the file.

- `gsm8k`: the hub dataset `openai/gsm8k` ("main") when no path is given, or a local
  `.jsonl` file / a folder holding `{split}.jsonl` with `{"question", "answer"}`; the
  gold is the text after `####`, without thousands separators.
- `math`: the hub dataset `HuggingFaceH4/MATH-500`, or a local `.jsonl` with `problem`
  and `answer` (or `solution`, whose last `\\boxed{}` is the gold).
- `custom` (`load_custom`, driven by a recipe's `data` section): a local `.jsonl`, `.json`
  (a list of objects, or JSON lines) or `.parquet` file, a folder of `{split}.<ext>` files,
  a folder written by `datasets` `save_to_disk`, or a hub dataset id; the recipe names the
  question column (a string, or a chat message list as in TRL's conversational format),
  the answer column and an optional solution column.
- `arithmetic`: generated, no download. Levels of increasing difficulty:
  1: a number up to 50 plus/minus a digit; 2: 1-2 digit plus/minus; 3: 3-digit plus/minus
  or 2-digit times 1-digit; 4: two-step expressions and short word problems; 5: 2-digit
  products, exact division, sums of products; 6: three-step expressions.
  Train and eval never share a computation: each expression is assigned to one split by
  a hash of its text, and each split draws from its own seeded random stream.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

from cast_mlx.tasks.verify import extract_boxed, parse_gold

if TYPE_CHECKING:
    from cast_mlx.config import DataConfig

TASKS = ("gsm8k", "math", "arithmetic")  # the built-in tasks of `load_task`
CUSTOM_TASK = "custom"  # a dataset of one's own: `load_custom`
CUSTOM_FILE_TYPES = (".jsonl", ".json", ".parquet")  # in this order inside a split folder
# `datasets` save_to_disk writes one of these at the top of its folder (DatasetDict, Dataset)
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
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
    context); `gold` is the reference answer; `solution` a worked solution if known.
    `messages`: a chat to prompt with instead of `question` (custom data in chat form; its
    last message is the user's and holds `question`)."""

    id: str
    question: str
    gold: str
    solution: str | None = None
    messages: list[dict] | None = None


class MalformedRowsWarning(UserWarning):
    """Some rows of a data source were skipped."""


class DataError(ValueError):
    """A data source that cannot be used; the message is one line naming the file."""


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
    """Problems of a built-in task from numbered rows (see `_collect_problems`)."""
    parse_row = _ROW_PARSERS[task]

    def to_problem(row: dict, number: int) -> Problem:
        question, gold, solution = parse_row(row)
        row_id = row.get("unique_id") or row.get("id") or f"{task}-{split}-{number}"
        return Problem(str(row_id), question, gold, solution)

    return _collect_problems(rows, to_problem, source, n, unit, what=f"{task} row")


def _collect_problems(
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


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
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
        raise ValueError("task 'custom' is loaded by data.load_custom(recipe.data, split, n, seed), not load_task")
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
    return _problems_from_rows(name, _read_jsonl(file), str(file), split, n)


# ---------------------------------------------------------------------------------------
# Custom datasets (task: custom)


class _Source(NamedTuple):
    """Numbered rows of one split, how to name it in messages, and its columns when the
    format has a schema (Arrow: parquet, `datasets`); None: each JSON row has its own keys."""

    rows: Iterable[tuple[int, object]]
    label: str
    unit: str
    columns: list[str] | None


def load_custom(d: DataConfig, split: str, n: int | None, seed: int) -> list[Problem]:
    """Problems of split `split` (a name, e.g. `d.train_split`) of the dataset that the data
    section `d` describes (`task: custom`).

    The source is `d.path` (a `.jsonl`/`.json`/`.parquet` file, a folder of `{split}.<ext>`
    files, or a `datasets` save_to_disk folder) or `d.hub_id`. A single file or a plain
    saved Dataset holds the training split only: asking it for another split is a DataError
    rather than scoring the training rows as held out.

    Columns: `d.question_field` is a string or a chat message list (kept in
    `Problem.messages`, a trailing assistant message dropped and used as the solution),
    `d.answer_field` the gold (a number is stringified; with answer_format hash or boxed a
    worked answer holding `####` or `\boxed{}` gives its final answer), `d.solution_field`
    the solution. Malformed rows are skipped and reported in one MalformedRowsWarning; a
    column that no row has (a typo) is a DataError naming it and the columns there are.

    n: at most this many problems, the first n usable rows in the source's order as for
    gsm8k; `seed` changes nothing here (it is in the signature of every loader so callers
    need not know which ones are generated).
    """
    del seed  # rows are taken in order: the same n problems whatever the run's seed
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of problems, got {n}")
    fields = {"question_field": d.question_field, "answer_field": d.answer_field}
    if d.solution_field:
        fields["solution_field"] = d.solution_field
    source = _custom_source(d, split, list(dict.fromkeys(fields.values())))
    rows = source.rows
    if source.columns is None:
        rows = list(rows)  # JSON keys differ by row: a typo shows only after seeing them all
    _check_columns(fields, source, rows)
    name = d.hub_id or _path_name(Path(str(d.path)))

    def to_problem(row: dict, number: int) -> Problem:
        question, gold, solution, messages = _custom_row(row, d)
        return Problem(f"{name}:{split}:{number}", question, gold, solution, messages)

    # answer_format none is judged by reward functions, not the math verifier: any text goes
    return _collect_problems(
        rows, to_problem, source.label, n, source.unit, parse_golds=d.answer_format != "none", stacklevel=3
    )


def _custom_source(d: DataConfig, split: str, needed: list[str]) -> _Source:
    """The rows of `split` from `d.path` or `d.hub_id`; `needed`: the mapped columns (the
    Arrow formats read only those)."""
    if (d.path is None) == (d.hub_id is None):
        got = "both" if d.path is not None else "neither"
        raise DataError(
            "data.path, data.hub_id: task custom needs exactly one (a local file or folder, or a hub dataset id); "
            f"got {got}"
        )
    if d.hub_id is not None:
        dataset = _load_hub_dataset(d.hub_id, d.hub_config, split)
        return _dataset_source(dataset, f"{d.hub_id} ({split})", needed)
    path = Path(d.path or "")
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return _saved_dataset_source(path, split, d.train_split, needed)
        for ext in CUSTOM_FILE_TYPES:
            if (path / f"{split}{ext}").is_file():
                return _file_source(path / f"{split}{ext}", needed)
        raise DataError(
            f"{path}: no {split}.jsonl, {split}.json or {split}.parquet in this data folder "
            "(it needs one file per split)"
        )
    if not path.exists():
        raise DataError(f"{path}: no such data file or folder")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.suffix.lower() not in CUSTOM_FILE_TYPES:
        raise DataError(f"{path}: expected a .jsonl, .json or .parquet file, or a folder of them")
    if split != d.train_split:
        raise DataError(_training_only(path, "a single file", split, d.train_split))
    return _file_source(path, needed)


def _training_only(path: Path, what: str, split: str, train_split: str) -> str:
    return (
        f"{path}: {what} holds the training split ({train_split!r}) only; for split {split!r} "
        f"give a folder with one file per split ({train_split}.jsonl, {split}.jsonl)"
    )


def _path_name(path: Path) -> str:
    """The name a source's problem ids start with: the file's stem or the folder's name."""
    resolved = path.resolve()
    return resolved.stem if resolved.is_file() else resolved.name


def _file_source(path: Path, needed: list[str]) -> _Source:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_source(path, needed)
    if suffix == ".json":
        return _json_source(path)
    return _Source(_read_jsonl(path), str(path), "line", None)


def _json_source(path: Path) -> _Source:
    """A JSON list of objects (rows numbered 1, 2, ...), or else JSON lines."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        whole = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # not UTF-8, or not one JSON value: JSON lines say which line
        return _Source(_read_jsonl(path), str(path), "line", None)
    if isinstance(whole, list):
        return _Source(list(enumerate(whole, start=1)), str(path), "row", None)
    if len(raw.strip().splitlines()) > 1:  # e.g. {"data": [...]}: not rows, and not JSON lines
        raise DataError(f"{path}: a JSON {type(whole).__name__}; expected a JSON list of objects, or JSON lines")
    return _Source(_read_jsonl(path), str(path), "line", None)


def _parquet_source(path: Path, needed: list[str]) -> _Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        columns = list(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in needed if c in columns])
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from exc
    return _Source(enumerate(table.to_pylist(), start=1), str(path), "row", columns)


def _dataset_source(dataset, label: str, needed: list[str]) -> _Source:
    """Rows of a `datasets.Dataset` (numbered from 1), reading only the mapped columns."""
    columns = list(dataset.column_names)
    present = dataset.select_columns([c for c in needed if c in columns])
    return _Source(((i, dict(row)) for i, row in enumerate(present, start=1)), label, "row", columns)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("this data source needs the datasets package (pip install datasets)") from None
    return datasets


def _saved_dataset_source(path: Path, split: str, train_split: str, needed: list[str]) -> _Source:
    """A folder of `DatasetDict.save_to_disk` (split by name) or `Dataset.save_to_disk` (the
    training split only, as a single file)."""
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a half-written or foreign folder
        raise DataError(f"{path}: cannot load this datasets save_to_disk folder ({_one_line(exc)})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} in this saved DatasetDict (it has: {_names(list(loaded))})")
        return _dataset_source(loaded[split], f"{path} ({split})", needed)
    if split != train_split:
        raise DataError(_training_only(path, "a saved Dataset (not a DatasetDict)", split, train_split))
    return _dataset_source(loaded, str(path), needed)


def _load_hub_dataset(hub_id: str, config: str | None, split: str):
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # network, unknown id, config or split: all one line naming the id
        raise DataError(
            f"data.hub_id: could not load {hub_id!r} (config {config!r}, split {split!r}) from the Hugging Face hub "
            f"({type(exc).__name__}: {_one_line(exc)}); the hub may be unreachable: set data.path to a local copy"
        ) from exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(str(name) for name in names[:limit]) or "nothing"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_columns(fields: dict[str, str], source: _Source, rows: Iterable[tuple[int, object]]) -> None:
    """A mapped column that no row has is a typo in the recipe, not a set of malformed rows:
    a DataError naming the field and the columns there are (for JSON, the first row's)."""
    if source.columns is not None:
        present, there = set(source.columns), f"columns: {_names(source.columns)}"
    else:
        objects = [(number, row) for number, row in rows if isinstance(row, dict)]
        if not objects:  # nothing to compare with: the per-row reasons say what is wrong
            return
        present = {key for _, row in objects for key in row}
        number, first = objects[0]
        there = f"{source.unit} {number} has: {_names(list(first))}"
    for key, column in fields.items():
        if column not in present:
            raise DataError(f"data.{key}: no column {column!r} in {source.label} ({there})")


def _custom_row(row: dict, d: DataConfig) -> tuple[str, str, str | None, list[dict] | None]:
    """(question, gold, solution, messages) of a custom row; ValueError naming the problem."""
    value = row.get(d.question_field)
    messages, reply = None, None
    if isinstance(value, list):
        messages, reply = _chat_messages(value, d.question_field)
        question = messages[-1]["content"].strip()
    elif isinstance(value, str):
        question = value.strip()
    elif value is None:
        raise ValueError(f"missing field {d.question_field!r}")
    else:
        raise ValueError(f"field {d.question_field!r} is not a string or a chat message list")
    if not question:
        raise ValueError(f"empty field {d.question_field!r}")
    answer = _answer_text(row.get(d.answer_field), d.answer_field)
    gold, worked = answer.strip(), None
    if d.answer_format == "hash" and "####" in answer:
        gold, worked = hash_gold(answer), answer
    elif d.answer_format == "boxed" and "\\boxed" in answer:
        gold, worked = extract_boxed(answer) or "", answer
        if not gold:
            raise ValueError(f"no complete \\boxed{{}} in field {d.answer_field!r}")
    solution = row.get(d.solution_field) if d.solution_field else None
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"field {d.solution_field!r} is not a string")
    return question, gold.strip(), solution or reply or worked, messages


def _chat_messages(value: list, field: str) -> tuple[list[dict], str | None]:
    """The prompt's messages of a chat list, and the content of a trailing assistant message
    (the gold solution in SFT-style data, which the prompt must not show)."""
    messages = []
    for message in value:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"field {field!r} is not a chat message list (each needs a string role and content)")
        messages.append({"role": message["role"], "content": message["content"]})
    reply = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"field {field!r}: the chat does not end with a user message")
    return messages, reply


def _answer_text(value: object, field: str) -> str:
    """The gold as text: a string as it is, a number stringified (not a bool: True is no answer)."""
    if value is None:
        raise ValueError(f"missing field {field!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        raise ValueError(f"field {field!r} is not a string or a number")
    if not math.isfinite(value):
        raise ValueError(f"field {field!r} is not a finite number")
    return str(value)


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


# ---------------------------------------------------------------------------------------
# Prompts


def user_message(problem: Problem, answer_format: str = "hash", instruction: str | None = None) -> str:
    """The problem text followed by the answer-format instruction (none for answer_format
    "none": a free-form answer has no format to ask for)."""
    return _with_instruction(problem.question, answer_format, instruction)


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

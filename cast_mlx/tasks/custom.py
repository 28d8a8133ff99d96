"""Datasets of one's own (`task: custom`): a local `.jsonl`, `.json` or `.parquet` file, a
folder of `{split}.<ext>` files, a `datasets` save_to_disk folder or a hub dataset id, with
the question, answer and optional solution columns a recipe's `data` section names."""

from __future__ import annotations

import decimal
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple

from cast_mlx.tasks.data import collect_problems, hash_gold, read_jsonl
from cast_mlx.tasks.problems import DataError, Problem
from cast_mlx.tasks.verify import extract_boxed

if TYPE_CHECKING:
    from cast_mlx.config import DataConfig

CUSTOM_FILE_TYPES = (".jsonl", ".json", ".parquet")  # in this order inside a split folder
# `datasets` save_to_disk writes one of these at the top of its folder (DatasetDict, Dataset)
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


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
    return collect_problems(
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
    return _Source(read_jsonl(path), str(path), "line", None)


def _json_source(path: Path) -> _Source:
    """A JSON list of objects (rows numbered 1, 2, ...), or else JSON lines."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        whole = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # not UTF-8, or not one JSON value: JSON lines say which line
        return _Source(read_jsonl(path), str(path), "line", None)
    if isinstance(whole, list):
        return _Source(list(enumerate(whole, start=1)), str(path), "row", None)
    if len(raw.strip().splitlines()) > 1:  # e.g. {"data": [...]}: not rows, and not JSON lines
        raise DataError(f"{path}: a JSON {type(whole).__name__}; expected a JSON list of objects, or JSON lines")
    return _Source(read_jsonl(path), str(path), "line", None)


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

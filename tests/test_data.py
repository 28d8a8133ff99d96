"""Tests of cast_mlx.tasks.data: loaders, malformed-row reporting, the arithmetic generator,
and prompt building."""

import ast
import json
import operator
import re
import sys
import types
from pathlib import Path

import pytest

from cast_mlx.tasks import data
from cast_mlx.tasks.data import (
    ANSWER_INSTRUCTIONS,
    DataError,
    MalformedRowsWarning,
    Problem,
    arithmetic_split_of,
    build_prompt,
    evaluate_arithmetic,
    load_task,
)
from cast_mlx.tasks.verify import parse_gold, verify

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def write_jsonl(path: Path, lines: list) -> Path:
    """Write rows (dicts are JSON-encoded, strings written as they are) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Independent evaluation of generated arithmetic (Python's ast, a different code path
# from data.evaluate_arithmetic)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def ast_value(expression: str) -> int:
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = walk(node.left), walk(node.right)
            assert left % right == 0, f"inexact division in {expression}"
            return left // right
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval"))


def numbers_in(text: str) -> list[int]:
    return sorted(int(x) for x in re.findall(r"\d+", text))


# ---------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.parametrize("level", data.ARITHMETIC_LEVELS)
def test_arithmetic_is_deterministic_by_seed(level):
    first = load_task("arithmetic", "train", n=50, level=level, seed=3)
    again = load_task("arithmetic", "train", n=50, level=level, seed=3)
    other = load_task("arithmetic", "train", n=50, level=level, seed=4)
    assert first == again
    assert [p.question for p in first] != [p.question for p in other]
    assert len({p.question for p in first}) == 50  # no duplicates
    assert len({p.id for p in first}) == 50


@pytest.mark.parametrize("level", data.ARITHMETIC_LEVELS)
def test_arithmetic_train_and_eval_never_overlap(level):
    train = load_task("arithmetic", "train", n=1500, level=level, seed=0)
    evals = load_task("arithmetic", "eval", n=300, level=level, seed=0)
    other_seed_eval = load_task("arithmetic", "test", n=300, level=level, seed=1)

    def computations(problems):
        return {p.solution.split(" = ")[0] for p in problems}

    train_questions = {p.question for p in train}
    assert not train_questions & {p.question for p in evals}
    assert not train_questions & {p.question for p in other_seed_eval}
    # not even the same sum in another phrasing or word problem
    assert not computations(train) & computations(evals)
    assert not computations(train) & computations(other_seed_eval)
    assert all(arithmetic_split_of(e) == "train" for e in computations(train))
    assert all(arithmetic_split_of(e) == "eval" for e in computations(evals))


@pytest.mark.parametrize("level", data.ARITHMETIC_LEVELS)
def test_arithmetic_golds_are_correct(level):
    for problem in load_task("arithmetic", "eval", n=200, level=level, seed=0):
        expression, value = problem.solution.split(" = ")
        assert ast_value(expression) == int(value) == int(problem.gold), problem
        assert evaluate_arithmetic(expression) == int(problem.gold)
        # the computation uses exactly the numbers of the question
        assert numbers_in(expression) == numbers_in(problem.question), problem
        for phrase in ("What is ", "Compute ", "Calculate "):
            if problem.question.startswith(phrase):  # the question shows the expression
                assert ast_value(problem.question[len(phrase) : -1]) == int(problem.gold)
        # and the gold verifies against itself
        assert verify(f"#### {problem.gold}", problem.gold, "hash").strict
        assert verify(f"\\boxed{{{problem.gold}}}", problem.gold, "boxed").strict


def test_arithmetic_levels_get_harder():
    def mean_abs_gold(level):
        problems = load_task("arithmetic", "train", n=300, level=level, seed=0)
        return sum(abs(int(p.gold)) for p in problems) / len(problems)

    assert mean_abs_gold(1) < mean_abs_gold(2) < mean_abs_gold(3) < mean_abs_gold(5)


def test_arithmetic_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        load_task("arithmetic", n=5, level=9)
    with pytest.raises(ValueError, match="split"):
        load_task("arithmetic", "dev", n=5)
    with pytest.raises(ValueError, match="distinct"):
        load_task("arithmetic", "eval", n=100_000, level=1)
    with pytest.raises(ValueError, match="positive"):
        load_task("arithmetic", n=0)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("aime")


def test_evaluate_arithmetic():
    assert evaluate_arithmetic("(12 - 4) / 2 + 3 * 5") == 19
    assert evaluate_arithmetic("2 - 3 - 4") == -5
    with pytest.raises(ValueError, match="inexact"):
        evaluate_arithmetic("7 / 2")


# ---------------------------------------------------------------------------------------
# GSM8K and MATH local files


def test_gsm8k_local_file_and_folder(tmp_path):
    rows = [
        {"question": "Q1?", "answer": "1 + 1 = 2\n#### 2"},
        {"question": "Q2?", "answer": "Big.\n#### 1,234"},
        {"question": "Q3?", "answer": "#### -7"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    problems = load_task("gsm8k", "train", path=path)
    assert [(p.question, p.gold) for p in problems] == [("Q1?", "2"), ("Q2?", "1234"), ("Q3?", "-7")]
    assert problems[0].solution == "1 + 1 = 2\n#### 2"
    assert problems[0].id == "gsm8k-train-1"
    assert load_task("gsm8k", "train", path=tmp_path) == problems  # folder form
    assert len(load_task("gsm8k", "train", path=tmp_path, n=2)) == 2
    with pytest.raises(DataError, match="no test.jsonl in this data folder"):
        load_task("gsm8k", "test", path=tmp_path)


def test_malformed_rows_are_skipped_and_reported_with_line_numbers(tmp_path):
    lines = [
        {"question": "ok 1", "answer": "#### 3"},  # line 1
        "{not json",  # 2
        {"answer": "#### 4"},  # 3: no question
        {"question": "no answer"},  # 4
        {"question": "no marker", "answer": "just 5"},  # 5
        "",  # 6: blank lines are ignored, not malformed
        {"question": "empty gold", "answer": "#### "},  # 7
        {"question": "bad gold", "answer": "#### \\overline{AB}"},  # 8
        {"question": "ok 2", "answer": "#### 9"},  # 9
        "[1, 2]",  # 10: not an object
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    with pytest.warns(MalformedRowsWarning) as record:
        problems = load_task("gsm8k", path=path)
    assert [p.gold for p in problems] == ["3", "9"]
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{path}: kept 2 rows, skipped 7: invalid JSON at line 2; missing field 'question' at line 3; "
        "missing field 'answer' at line 4; no '####' in 'answer' at line 5; empty gold answer at line 7; "
        "gold answer cannot be parsed at line 8; not a JSON object at line 10"
    )


def test_skipped_rows_warning_groups_reasons_with_file_line_numbers(tmp_path):
    """Issue #15: the file's line numbers (not the decoder's column inside a row), grouped
    by reason, and how many rows were kept."""
    lines: list = [{"question": "q", "answer": "#### 1"}] * 18
    for number in (4, 7, 12, 13, 14, 15, 16):  # cut off: json says "line 1 column 37 (char 36)"
        lines[number - 1] = '{"question": "q", "answer": "#### 1"'
    lines[9 - 1] = {"question": "q"}
    path = write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.warns(MalformedRowsWarning) as record:
        assert len(load_task("gsm8k", path=path)) == 10
    message = str(record[0].message)
    assert message == (
        f"{path}: kept 10 rows, skipped 8: invalid JSON at lines 4, 7, 12, 13, 14 and 2 more; "
        "missing field 'answer' at line 9"
    )
    assert "column" not in message and "char" not in message


def test_unusable_data_sources_are_one_line_errors(tmp_path, recwarn):
    """Issue #15: each a DataError (a ValueError, as cast_mlx.eval catches) of one line naming
    the file, and for a row problem its line."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    junk = write_jsonl(tmp_path / "junk.jsonl", ["nope", {"question": "x"}, "[1]"])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "q", "answer": "#### 1"}\n\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
    cases = [
        (empty, "train", f"{empty}: empty (no rows)"),
        (blank, "train", f"{blank}: empty (no rows)"),
        (
            junk,
            "train",
            f"{junk}: no usable gsm8k row; skipped 3: invalid JSON at line 1; missing field 'answer' at line 2; "
            "not a JSON object at line 3",
        ),
        (latin1, "train", f"{latin1}: line 3 is not UTF-8 (byte 0xe9); save the file as UTF-8"),
        (folder, "test", f"{folder}: no test.jsonl in this data folder (it needs one file per split)"),
        (tmp_path / "missing.jsonl", "train", f"{tmp_path / 'missing.jsonl'}: no such data file or folder"),
        (Path("/dev/null"), "train", "/dev/null: not a regular file"),
    ]
    for path, split, expected in cases:
        with pytest.raises(DataError) as err:
            load_task("gsm8k", split, path=path)
        assert isinstance(err.value, ValueError)
        assert str(err.value) == expected
    assert not recwarn.list  # an unusable file is an error, not an error and a warning


def test_eval_cli_reports_data_errors(tmp_path, capsys):
    """cast_mlx.eval catches ValueError: a DataError is an input error there (exit 2)."""
    from cast_mlx.cli import eval as eval_cli

    missing = tmp_path / "none.jsonl"
    assert eval_cli.main(["--task", "gsm8k", "--path", str(missing)]) == eval_cli.EXIT_USAGE
    assert capsys.readouterr().err == f"error: {missing}: no such data file or folder\n"


def test_math_local_file(tmp_path):
    rows = [
        {"problem": "P1", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/1.json"},
        {"problem": "P2", "solution": "So $x = \\boxed{\\sqrt{2}}$."},
        {"problem": "P3", "solution": "no box here"},
        {"problem": "P4"},
        {"problem": "P5", "answer": "", "solution": "\\boxed{(1, 2)}"},
    ]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    with pytest.warns(MalformedRowsWarning, match=r"kept 3 rows, skipped 2: no .* at line 3; missing .* at line 4"):
        problems = load_task("math", "test", path=path)
    assert [(p.id, p.gold) for p in problems] == [
        ("test/algebra/1.json", "\\frac{1}{2}"),
        ("math-test-2", "\\sqrt{2}"),
        ("math-test-5", "(1, 2)"),
    ]
    assert problems[1].solution.startswith("So $x")


# ---------------------------------------------------------------------------------------
# The hub code path, without a network


def fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_unreachable_gives_a_plain_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    fake_datasets(monkeypatch, unreachable)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*unreachable.*local path"):
        load_task("gsm8k", "train")


def test_hub_rows_become_problems(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"problem": "P", "solution": "...", "answer": "5", "unique_id": "u1"}]

    fake_datasets(monkeypatch, load_dataset)
    problems = load_task("math", "test")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert problems == [Problem("u1", "P", "5", "...")]


# ---------------------------------------------------------------------------------------
# The shared GSM8K copy


@pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").exists(), reason="no shared GSM8K data")
def test_shared_gsm8k_loads_and_every_gold_parses():
    test = load_task("gsm8k", "test", path=GSM8K_DIR)
    assert len(test) == 1319
    assert all(parse_gold(p.gold) is not None for p in test)
    assert test[0].gold == "18" and test[0].question.startswith("Janet")
    if (GSM8K_DIR / "train.jsonl").exists():
        train = load_task("gsm8k", "train", path=GSM8K_DIR)
        assert len(train) == 7473
        assert all(parse_gold(p.gold) is not None for p in train)


# ---------------------------------------------------------------------------------------
# Prompts


class RecordingTokenizer:
    """Stands in for a tokenizer's chat template (format checks only)."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


def test_build_prompt_appends_the_format_instruction():
    tok = RecordingTokenizer()
    problem = Problem("p1", "What is 2 + 3?", "5")
    prompt = build_prompt(tok, problem, None, "hash")
    messages, tokenize, generation = tok.calls[-1]
    assert tokenize is False and generation is True
    expected = 'What is 2 + 3?\n\nGive the final answer after "####".'
    assert messages == [{"role": "user", "content": expected}]
    assert prompt.endswith("<assistant>")

    build_prompt(tok, problem, "Be brief.", "boxed")
    messages = tok.calls[-1][0]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"].endswith(ANSWER_INSTRUCTIONS["boxed"])

    build_prompt(tok, problem, None, "hash", instruction="Answer: <n>")
    assert tok.calls[-1][0][-1]["content"] == "What is 2 + 3?\n\nAnswer: <n>"
    assert problem.question == "What is 2 + 3?"  # the raw text is kept for the teacher

    with pytest.raises(ValueError, match="answer_format"):
        build_prompt(tok, problem, None, "json")


def test_build_prompt_with_the_embedded_tokenizer():
    models = pytest.importorskip("cast_mlx.engine.models")
    if not models.is_fetched(models.DEFAULT_MODEL):
        pytest.skip("embedded model not fetched")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.embedded_dir(models.DEFAULT_MODEL)))
    problem = Problem("p1", "What is 2 + 3?", "5")
    prompt = build_prompt(tokenizer, problem, "You are a careful solver.", "hash")
    assert "You are a careful solver." in prompt
    assert 'What is 2 + 3?\n\nGive the final answer after "####".' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

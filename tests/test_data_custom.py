"""Tests of `task: custom` (issue #17, "datasets of one's own"): custom.load_custom on real
files of each format, the column mapping and its errors, chat-format prompts, and
`cast_mlx.eval --task custom` with an adapter's recipe."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from cast_mlx.cli import eval as eval_cli
from cast_mlx.config import DataConfig
from cast_mlx.tasks import data
from cast_mlx.tasks.custom import load_custom
from cast_mlx.tasks.data import DataError, MalformedRowsWarning, Problem, build_prompt
from cast_mlx.training import evaluation as ev

from helpers import run_cli, tiny_checkpoint


def write_jsonl(path: Path, lines: list) -> Path:
    """Rows one per line: dicts JSON-encoded, strings written as they are."""
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return path


def custom(path=None, **fields) -> DataConfig:
    return DataConfig(task="custom", path=None if path is None else str(path), **fields)


def load(d: DataConfig, split: str = "train", n: int | None = None) -> list[Problem]:
    return load_custom(d, split, n, seed=0)


class RecordingTokenizer:
    """Stands in for a chat template: shows the messages it was given."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


ROWS = [
    {"prompt": "What is 2 + 3?", "target": 5, "why": "2 + 3 = 5"},
    {"prompt": "  Half of 9?  ", "target": 4.5},
    {"prompt": "Sum of 600 and 634?", "target": "600 + 634 = 1,234\n#### 1,234"},
]
MAPPING = {"question_field": "prompt", "answer_field": "target", "solution_field": "why"}


# --------------------------------------------------------------------------- formats


def test_jsonl_with_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    problems = load(custom(path, **MAPPING))
    assert problems == [
        Problem("mine:train:1", "What is 2 + 3?", "5", "2 + 3 = 5"),
        Problem("mine:train:2", "Half of 9?", "4.5"),
        # hash format: the final answer after "####", as gsm8k; the worked answer is the solution
        Problem("mine:train:3", "Sum of 600 and 634?", "1234", "600 + 634 = 1,234\n#### 1,234"),
    ]
    assert [p.gold for p in load(custom(path, **MAPPING), n=2)] == ["5", "4.5"]  # the first n, in order
    assert load_custom(custom(path, **MAPPING), "train", None, seed=7) == problems  # the seed changes nothing


def test_boxed_answers_give_their_final_answer(tmp_path):
    rows = [{"question": "q", "answer": "So $x = \\boxed{\\frac{1}{2}}$."}, {"question": "q", "answer": "7"}]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    problems = load(custom(path, answer_format="boxed"))
    assert [(p.gold, p.solution) for p in problems] == [("\\frac{1}{2}", rows[0]["answer"]), ("7", None)]


def test_json_list_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS, indent=2))
    problems = load(custom(as_list, **MAPPING))
    assert [(p.id, p.gold) for p in problems] == [
        ("list:train:1", "5"),
        ("list:train:2", "4.5"),
        ("list:train:3", "1234"),
    ]
    as_lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert [p.gold for p in load(custom(as_lines, **MAPPING))] == ["5", "4.5", "1234"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS}, indent=2))
    with pytest.raises(DataError) as err:
        load(custom(wrapped, **MAPPING))
    assert str(err.value) == f"{wrapped}: a JSON dict; expected a JSON list of objects, or JSON lines"


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["What is 2 + 3?", "Half of 9?"], "target": [5, 7], "extra": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "p.parquet")
    problems = load(custom(tmp_path / "p.parquet", question_field="prompt", answer_field="target"))
    assert problems == [Problem("p:train:1", "What is 2 + 3?", "5"), Problem("p:train:2", "Half of 9?", "7")]


def test_folder_of_split_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"q": "a?", "a": "1"}, {"q": "b?", "a": "2"}])
    pq.write_table(pa.table({"q": ["c?"], "a": ["3"]}), folder / "dev.parquet")
    (folder / "dev.json").write_text("[]")  # no rows: it shows which file of the split is read
    d = custom(folder, question_field="q", answer_field="a", eval_split="dev")
    assert [p.id for p in load(d, "train")] == ["ds:train:1", "ds:train:2"]
    with pytest.raises(DataError, match="dev.json: empty"):  # .jsonl, then .json, then .parquet
        load(d, "dev")
    (folder / "dev.json").unlink()
    assert load(d, "dev") == [Problem("ds:dev:1", "c?", "3")]
    with pytest.raises(DataError) as err:
        load(d, "test")
    assert str(err.value) == (
        f"{folder}: no test.jsonl, test.json or test.parquet in this data folder (it needs one file per split)"
    )


def test_a_single_file_is_the_training_split_only(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "1"}])
    d = custom(path, train_split="train", eval_split="test")
    assert len(load(d, "train")) == 1
    with pytest.raises(DataError) as err:
        load(d, "test")
    assert str(err.value) == (
        f"{path}: a single file holds the training split ('train') only; for split 'test' "
        "give a folder with one file per split (train.jsonl, test.jsonl)"
    )


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": 2}]
    datasets.Dataset.from_list([{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]).save_to_disk(
        str(tmp_path / "plain")
    )
    d = custom(tmp_path / "plain")
    assert load(d) == [Problem("plain:train:1", "q1", "1"), Problem("plain:train:2", "q2", "2")]
    with pytest.raises(DataError, match=r"a saved Dataset \(not a DatasetDict\) holds the training split"):
        load(d, "test")

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:1]),
            "validation": datasets.Dataset.from_list([{"question": "v", "answer": 9}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    d = custom(tmp_path / "dict", eval_split="validation")
    assert load(d, "train") == [Problem("dict:train:1", "q1", "1")]
    assert load(d, "validation") == [Problem("dict:validation:1", "v", "9")]
    with pytest.raises(DataError) as err:
        load(d, "test")
    assert (
        str(err.value) == f"{tmp_path / 'dict'}: no split 'test' in this saved DatasetDict (it has: train, validation)"
    )


# --------------------------------------------------------------------------- chat format

CHAT = [
    {"role": "system", "content": "You solve puzzles."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "6 * 7 = 42. #### 42"},
]


def test_chat_question_column(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": CHAT, "answer": 42}, {"messages": CHAT[1:2], "answer": "42", "sol": "by hand"}],
    )
    problems = load(custom(path, question_field="messages"))
    first, second = problems
    assert first.question == "What is 6 * 7?"  # the teacher's plain context
    assert first.messages == CHAT[:2]  # the trailing assistant message is not part of the prompt
    assert first.solution == "6 * 7 = 42. #### 42" and first.gold == "42"
    assert second.messages == CHAT[1:2] and second.solution is None
    assert load(custom(path, question_field="messages", solution_field="sol"))[1].solution == "by hand"

    tok = RecordingTokenizer()
    # the chat's own system message wins over the recipe's; the instruction ends the user turn
    assert build_prompt(tok, first, "Recipe system.", "hash") == (
        '<system>You solve puzzles.</system><user>What is 6 * 7?\n\nGive the final answer after "####".</user>'
        "<assistant>"
    )
    assert build_prompt(tok, second, "Recipe system.", "boxed") == (
        "<system>Recipe system.</system><user>What is 6 * 7?\n\nPut the final answer in \\boxed{}.</user><assistant>"
    )
    assert build_prompt(tok, second, None, "none") == "<user>What is 6 * 7?</user><assistant>"
    assert first.messages == CHAT[:2]  # building a prompt does not change the problem


def test_chat_column_in_a_saved_dataset(tmp_path):
    """Arrow stores the chat as a list of structs; it comes back as the same dicts."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": CHAT, "answer": "42"}]).save_to_disk(str(tmp_path / "chat"))
    (problem,) = load(custom(tmp_path / "chat", question_field="prompt"))
    assert problem.messages == CHAT[:2] and problem.question == "What is 6 * 7?"


# --------------------------------------------------------------------------- mapping errors


def test_a_column_no_row_has_names_the_field_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["not json", {"question": "q", "answer": "1"}, {"question": "r"}])
    with pytest.raises(DataError) as err:
        load(custom(path, answer_field="anwser"))
    assert str(err.value) == f"data.answer_field: no column 'anwser' in {path} (line 2 has: question, answer)"
    with pytest.raises(DataError, match=r"^data.question_field: no column 'prompt' in "):
        load(custom(path, question_field="prompt"))
    with pytest.raises(DataError, match=r"^data.solution_field: no column 'worked'"):
        load(custom(path, solution_field="worked"))


def test_a_column_no_row_has_in_a_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError) as err:
        load(custom(tmp_path / "t.parquet", answer_field="target"))
    assert str(err.value) == (
        f"data.answer_field: no column 'target' in {tmp_path / 't.parquet'} (columns: question, answer)"
    )


def test_malformed_rows_are_skipped_with_their_line_numbers(tmp_path):
    lines = [
        {"q": "ok", "a": "1"},  # 1
        {"a": "2"},  # 2: no question
        {"q": "no answer"},  # 3
        "",  # 4: blank, ignored
        {"q": "bool", "a": True},  # 5
        {"q": {"text": "x"}, "a": "3"},  # 6
        {
            "q": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "assistant"}],
            "a": "1",
        },
        {"q": [{"role": "system", "content": "s"}], "a": "1"},  # 8
        {"q": "   ", "a": "4"},  # 9
        {"q": "empty gold", "a": ""},  # 10
        "[1]",  # 11
        {"q": "inf", "a": float("inf")},  # 12: json.dumps writes Infinity, which json.loads reads
        {"q": "ok 2", "a": 2},  # 13
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    with pytest.warns(MalformedRowsWarning) as record:
        problems = load(custom(path, question_field="q", answer_field="a"))
    assert [p.id for p in problems] == ["rows:train:1", "rows:train:13"]
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{path}: kept 2 rows, skipped 10: missing field 'q' at line 2; missing field 'a' at line 3; "
        "field 'a' is not a string or a number at line 5; field 'q' is not a string or a chat message list at line 6; "
        "field 'q' is not a chat message list (each needs a string role and content) at line 7; "
        "field 'q': the chat does not end with a user message at line 8; empty field 'q' at line 9; "
        "empty gold answer at line 10; not a JSON object at line 11; field 'a' is not a finite number at line 12"
    )


def test_no_usable_row_is_an_error(tmp_path, recwarn):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}, {"question": "", "answer": "1"}])
    with pytest.raises(DataError) as err:
        load(custom(path))
    assert str(err.value) == (
        f"{path}: no usable row; skipped 2: missing field 'answer' at line 1; empty field 'question' at line 2"
    )
    assert not recwarn.list


def test_source_must_be_exactly_one_of_path_and_hub_id(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "1"}])
    for d, got in ((custom(path, hub_id="someone/set"), "both"), (custom(), "neither")):
        with pytest.raises(DataError) as err:
            load(d)
        assert str(err.value) == (
            "data.path, data.hub_id: task custom needs exactly one (a local file or folder, "
            f"or a hub dataset id); got {got}"
        )


def test_missing_and_unsupported_paths(tmp_path):
    (tmp_path / "x.csv").write_text("question,answer\nq,1\n")
    cases = [
        (tmp_path / "nope.jsonl", f"{tmp_path / 'nope.jsonl'}: no such data file or folder"),
        (tmp_path / "x.csv", f"{tmp_path / 'x.csv'}: expected a .jsonl, .json or .parquet file, or a folder of them"),
    ]
    for path, expected in cases:
        with pytest.raises(DataError) as err:
            load(custom(path))
        assert str(err.value) == expected


def test_load_task_points_at_load_custom():
    with pytest.raises(ValueError, match=r"custom.load_custom\(recipe.data, split, n, seed\)"):
        data.load_task("custom", "train")


# --------------------------------------------------------------------------- the hub


def fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_unreachable_is_a_one_line_data_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/set' on the Hub\nRetrying in 1s")

    fake_datasets(monkeypatch, unreachable)
    with pytest.raises(DataError) as err:
        load(custom(hub_id="someone/set", hub_config="main"), "train")
    assert str(err.value) == (
        "data.hub_id: could not load 'someone/set' (config 'main', split 'train') from the Hugging Face hub "
        "(ConnectionError: Couldn't reach 'someone/set' on the Hub); the hub may be unreachable: "
        "set data.path to a local copy"
    )


def test_hub_rows_go_through_the_same_mapping(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"problem": "P?", "sol": "x = \\boxed{3}", "other": 1}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    d = custom(hub_id="someone/set", question_field="problem", answer_field="sol", answer_format="boxed")
    assert load(d, "test") == [Problem("someone/set:test:1", "P?", "3", "x = \\boxed{3}")]
    assert calls == [("someone/set", None, "test")]


def test_hub_with_the_real_datasets_package_offline(tmp_path):
    """The real `datasets` with no network (offline mode, so no retries): one line."""
    pytest.importorskip("datasets")
    code = (
        "from cast_mlx.tasks import custom, data; from cast_mlx.config import DataConfig\n"
        "try:\n"
        "    custom.load_custom(DataConfig(task='custom', hub_id='someone/no-such-set'), 'train', None, 0)\n"
        "except data.DataError as exc:\n"
        "    print(exc)\n"
    )
    r = run_cli("-c", code, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1, (r.stdout, r.stderr)
    assert lines[0].startswith("data.hub_id: could not load 'someone/no-such-set' (config None, split 'train')")


# --------------------------------------------------------------------------- prompts

# What build_prompt produced with the embedded SmolLM2 tokenizer before the custom task
# existed: the built-in tasks' prompts must stay byte-identical.
ARITHMETIC_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    '<|im_start|>user\nWhat is 14 + 8?\n\nGive the final answer after "####".<|im_end|>\n<|im_start|>assistant\n'
)
ARITHMETIC_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 1780, 314, 216, 33, 36, 1232, 216, 40, 47, 198, 198, 26533, 260, 3403, 2988, 990, 476,
    1229, 2227, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip
GSM8K_PROMPT = (
    "<|im_start|>system\nYou are a careful solver.<|im_end|>\n<|im_start|>user\nJanet has 3 ducks. How many?\n\n"
    'Give the final answer after "####".<|im_end|>\n<|im_start|>assistant\n'
)
MATH_BOXED_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nJanet has 3 ducks. How many?\n\nPut the final answer in \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smol_tokenizer():
    models = pytest.importorskip("cast_mlx.engine.models")
    if not models.is_fetched(models.DEFAULT_MODEL):
        pytest.skip("embedded model not fetched")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(models.embedded_dir(models.DEFAULT_MODEL)))


def test_builtin_prompts_are_unchanged(smol_tokenizer, tmp_path):
    (arith,) = data.load_task("arithmetic", "train", n=1, level=1, seed=0)
    assert arith.question == "What is 14 + 8?"
    assert build_prompt(smol_tokenizer, arith, None, "hash") == ARITHMETIC_PROMPT
    assert data.prompt_ids(smol_tokenizer, arith, None, "hash") == ARITHMETIC_PROMPT_IDS
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Janet has 3 ducks. How many?", "answer": "x\n#### 3"}])
    (gsm8k,) = data.load_task("gsm8k", "test", path=path)
    assert gsm8k.messages is None
    assert build_prompt(smol_tokenizer, gsm8k, "You are a careful solver.", "hash") == GSM8K_PROMPT
    assert build_prompt(smol_tokenizer, gsm8k, None, "boxed") == MATH_BOXED_PROMPT
    # a custom plain-text question with the same format gives the same prompt as gsm8k
    (same,) = load(custom(path))
    assert build_prompt(smol_tokenizer, same, "You are a careful solver.", "hash") == GSM8K_PROMPT


def test_answer_format_none_adds_no_instruction(smol_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "free.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    (problem,) = load(custom(path, answer_format="none"))
    assert problem.gold == "Paris"
    prompt = build_prompt(smol_tokenizer, problem, None, "none")
    assert "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert "####" not in prompt and "boxed" not in prompt
    assert data.user_message(problem, "none") == "Capital of France?"
    with pytest.raises(ValueError, match=r"answer_format must be one of \('hash', 'boxed', 'none'\)"):
        data.user_message(problem, "json")


# --------------------------------------------------------------------------- cast_mlx.eval --task custom


def _custom_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder whose checkpoint's recipe trained on a custom folder dataset."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "train q", "target": 1}])
    write_jsonl(folder / "dev.jsonl", [{"prompt": "dev q1", "target": 2}, {"prompt": "dev q2", "target": "#### 3"}])
    run = tmp_path / "run"
    ckpt = tiny_checkpoint(run, 4, "t")
    (ckpt / "recipe.yaml").write_text(
        f"name: t\ndata:\n  task: custom\n  path: {folder}\n  question_field: prompt\n  answer_field: target\n"
        "  eval_split: dev\n  answer_format: hash\n  system_prompt: Be exact.\n"
    )
    return run, folder


def test_eval_custom_uses_the_adapter_recipe_mapping_and_eval_split(tmp_path):
    run, folder = _custom_run(tmp_path)
    s = eval_cli.resolve_args(eval_cli.build_parser().parse_args(["--task", "custom", "--adapter", str(run)]))
    assert s["split"] == "dev" and s["path"] == str(folder) and s["system_prompt"] == "Be exact."
    assert s["out"] == str(run / "eval-custom-dev.json")
    problems = ev.load_problems(s)
    assert [(p.id, p.question, p.gold) for p in problems] == [
        ("mine:dev:1", "dev q1", "2"),
        ("mine:dev:2", "dev q2", "3"),
    ]

    # --split and --path override the recipe's; the column mapping stays
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"prompt": "elsewhere", "target": 5}])
    s = eval_cli.resolve_args(
        eval_cli.build_parser().parse_args(
            ["--task", "custom", "--adapter", str(run), "--path", str(other), "--split", "train"]
        )
    )
    assert [(p.id, p.gold) for p in ev.load_problems(s)] == [("other:train:1", "5")]


def test_eval_custom_needs_an_adapter_trained_on_custom(tmp_path, capsys):
    assert eval_cli.main(["--task", "custom"]) == eval_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == ("error: --task custom needs --adapter RUN: the data mapping comes from that recipe's data section\n")
    run = tmp_path / "arith"
    ckpt = tiny_checkpoint(run, 1, "a")
    (ckpt / "recipe.yaml").write_text("name: a\ndata:\n  task: arithmetic\n")
    assert eval_cli.main(["--task", "custom", "--adapter", str(run)]) == eval_cli.EXIT_USAGE
    assert "needs an adapter trained on task custom (its recipe has task arithmetic)" in capsys.readouterr().err


def test_eval_custom_data_error_is_one_line(tmp_path, capsys):
    run, folder = _custom_run(tmp_path)
    (folder / "dev.jsonl").unlink()
    assert eval_cli.main(["--task", "custom", "--adapter", str(run)]) == eval_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}: no dev.jsonl, dev.json or dev.parquet")

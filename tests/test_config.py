"""Recipe loading and validation, through the CLI as a user meets it."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from cast_mlx import config as cfg

from helpers import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_shipped_recipes_validate():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m-arith.yaml", "qwen0.5b.yaml", "smoke.yaml"} <= names
    for path in RECIPES:
        recipe = cfg.load_recipe(path)
        assert recipe.name and cfg.recipe_hash(recipe) == cfg.recipe_hash(cfg.load_recipe(path))


def test_defaults_and_overrides():
    r = cfg.load_recipe(
        ROOT / "recipes/smoke.yaml", ["algorithm.name=grpo", "sampling.top_p=0.9", "algorithm.wrong_box=[0.9, 1.3]"]
    )
    assert r.algorithm.name == "grpo"
    assert r.sampling.top_p == 0.9
    assert r.algorithm.wrong_box == (0.9, 1.3)
    assert r.algorithm.scale_rewards == "group"
    assert cfg.load_recipe(None, ["algorithm.name=cast"]).algorithm.scale_rewards == "none"
    assert cfg.load_recipe(None, ["algorithm.name=rlsd"]).teacher.context == "privileged"
    # defaults resolved once, in load_recipe: the README's default algorithm, no None left
    default = cfg.load_recipe(None)
    assert default.algorithm.name == "grpo"
    assert (default.algorithm.scale_rewards, default.teacher.context) == ("group", "instructed")
    # an explicit value wins over the algorithm's default
    assert (
        cfg.load_recipe(None, ["algorithm.name=cast", "algorithm.scale_rewards=group"]).algorithm.scale_rewards
        == "group"
    )
    # an override changes the hash, the same override gives the same hash
    base = cfg.recipe_hash(cfg.load_recipe(ROOT / "recipes/smoke.yaml"))
    assert cfg.recipe_hash(r) != base


def test_a_retired_field_loads_when_off_and_is_refused_when_on(tmp_path: Path):
    """Run folders of older versions hold `system.compiled_decode: false`: they load as the
    same recipe; a file asking for the removed step is refused in one line naming the field."""
    import yaml

    data = yaml.safe_load((ROOT / "recipes/smoke.yaml").read_text())
    for value in (False, True):
        data.setdefault("system", {})["compiled_decode"] = value
        (tmp_path / f"{value}.yaml").write_text(yaml.safe_dump(data))
    off = cfg.load_recipe(tmp_path / "False.yaml")
    assert cfg.recipe_hash(off) == cfg.recipe_hash(cfg.load_recipe(ROOT / "recipes/smoke.yaml"))
    with pytest.raises(cfg.ConfigError, match=r"^system\.compiled_decode: .*removed"):
        cfg.load_recipe(tmp_path / "True.yaml")


def test_exponent_floats_without_a_dot(tmp_path: Path):
    # YAML 1.1 (PyYAML) reads 4e-4 as a string; float fields accept it, in a file and in --set
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer:\n  lr: 4e-4\nalgorithm:\n  wrong_box: [0.95, 12E-1]\n")
    r = cfg.load_recipe(recipe, ["sampling.min_p=5e-2"])
    assert r.optimizer.lr == 4e-4 and r.algorithm.wrong_box == (0.95, 1.2)
    assert r.sampling.min_p == 0.05
    assert cfg.load_recipe(None, ["optimizer.lr=+1E-3"]).optimizer.lr == 1e-3
    for bad in ("4e", "e-4", "1e-4x", "inf", "1_0e2"):
        with pytest.raises(cfg.ConfigError, match="optimizer.lr: expected a number"):
            cfg.load_recipe(None, [f"optimizer.lr={bad}"])


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("sampling:\n  gruop_size: 4\n", [], "sampling.gruop_size: unknown key; allowed: prompts_per_step"),
        ("bogus: 1\n", [], "bogus: unknown key"),
        ("sampling:\n  group_size: four\n", [], "sampling.group_size: expected an integer, got 'four'"),
        ("sampling:\n  group_size: 2.5\n", [], "sampling.group_size: expected an integer"),
        ("logging:\n  dashboard: 3\n", [], "logging.dashboard: expected true or false"),
        ("sampling:\n  temperature: 0\n", [], "sampling.temperature: must be > 0.0, got 0.0"),
        ("sampling:\n  group_size: 1\n", [], "sampling.group_size: must be >= 2, got 1"),
        ("sampling:\n  top_p: 1.5\n", [], "sampling.top_p: must be <= 1.0, got 1.5"),
        (
            "algorithm:\n  name: ppo\n",
            [],
            "algorithm.name: 'ppo' is not allowed; choose one of: cast, cast-verl, grpo, rlsd",
        ),
        ("algorithm:\n  correct_box: [0.8]\n", [], "algorithm.correct_box: expected a list of 2 numbers"),
        ("algorithm:\n  correct_box: [1.1, 1.2]\n", [], "algorithm.correct_box: need 0 < low <= 1 <= high"),
        (
            "algorithm:\n  name: cast\nteacher:\n  context: privileged\n",
            [],
            "teacher.context: 'privileged' shows the gold answer",
        ),
        ("sampling: 3\n", [], "sampling: expected a mapping"),
        ("- a\n- b\n", [], "a recipe must be a YAML mapping"),
        ("name: x\n", ["sampling.nope=1"], "--set sampling.nope: unknown key 'sampling.nope'"),
        ("name: x\n", ["sampling=1"], "--set sampling: sampling is a section"),
        ("name: x\n", ["sampling.group_size"], "--set sampling.group_size: expected key=value"),
        ("name: x\n", ["optimizer.lr=-1"], "optimizer.lr: must be > 0.0, got -1.0"),
        ("name: x\n", ["sampling.temperature=\x01"], "value is not valid YAML"),
        ("name: x\n", ["optimizer.lr=-1e-4"], "optimizer.lr: must be > 0.0, got -0.0001"),
        ("loss:\n  num_iterations: 0\n", [], "loss.num_iterations: must be >= 1"),
        ("loss:\n  importance_level: row\n", [], "loss.importance_level"),
        ("sampling:\n  max_rounds: 0\n", [], "sampling.max_rounds: must be >= 1"),
        ("sampling:\n  top_k: -1\n", [], "sampling.top_k: must be >= 0"),
    ],
)
def test_bad_recipe_cli(tmp_path: Path, yaml_text, overrides, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text)
    args = ["-m", "cast_mlx.train", "--recipe", str(recipe)]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert proc.stdout == ""  # nothing printed before the error


def test_missing_and_malformed_files(tmp_path: Path):
    proc = run_cli("-m", "cast_mlx.train", "--recipe", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsampling:\n  group_size: [1, 2\n")
    proc = run_cli("-m", "cast_mlx.train", "--recipe", str(bad))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "malformed YAML at line" in proc.stderr


def test_cli_prints_resolved_recipe():
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--print-config", "--set", "algorithm.name=grpo"
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: grpo" in proc.stdout
    assert "scale_rewards: group" in proc.stdout  # the derived default is shown resolved
    assert "# recipe hash: " in proc.stdout


# --------------------------------------------------------------------------- issue #15


# Byte strings a recipe file may hold: each loads or is one ConfigError, never anything else.
AWKWARD_RECIPES = [
    b"",  # empty: all defaults
    b"\n\n# only a comment\n",
    b"\xef\xbb\xbfname: bom\n",  # a UTF-8 byte-order mark is fine
    b"\xff\xfe",
    b"name: caf\xe9\n",  # Latin-1
    b"\x00\x01\x02",
    b"name: x\x07\n",
    b"[1, 2]",
    b"- a\n- b\n",
    b"3",
    b"null",
    b"'just a string'",
    b"name: x\nname: y\n",
    b"sampling:\n  top_p: 0.5\nsampling:\n  group_size: 4\n",
    b"!!python/object/apply:os.system ['echo pwned']\n",
    b"name: !!python/name:os.system\n",
    b"seed: !!python/object:builtins.int {}\n",
    b"name: !!binary aGk=\n",
    b"name: 2001-13-14\n",
    b"seed: 1" + b"0" * 5000 + b"\n",
    b"seed: 0b" + b"1" * 20000 + b"\n",
    b"optimizer:\n  lr: 0x" + b"f" * 3000 + b"\n",
    b"optimizer:\n  lr: 1.0e+999\n",
    b"a: " + b"[" * 5000,
    b"sampling: " + b"{a: " * 3000,
    b"a: &a [1, 1]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\nname: [*c, *c, *c]\n",
    b"? [a]\n: 1\n",
    b"? {a: 1}\n: 1\n",
    b"1: x\n",
    b"null: x\n",
    b'"a\\nb": 1\n',
    b"sampling:\n  '\\u2028': 1\n",
    b"---\nname: a\n---\nname: b\n",
    b"name: x\n  bad indent: 1\n",
    b"name: 'unterminated\n",
    b'name: "\\xff"\n',
    b"\tname: tab\n",
    b"%YAML 9.9\n---\nname: x\n",
    b"<<: {name: merged}\nname: own\n",
    b"name: *undefined\n",
    b"sampling: !!set {a, b}\n",
    b"lora:\n  keys: !!omap [{a: 1}]\n",
]


def _mutations(rng, text: bytes, n: int):
    """Random byte flips, insertions of YAML-significant bytes and truncations of `text`."""
    pieces = [b":", b"{", b"}", b"[", b"]", b"-", b"\n", b"  ", b"\t", b"'", b'"', b"&a", b"*a", b"!!", b"?",
              b"#", b"%", b"|", b">", b"\x00", b"\xff", b"\xc3", b"9" * 30, b"{nmae}", b"..", b"\\"]  # fmt: skip
    for _ in range(n):
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            kind = rng.randrange(3)
            if kind == 0 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif kind == 1:
                data[at:at] = rng.choice(pieces)
            else:
                del data[at:]
        yield bytes(data)


def test_any_bytes_load_or_raise_one_config_error(tmp_path: Path):
    import random

    rng = random.Random(15)
    cases = list(AWKWARD_RECIPES)
    for path in RECIPES:
        cases += _mutations(rng, path.read_bytes(), 60)
    outcomes = {"loaded": 0, "error": 0}
    recipe = tmp_path / "r.yaml"
    for raw in cases:
        recipe.write_bytes(raw)
        try:
            cfg.load_recipe(recipe)
            outcomes["loaded"] += 1
        except cfg.ConfigError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\u2028" not in message, (raw[:80], message)
            assert len(message) < 400, (raw[:80], message)
            outcomes["error"] += 1
    assert outcomes["loaded"] > 10 and outcomes["error"] > 100, outcomes
    # the messages of a few of them
    for raw, expected in [
        (b"name: caf\xe9\n", "r.yaml: not UTF-8 at line 1 (byte 0xe9)"),
        (b"name: x\nseed: 1\nname: y\n", "r.yaml: malformed YAML at line 3: duplicate key 'name'"),
        (b"!!python/object/apply:os.system ['echo pwned']\n", "could not determine a constructor for the tag"),
        (b"a: " + b"[" * 5000, "r.yaml: malformed YAML: nested too deeply"),
        (b"seed: 0b" + b"1" * 20000 + b"\n", "seed: <an integer of 20000 bits> is too large"),
        (b"3", "r.yaml: a recipe must be a YAML mapping, got int"),
        (b"---\nname: a\n---\nname: b\n", "expected a single document in the stream, but found another document"),
    ]:
        recipe.write_bytes(raw)
        with pytest.raises(cfg.ConfigError, match=re.escape(expected)):
            cfg.load_recipe(recipe)
    recipe.write_bytes(b"")
    assert cfg.load_recipe(recipe) == cfg.load_recipe(None)  # an empty file: all defaults
    with pytest.raises(cfg.ConfigError, match=re.escape(f"{tmp_path}: is a folder, not a recipe file")):
        cfg.load_recipe(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_recipe_file(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    recipe.chmod(0)
    with pytest.raises(cfg.ConfigError, match=re.escape(f"{recipe}: cannot read the recipe (Permission denied)")):
        cfg.load_recipe(recipe)


def test_unreadable_recipes_through_the_cli(tmp_path: Path):
    """The train CLI prints the ConfigError as its one line and exits 2."""
    for raw, expected in [
        (b"name: caf\xe9\n", "not UTF-8 at line 1"),
        (b"sampling:\n  top_p: 0.5\nsampling:\n  top_p: 0.9\n", "duplicate key 'sampling'"),
        (b"seed: 4294967296\n", "seed: must be < 4294967296, got 4294967296"),
    ]:
        recipe = tmp_path / "r.yaml"
        recipe.write_bytes(raw)
        proc = run_cli("-m", "cast_mlx.train", "--recipe", str(recipe), "--print-config")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and expected in proc.stderr
        assert proc.stdout == ""


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"seed": -1}, "seed: must be >= 0, got -1"),
        ({"seed": 2**32}, "seed: must be < 4294967296, got 4294967296"),
        ({"seed": 2**70}, "seed: 1180591620717411303424 is too large (the limit is 2**63 - 1)"),
        ({"schedule": {"steps": 2**63}}, "schedule.steps: 9223372036854775808 is too large"),
        (
            {"logging": {"out_dir": "runs/{nmae}"}},
            "logging.out_dir: unknown placeholder {nmae}; the only one is {name}",
        ),
        ({"logging": {"out_dir": "runs/{}"}}, "logging.out_dir: unknown placeholder {}"),
        ({"logging": {"out_dir": "runs/{name[0]}"}}, "logging.out_dir: unknown placeholder {name[0]}"),
        ({"logging": {"out_dir": "runs/{name!r}"}}, "logging.out_dir: unknown placeholder {name!r}"),
        ({"logging": {"out_dir": "runs/{name:>9}"}}, "logging.out_dir: unknown placeholder {name:>9}"),
        ({"logging": {"out_dir": "runs/{name"}}, "logging.out_dir: expected '}' before end of string in 'runs/{name'"),
        ({"logging": {"out_dir": "runs/}"}}, "logging.out_dir: Single '}' encountered"),
        ({"logging": {"out_dir": ""}}, "logging.out_dir: must not be empty"),
        ({"logging": {"out_dir": "runs/\x00x"}}, "logging.out_dir: holds control characters"),
        ({"name": ""}, "name: must not be empty, got ''"),
        ({"name": "  "}, "name: must not be empty"),
        ({"name": "."}, "name: must be a plain folder name"),
        ({"name": ".."}, "name: must be a plain folder name (no '/', '\\', '.', '..' or control characters), got '..'"),
        ({"name": "../escape"}, "name: must be a plain folder name"),
        ({"name": "/abs/path"}, "name: must be a plain folder name"),
        ({"name": "a\\b"}, "name: must be a plain folder name"),
        ({"name": "a\nb"}, "got 'a\\nb'"),
        ({"name": "a\x1b[31m"}, "name: must be a plain folder name"),
        ({"name": "x" * 256}, "name: at most 255 bytes, got 256"),
        ({"model": {"name": " "}}, "model.name: must not be empty"),
        ({"data": {"path": "x.jsonl"}}, "data.path: the arithmetic task is generated and reads no file"),
        ({"data": {"task": "gsm8k", "path": ""}}, "data.path: must not be empty (null: the task's hub dataset)"),
        ({"system": {"dist_timeout": 1e12}}, "system.dist_timeout: must be <= 9223372036.0"),
        ({"system": {"memory_limit_gb": 1e30}}, "system.memory_limit_gb: must be <= 1048576.0"),
        ({"optimizer": {"lr": 2**2000}}, "optimizer.lr: expected a finite number, got 114813069527425452"),
    ],
)
def test_values_the_run_cannot_use(data, expected):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_dict(data)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_values_the_run_can_use():
    for data in (
        {"seed": 2**32 - 1, "name": "cast-seed1.v2 (ok)"},
        {"logging": {"out_dir": "runs/{name}/x-{name}"}},
        {"logging": {"out_dir": "runs/{{literal}}"}},
        {"data": {"task": "gsm8k", "path": "some/folder"}},
    ):
        cfg.from_dict(data)
    assert cfg.out_dir(cfg.from_dict({"name": "a", "logging": {"out_dir": "r/{{x}}-{name}"}})) == Path("r/{x}-a")


def test_a_single_data_file_is_not_used_as_held_out_eval(tmp_path: Path):
    """data.load_task reads a folder's `{split}.jsonl` but one file for every split: with
    in-training eval on, the training problems would be scored as held-out ones."""
    single = tmp_path / "gsm8k.jsonl"
    single.write_text('{"question": "q", "answer": "#### 1"}\n')
    data = {"task": "gsm8k", "path": str(single)}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_dict({"data": data, "logging": {"eval_every": 5}})
    assert str(err.value) == (
        f"data.path: {single} is a single file, so logging.eval_every would evaluate on the training "
        "problems; give a folder with train.jsonl and test.jsonl, or set logging.eval_every: 0"
    )
    cfg.from_dict({"data": data})  # no in-training eval: the file is only the training data
    cfg.from_dict({"data": {**data, "path": str(tmp_path)}, "logging": {"eval_every": 5}})  # a folder


def test_the_schema_names_what_the_algorithm_facts_declare():
    import typing

    from cast_mlx.algorithm.facts import ALGORITHMS, SCALE_REWARDS, TEACHER_CONTEXTS

    hints = typing.get_type_hints(cfg.AlgorithmConfig)
    assert typing.get_args(hints["name"]) == tuple(sorted(ALGORITHMS)) == ("cast", "cast-verl", "grpo", "rlsd")
    assert typing.get_args(cfg.ScaleRewards) == SCALE_REWARDS == ("none", "group", "batch")
    assert (
        typing.get_args(cfg.TeacherContext) == TEACHER_CONTEXTS == ("instructed", "question-only", "same", "privileged")
    )
    assert typing.get_args(hints["scale_rewards"]) == (cfg.ScaleRewards, type(None))
    assert typing.get_args(typing.get_type_hints(cfg.TeacherConfig)["context"]) == (cfg.TeacherContext, type(None))
    for name, facts in ALGORITHMS.items():  # the defaults a recipe gets are the declared ones
        r = cfg.from_dict({"algorithm": {"name": name}})
        assert (r.algorithm.scale_rewards, r.teacher.context) == (facts.scale_rewards, facts.teacher_context)


def test_an_answer_free_algorithm_refuses_the_privileged_context():
    from cast_mlx.algorithm.facts import ALGORITHMS

    for name, facts in ALGORITHMS.items():
        data = {"algorithm": {"name": name}, "teacher": {"context": "privileged"}}
        if facts.uses_teacher and facts.answer_free:
            with pytest.raises(cfg.ConfigError, match="teacher.context"):
                cfg.from_dict(data)
        else:
            assert cfg.from_dict(data).teacher.context == "privileged"


def test_the_privileged_context_check_reads_the_declared_facts():
    """The refusal names the algorithm and offers the declared ones whose teacher may see
    the answer, as the table holds them when the recipe is checked."""
    from cast_mlx.algorithm.facts import ALGORITHMS, declare

    data = {"algorithm": {"name": "cast-verl"}, "teacher": {"context": "privileged"}}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_dict(data)
    assert str(err.value) == (
        "teacher.context: 'privileged' shows the gold answer; cast-verl's teacher is answer-free "
        "(use instructed, question-only or same, or algorithm.name=rlsd; "
        "teacher.oracle=true runs it as a labelled oracle, not CAST)"
    )
    declare(dataclasses.replace(ALGORITHMS["rlsd"], name="peek"))  # a second one that sees the answer
    try:
        with pytest.raises(cfg.ConfigError) as err:
            cfg.from_dict(data | {"algorithm": {"name": "cast"}})
        assert str(err.value).endswith(
            "cast's teacher is answer-free (use instructed, question-only or same, or algorithm.name=peek or rlsd; "
            "teacher.oracle=true runs it as a labelled oracle, not CAST)"
        )
    finally:
        ALGORITHMS.pop("peek")
    # the defaults a recipe gets come from the facts: cast-verl's scaling is group, cast's none
    assert cfg.from_dict({"algorithm": {"name": "cast-verl"}}).algorithm.scale_rewards == "group"
    assert cfg.from_dict({"algorithm": {"name": "cast"}}).algorithm.scale_rewards == "none"
    assert cfg.from_dict({"algorithm": {"name": "rlsd"}}).teacher.context == "privileged"
    assert cfg.from_dict({"algorithm": {"name": "rlsd"}, "teacher": {"context": "same"}}).teacher.context == "same"


def test_an_oracle_is_declared_and_only_an_oracle_may_be():
    """The CAST rule with a teacher that sees the answer runs only behind teacher.oracle, and
    the switch means exactly that case."""
    oracle = {"algorithm": {"name": "cast"}, "teacher": {"context": "privileged", "oracle": True}}
    r = cfg.from_dict(oracle)
    assert (r.teacher.context, r.teacher.oracle) == ("privileged", True)
    for bad in (
        {"algorithm": {"name": "cast"}, "teacher": {"oracle": True}},  # answer-free context
        {"algorithm": {"name": "rlsd"}, "teacher": {"oracle": True}},  # sees the answer anyway
        {"algorithm": {"name": "grpo"}, "teacher": {"context": "privileged", "oracle": True}},  # no teacher
    ):
        with pytest.raises(cfg.ConfigError, match=r"^teacher.oracle: only for an answer-free algorithm"):
            cfg.from_dict(bad)


def test_contexts_by_their_new_names_and_the_old_one():
    # cast reads the spec's answer-free context, the port its own prompt
    assert cfg.from_dict({"algorithm": {"name": "cast"}}).teacher.context == "instructed"
    assert cfg.from_dict({"algorithm": {"name": "cast-verl"}}).teacher.context == "same"
    # the question-only context was called plain: older recipes and run folders still load
    old = cfg.from_dict({"algorithm": {"name": "cast"}, "teacher": {"context": "plain"}})
    assert old.teacher.context == "question-only"
    assert cfg.load_recipe(None, ["teacher.context=plain"]).teacher.context == "question-only"
    # the committed recipes whose committed runs used the question-only context keep it
    for name in ("smollm2-135m-arith", "smollm2-135m-gsm8k"):
        assert cfg.load_recipe(ROOT / f"recipes/{name}.yaml").teacher.context == "question-only", name

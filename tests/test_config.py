"""Recipe loading and validation, through the CLI as a user meets it."""

from __future__ import annotations

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
    assert (default.algorithm.scale_rewards, default.teacher.context) == ("group", "plain")
    # an explicit value wins over the algorithm's default
    assert (
        cfg.load_recipe(None, ["algorithm.name=cast", "algorithm.scale_rewards=group"]).algorithm.scale_rewards
        == "group"
    )
    # an override changes the hash, the same override gives the same hash
    base = cfg.recipe_hash(cfg.load_recipe(ROOT / "recipes/smoke.yaml"))
    assert cfg.recipe_hash(r) != base


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
        ("loss:\n  num_iterations: 2\n", [], "loss.num_iterations: only 1 update per batch"),
        ("loss:\n  num_iterations: 1\nsampling:\n  top_k: -1\n", [], "sampling.top_k: must be >= 0"),
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

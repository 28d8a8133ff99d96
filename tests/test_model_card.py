"""The model card (`training/model_card.py`) of a synthetic run folder: the base model, the
algorithm by what it does, the eval table with its CIs and the paired test, commands that
mlx-lm's own parsers accept, the recipe; the end of a run writes it into the last checkpoint,
and the summary's "use it" lines. No model is loaded."""

from __future__ import annotations

import ast
import errno
import importlib.util
import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from cast_mlx import config as cfg
from cast_mlx.algorithm.facts import ALGORITHMS
from cast_mlx.engine import models
from cast_mlx.training import checkpoint, model_card, summary

from helpers import write_run


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _block(card: str, lang: str) -> list[str]:
    return card.split(f"```{lang}\n")[1].split("```")[0].splitlines()


def test_the_card_of_the_best_checkpoint(tmp_path):
    run = write_run(tmp_path / "run")
    best = run / "checkpoints" / "step_000002"
    card = model_card.render_card(run, best)
    meta = _front_matter(card)
    assert meta["base_model"] == model_card.EMBEDDED_ORIGIN[models.DEFAULT_MODEL]
    assert meta["library_name"] == "mlx" and {"lora", "cast-verl"} <= set(meta["tags"])
    assert "# arith-demo\n" in card
    assert f"| algorithm | `cast-verl`: {ALGORITHMS['cast-verl'].summary} (teacher.context: same) |" in card
    assert "| checkpoint | step 2 of 4 (the best by eval accuracy of the run) |" in card
    assert f"`{models.DEFAULT_MODEL}`, cast-mlx's embedded copy of HuggingFaceTB/SmolLM2-135M-Instruct" in card
    # the eval table: every eval once (the torn line skipped), with its CI; this adapter's row marked
    assert "| 0 | 0.250 | 0.000 to 0.750 | 0.125 | 4 |" in card
    assert "| **2** (this adapter) | 0.750 | 0.250 to 1.000 | 0.375 | 4 |" in card
    assert "| 4 | 0.500 | 0.000 to 1.000 | 0.250 | 4 |" in card
    assert (
        "Step 0 -> step 2, paired on the same 4 problems: +0.500" in card and "(2 newly right, 0 newly wrong)" in card
    )
    commands = _block(card, "bash")
    folder = models.embedded_dir(models.DEFAULT_MODEL)
    assert commands[0].startswith(f"mlx_lm.generate --model {folder} --adapter-path {best} --prompt ")
    assert commands[1] == f"mlx_lm.fuse --model {folder} --adapter-path {best} --save-path {run / 'fused'}"
    assert commands[2].startswith(f"mlx_lm.evaluate --model {run / 'fused'} --tasks gsm8k ")
    assert commands[3] == f"python -m cast_mlx.eval --adapter {best} --task arithmetic"
    assert commands[4].startswith(f"python -m cast_mlx.publish {run} --repo NAME --checkpoint best ")
    recipe = "\n".join(_block(card, "yaml"))
    assert cfg.from_dict(yaml.safe_load(recipe)) == cfg.load_recipe(best / "recipe.yaml")


def test_the_card_of_a_hub_repository_downloads_it(tmp_path):
    run = write_run(tmp_path / "run", "model.name=mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    card = model_card.render_card(run, run / "checkpoints" / "step_000004", repo="me/arith-demo")
    assert _front_matter(card)["base_model"] == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    assert "| checkpoint | step 4 of 4 (the last of the run) |" in card
    assert "| **4** (this adapter) | 0.500 |" in card and "Step 0 -> step 4" in card
    assert _block(card, "bash") == [
        "hf download me/arith-demo --local-dir arith-demo",
        'mlx_lm.generate --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --adapter-path arith-demo --prompt "What '
        'is 12 + 7?"',
        "mlx_lm.fuse --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --adapter-path arith-demo --save-path "
        "arith-demo-fused",
        "mlx_lm.evaluate --model arith-demo-fused --tasks gsm8k  # standard benchmarks: pip install 'mlx-lm[evaluate]'",
        "python -m cast_mlx.eval --adapter arith-demo --task arithmetic",
    ]


def test_an_oracle_is_not_called_cast_and_a_local_base_has_no_hub_id(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    run = write_run(
        tmp_path / "run",
        "algorithm.name=cast",
        "teacher.context=privileged",
        "teacher.oracle=true",
        f"model.name={base}",
    )
    card = model_card.render_card(run, run / "checkpoints" / "step_000004")
    meta = _front_matter(card)
    assert "base_model" not in meta and "oracle" in meta["tags"] and "cast" not in meta["tags"]
    assert f"| algorithm | `cast ({cfg.ORACLE_LABEL} (its teacher sees the gold answer))`: " in card
    assert f"| base model | `{base}` (a local model folder) |" in card


def test_a_run_without_evals_says_so(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    (run / "eval.jsonl").unlink()
    card = model_card.render_card(run, run / "checkpoints" / "step_000004")
    assert "No evaluation in this run" in card and "| step |" not in card and "paired" not in card


def _parse_with_mlx_lm(monkeypatch, command: str) -> None:
    """Parse `command` with the mlx-lm command's own argument parser (nothing runs)."""
    words = shlex.split(command.split("  #")[0])
    if words[0] == "mlx_lm.generate":
        from mlx_lm.generate import setup_arg_parser

        args = setup_arg_parser().parse_args(words[1:])
        assert args.adapter_path and args.prompt
    elif words[0] == "mlx_lm.fuse":
        from mlx_lm.fuse import parse_arguments

        monkeypatch.setattr(sys, "argv", words)
        assert parse_arguments().save_path == words[-1]
    else:  # mlx_lm.evaluate imports lm-eval, not installed here: its parser's options, from its source
        assert words[0] == "mlx_lm.evaluate"
        spec = importlib.util.find_spec("mlx_lm.evaluate")
        assert spec is not None and spec.origin is not None
        options = {
            node.args[0].value
            for node in ast.walk(ast.parse(Path(spec.origin).read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
            if isinstance(node.args[0], ast.Constant)
        }
        assert {w for w in words if w.startswith("--")} <= options


def test_the_commands_parse_with_mlx_lms_own_parsers(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    for repo in (None, "me/arith-demo"):
        commands = _block(model_card.render_card(run, run / "checkpoints" / "step_000002", repo), "bash")
        mlx_lm = [c for c in commands if c.startswith("mlx_lm.")]
        assert [c.split()[0] for c in mlx_lm] == ["mlx_lm.generate", "mlx_lm.fuse", "mlx_lm.evaluate"]
        for command in mlx_lm:
            _parse_with_mlx_lm(monkeypatch, command)


def test_the_end_of_a_run_writes_the_card_into_its_last_checkpoint(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    monkeypatch.setattr("cast_mlx.training.report.write_report", lambda run_dir: Path(run_dir) / "report.html")
    summary.write_run_report(run)
    last = run / "checkpoints" / "step_000004"
    card = (last / model_card.CARD).read_text()
    assert card == model_card.render_card(run, last) and "| **4** (this adapter) |" in card
    assert not (run / "checkpoints" / "step_000002" / model_card.CARD).exists()
    assert checkpoint.unreadable(last) is None  # still a complete checkpoint, and an mlx-lm adapter folder
    assert not list(last.glob(".*.tmp"))


def test_a_card_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    (run / "checkpoints" / "step_000004" / "recipe.yaml").write_text("algorithm: {name: no-such}\n")
    assert summary.write_run_card(run) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: the model card could not be written (ConfigError: ")


def test_a_card_that_does_not_fit_is_a_warning_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith(f".{model_card.CARD}."):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert summary.write_run_card(run) is None
    card = run / "checkpoints" / "step_000004" / model_card.CARD
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        f"warning: the model card could not be written (disk full: cannot write {card} ("
    )
    assert not card.exists() and not list(card.parent.glob(".*"))


@pytest.mark.parametrize("with_best", [True, False])
def test_the_summary_use_it_lines(tmp_path, with_best):
    run = write_run(tmp_path / "run")
    if not with_best:
        (run / "checkpoints" / "best").unlink()
    last = run / "checkpoints" / "step_000004"
    recipe = cfg.load_recipe(last / "recipe.yaml")
    lines = summary.summary_lines(recipe, run, 4, 65.0, last, None)
    use = run / "checkpoints" / ("step_000002" if with_best else "step_000004")
    folder = models.embedded_dir(models.DEFAULT_MODEL)
    start = lines.index("  use it:")
    assert [line.split(" --")[0].strip() for line in lines[start + 1 :]] == [
        "mlx_lm.generate",
        "mlx_lm.fuse",
        "mlx_lm.evaluate",
        "python -m cast_mlx.eval",
        "python -m cast_mlx.publish " + str(run),
    ]
    assert lines[start + 1].startswith(f"    mlx_lm.generate --model {folder} --adapter-path {use} ")
    assert lines[start + 3].startswith(f"    mlx_lm.evaluate --model {run / 'fused'} --tasks gsm8k")
    assert lines[start + 5].startswith(f"    python -m cast_mlx.publish {run} --repo NAME  #")

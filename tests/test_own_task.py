"""Bring your own problems, rewards and starting adapter (issue #17), end to end on the
embedded model: the README's own-task example, warm start from an adapter that mlx-lm's own
SFT trainer wrote, and the TensorBoard / wandb sinks read back by their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cast_mlx import config as cfg
from cast_mlx.engine import models
from cast_mlx.engine.logprobs import token_logprobs, trimmed_batch
from cast_mlx.training import trainer

from helpers import ROOT, run_cli


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_readme_own_task_example_runs(tmp_path, smol_dir):
    out = tmp_path / "own"
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "examples/own-task/recipe.yaml", "--quiet", "--no-dashboard",
        "--set", f"logging.out_dir={out}", "--set", "schedule.steps=2", "--set", "logging.eval_every=2",
        "--set", "data.eval_size=4", "--set", "sampling.max_new_tokens=24",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _metrics(out)
    steps = [m for m in lines if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert {"rewards/math/mean", "rewards/math/std", "rewards/brevity/mean", "rewards/brevity/std"} <= set(m)
        assert 0.0 <= m["rewards/brevity/mean"] <= 0.2
        # GRPO reads the weighted sum: its mean is the two functions' means added
        assert m["reward"] == pytest.approx(m["rewards/math/mean"] + m["rewards/brevity/mean"], abs=1e-6)
    assert lines[0]["step"] == 0 and lines[0]["eval/n"] == 4  # the custom eval split, same mapping


def test_a_hanging_reward_plug_in_stops_the_step_with_an_error(tmp_path, smol_dir):
    plugin = tmp_path / "slow.py"
    plugin.write_text(
        "import time\n\ndef slow(completions, **kw):\n    time.sleep(60)\n    return [0.0] * len(completions)\n"
    )
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard",
        "--set", f"logging.out_dir={tmp_path / 'r'}", "--set", f"reward.functions=[math, {plugin}:slow]",
        "--set", "reward.timeout=2", "--set", "schedule.steps=1", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "slow" in line and "2" in line, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, smol_dir) -> Path:
    """An adapter trained for 2 iterations by mlx-lm's own trainer (mlx_lm.lora) on worked
    solutions from the task generator, with the smoke recipe's LoRA shape."""
    out = tmp_path_factory.mktemp("sft")
    proc = run_cli(
        "scripts/make_sft_arith.py", "--recipe", "recipes/smoke.yaml", "--out", str(out), "--n", "8",
        "--iters", "2", "--train", timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapters" / "adapters.safetensors").is_file()
    return out / "adapters"


def test_warm_start_begins_at_the_adapter(tmp_path, sft_adapter):
    from mlx_lm.tuner.utils import load_adapters

    recipe = cfg.load_recipe(
        ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'r'}", f"model.adapter_path={sft_adapter}"]
    )
    # mlx-lm's own adapter loading on the same base (float32 here: mlx_lm.load would keep the
    # embedded folder's 8-bit weights, a different base)
    theirs, tokenizer = models.load(recipe.model.name, dtype=recipe.model.dtype)
    load_adapters(theirs, str(sft_adapter))
    with trainer.setup(recipe) as run:
        saved = mx.load(str(sft_adapter / "adapters.safetensors"))
        ours = models.lora_state(run.model)
        assert set(saved) == set(ours)
        for k in saved:  # the policy and the teacher's first snapshot are that adapter
            np.testing.assert_array_equal(np.array(ours[k]), np.array(saved[k]), err_msg=k)
            np.testing.assert_array_equal(np.array(run.teacher.params[k]), np.array(saved[k]), err_msg=k)
        assert not np.all(np.array(saved[next(k for k in saved if k.endswith("lora_b"))]) == 0)  # it trained
        prompt = tokenizer.encode("What is 2 + 3?")
        completion = [tokenizer.encode(" 2 + 3 = 5\n#### 5")]
        tokens = mx.array(completion)
        batch = trimmed_batch([prompt], tokens, mx.ones(tokens.shape), [0])
        a = token_logprobs(run.model, batch, 1.0)
        b = token_logprobs(theirs, batch, 1.0)
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_warm_start_with_another_lora_shape_exits_2_before_the_model_loads(tmp_path, sft_adapter):
    proc = run_cli(
        "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard",
        "--set", f"logging.out_dir={tmp_path / 'r'}", "--set", f"model.adapter_path={sft_adapter}",
        "--set", "lora.rank=4", env={"CAST_MLX_HOME": str(tmp_path / "no-models")},
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lora.rank: the recipe has 4, the adapter"), proc.stderr


def test_tensorboard_and_wandb_sinks_write_what_their_readers_read(tmp_path, smol_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sinks"
    proc = run_cli(
        *["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard"],
        *["--set", f"logging.out_dir={out}", "--set", "logging.tensorboard=true", "--set", "logging.wandb=true"],
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rewards = events.Scalars("reward")
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([m["reward"] for m in _metrics(out)])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline wandb run file"

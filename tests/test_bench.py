"""The pure parts of the benchmark scripts (the benchmarks themselves are not run in CI)."""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_step  # noqa: E402

from cast_mlx.engine import models  # noqa: E402


@pytest.mark.parametrize("lora", [False, True])
def test_forward_gflop_counts_the_block_linears_and_the_head(lora):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2, rope_theta=10000.0,
    )  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    if lora:  # adapters add no base matmul: the count stays the same
        models.attach_lora(model, rank=2, alpha=4, dropout=0.0, num_layers=1, keys=["self_attn.q_proj", "mlp.up_proj"])
    # per block, from the config: q and o are hidden x hidden, k and v hidden x (kv heads *
    # head dim), gate, up and down hidden x intermediate
    h, kv = args.hidden_size, args.num_key_value_heads * (args.hidden_size // args.num_attention_heads)
    per_block = 2 * h * h + 2 * h * kv + 3 * h * args.intermediate_size
    # ... which is every 2-D weight of a block, counted from the built model (norms are 1-D)
    block = [v for k, v in tree_flatten(model.model.layers[0].parameters()) if v.ndim == 2 and "lora" not in k]
    assert per_block == sum(v.size for v in block) and len(block) == 7
    expected = 2 * (args.num_hidden_layers * per_block) * 10 + 2 * args.vocab_size * h * 4
    assert bench_step.forward_gflop(model, positions=10, head_positions=4) == pytest.approx(expected / 1e9)
    # profile_teacher times modules by swapping their classes for subclasses: still counted
    # (until session 18 only the LoRA blocks' projections were, a floor 2.4x too low)
    for _, m in model.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = type("Timed", (nn.Linear,), {})
    assert bench_step.forward_gflop(model, positions=10, head_positions=4) == pytest.approx(expected / 1e9)


def test_bench_step_times_the_variants_in_turn(monkeypatch):
    """Each round runs every variant once, so a drifting machine meets them alike; the warm-up
    rounds are not timed and each variant's medians are its own steps'."""
    calls, seconds = [], {"cast": iter([9, 9, 5, 7, 6]), "grpo": iter([9, 9, 4, 3, 8])}

    def learn(run, traj):
        calls.append(run)
        line = {"time/verify": 0.0, "time/teacher": 1.0 if run == "cast" else 0.0, "time/update": next(seconds[run])}
        return line | {"rows_skipped": 0, "compile_count": 0}, []

    monkeypatch.setattr(bench_step.trainer, "learn", learn)
    out = bench_step.time_variants({"cast": "cast", "grpo": "grpo"}, traj=None, repeats=3)
    assert calls == ["cast", "grpo"] * (bench_step.WARMUP_ROUNDS + 3)
    assert out["cast"]["update_s"] == 6 and out["cast"]["step_s"] == 7
    assert out["grpo"]["update_s"] == 4 and out["grpo"]["step_s"] == 4
    assert out["cast"]["rows_updated"] == bench_step.PROMPTS * bench_step.GROUP

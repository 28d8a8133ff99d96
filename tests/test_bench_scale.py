"""scripts/bench_scale.py and scale_models.py (the model configs against their published sizes,
a smoke run on a tiny model, the table and the plot) and bench_peers' pure parts (bfloat16
detection, the TRL dtypes, ratios against the faster TRL run). No real model is measured and
TRL is not run here."""

import argparse
import json
import math
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_peers  # noqa: E402
import bench_scale  # noqa: E402
import scale_models as sm  # noqa: E402

# --------------------------------------------------------------------------- the model configs


@pytest.mark.parametrize("name", sm.REAL)
def test_each_config_has_its_published_size_and_builds_without_memory(name):
    cfg, published = sm.config(name), sm.MODELS[name]["published"]
    counts = sm.param_count(cfg)
    assert counts["total"] == pytest.approx(published["params"], rel=0.03)
    if "non_embedding" in published:
        assert counts["non_embedding"] == pytest.approx(published["non_embedding"], rel=0.03)
    # internally consistent: heads share key/value heads evenly, every matrix quantizes in groups of 64
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert "head_dim" in cfg or cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    assert cfg["hidden_size"] % 64 == 0 and cfg["intermediate_size"] % 64 == 0
    # mlx-lm's own architecture of the config: the same count, nothing allocated (lazy)
    before = mx.get_active_memory()
    model = sm.build(name, materialise=False)
    assert sm.built_params(model) == counts["total"]
    block = sum(v.size for _, v in tree_flatten(model.model.layers[0].parameters()))
    assert block == counts["per_block"]
    assert ("lm_head" in model) == (not cfg["tie_word_embeddings"])
    assert mx.get_active_memory() - before < 2**20


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)])
def test_the_count_from_the_config_is_mlx_lm_s_for_each_architecture(model_type, tied):
    cfg = sm.config("tiny") | {"model_type": model_type, "tie_word_embeddings": tied}
    if model_type == "qwen3":  # its head_dim is its own field, not hidden / heads
        cfg |= {"head_dim": 32, "attention_bias": False}
    counts = sm.param_count(cfg)
    assert sm.built_params(sm.build(cfg, materialise=False)) == counts["total"]
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_param_count_by_hand():
    # tiny: hidden 64, 4 heads of 16, 2 key/value heads, MLP 128, 10 blocks, 49152 tokens, tied
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert sm.param_count(sm.config("tiny")) == {
        "total": 49152 * 64 + 10 * per_block + 64,
        "embedding": 49152 * 64,
        "non_embedding": 10 * per_block + 64,
        "per_block": per_block,
    }


def test_kv_cache_bytes_by_hand():
    # 10 blocks x (keys + values) x 2 heads x 16 dims a position, 3 streams x 5 positions
    assert sm.kv_cache_bytes(sm.config("tiny"), 3, 5, "float32") == 2 * 10 * 2 * 16 * 3 * 5 * 4
    assert sm.kv_cache_bytes(sm.config("tiny"), 3, 5, "4bit") == 2 * 10 * 2 * 16 * 3 * 5 * 2


def test_4bit_quantizes_every_matrix_and_keeps_the_rest_bfloat16():
    model = sm.build("tiny", "4bit")
    kinds = {type(m) for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert kinds <= {nn.QuantizedLinear, nn.QuantizedEmbedding}
    q = model.model.layers[0].self_attn.q_proj
    assert (q.group_size, q.bits) == (64, 4)
    assert model.model.norm.weight.dtype == mx.bfloat16


# --------------------------------------------------------------------------- settings and configurations


def test_the_mac_setting_is_the_mac_recipe_and_default_is_bench_peers(tmp_path):
    mac = bench_scale.recipe_for({"setting": "mac"}, "cast", tmp_path)
    s = mac.sampling
    assert (s.prompts_per_step, s.group_size, s.max_new_tokens) == (4, 8, 320)
    assert (mac.lora.rank, mac.lora.alpha, mac.lora.num_layers, mac.optimizer.micro_batch_size) == (16, 32, 16, 2)
    assert mac.algorithm.name == "cast" and mac.data.task == "custom"
    default = bench_scale.recipe_for({"setting": "default", "group": 4, "max_new": 1024}, "grpo", tmp_path)
    s = default.sampling
    assert (s.prompts_per_step, s.group_size, s.max_new_tokens) == (2, 4, 1024)
    assert (default.lora.rank, default.lora.num_layers) == (8, 8)


def test_configurations_are_every_combination():
    args = argparse.Namespace(
        models=["smollm2-135m", "qwen3-1.7b"], dtype=["float32", "4bit"], settings=["mac"], group_sizes=[4, 8, 16],
        token_caps=None, algorithms=["grpo"], phases=["update"], rollout_tokens=None, warmup=0, repeats=1,
        micro_batch=4,
    )  # fmt: skip
    specs = bench_scale.configurations(args)
    assert len(specs) == 2 * 2 * 1 * 3
    assert {(s["group"], s["max_new"]) for s in specs} == {(4, None), (8, None), (16, None)}
    assert {s["micro_batch"] for s in specs} == {4}
    recipe = bench_scale.recipe_for(specs[0], "grpo", ROOT / "recipes")
    assert recipe.optimizer.micro_batch_size == 4 and recipe.sampling.group_size == 4  # the mac recipe says 2 and 8


# --------------------------------------------------------------------------- a smoke run


def test_the_synthetic_batch_keeps_the_states_the_rollout_keeps(smol_dir, tmp_path):
    from bench_step import write_workload

    from cast_mlx.training import trainer

    recipe = bench_scale.recipe_for({"setting": "default", "group": 3, "max_new": 6}, "grpo", write_workload(tmp_path))
    tokenizer = bench_scale.smol_tokenizer()
    with bench_scale.random_model("tiny", "float32", tokenizer), trainer.setup(recipe, tmp_path / "run") as run:
        assert run.frozen_split == 2  # 10 blocks, LoRA on the last 8
        traj = trainer.sample(run, run.problems[:2])
        kept = traj.rollout.frozen
        ids = np.array(traj.rollout.tokens)
        ours = bench_scale.frozen_states(run, traj.prompts, ids, 3)
        fed = ids.shape[1] - 1  # the last token is never fed back
        assert np.allclose(np.array(ours.completions)[:, :fed], np.array(kept.completions)[:, :fed], atol=1e-5)
        for mine, theirs in zip(ours.prompts, kept.prompts, strict=True):
            assert np.allclose(np.array(mine), np.array(theirs), atol=1e-5)
        batch, said = bench_scale.synthetic_batch(run)
        out = batch.rollout
        assert out.tokens.shape == (6, 6) and said["completion_tokens"] == 36  # 2 prompts x 3, 6 tokens each
        assert out.finish_reasons == ["eos"] * 6 and set(np.array(out.tokens)[:, -1]) == {2}
        assert not set(np.array(out.tokens)[:, :-1].ravel()) & set(run.special_ids)
        assert np.array(batch.rewards).tolist() == [0.0, 1.0] * 3  # both groups: right and wrong


def test_a_tiny_run_measures_every_phase_and_makes_a_table(smol_dir, tmp_path):
    out = tmp_path / "scale.jsonl"
    cmd = [sys.executable, "scripts/bench_scale.py", "--models", "tiny", "--dtype", "float32", "4bit"]
    cmd += ["--group-sizes", "2", "--token-caps", "4", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["dtype"] for x in lines] == ["float32", "4bit"]
    for line in lines:
        assert "error" not in line
        assert (line["prompts"], line["group"], line["max_new"], line["frozen_blocks"]) == (2, 2, 4, 2)
        rollout = line["rollout"]
        assert rollout["full_cap"] and rollout["streams"] == 4 and rollout["decode_tokens"] == 16
        assert line["batch"]["rows"] == 4 and line["batch"]["completion_tokens"] == 16
        for algorithm in ("grpo", "cast"):
            r = line[algorithm]
            assert r["rows_updated"] == 4  # alternating rewards: every group has variance
            assert r["update_s"] > 0 and r["update_peak_gb"] > 0 and r["rss_gb"] > 0
            assert r["step_s"] == pytest.approx(rollout["s"] + r["teacher_s"] + r["update_s"], abs=2e-3)
        assert line["cast"]["teacher_s"] > line["grpo"]["teacher_s"]  # GRPO scores no teacher
    assert lines[0]["resident_gb"] > lines[1]["resident_gb"]  # 4-bit weights take less
    table, plot = tmp_path / "scale.md", tmp_path / "scale.png"
    assert bench_scale.main(["--from", str(out), "--table", str(table), "--plot", str(plot)]) == 0
    rows = [x for x in table.read_text().splitlines() if x.startswith("| default |")]
    assert len(rows) == 4 and plot.read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------- the table and the plot


def fake_lines() -> list[dict]:
    def ours(model, params, step):
        shape = {"prompts": 2, "group": 8, "max_new": 128}
        algorithms = {
            a: {"teacher_s": t, "update_s": 2.0 * step, "step_s": step + t, "learn_s": 2.0, "peak_gb": params / 1e8,
                "rss_gb": 1.5}
            for a, t in (("grpo", 0.0), ("cast", 1.0))
        }  # fmt: skip
        return {"bench": "scale", "tool": "cast-mlx", "model": model, "params": params, "dtype": "float32",
                "setting": "default", **shape, "rollout": {"s": step, "max_new": 128}, **algorithms,
                "machine": "CPU X", "cores": 2}  # fmt: skip

    trl = {"bench": "scale", "tool": "trl", "model": "smollm2-135m", "params": 134515008, "dtype": "bfloat16",
           "setting": "default", "prompts": 2, "group": 8, "max_new": 128,
           "trl": {"step_s": 30.0, "rollout_s": 20.0, "rest_s": 10.0, "rss_gb": 5.6}}  # fmt: skip
    failed = {"bench": "scale", "tool": "cast-mlx", "model": "qwen3-1.7b", "error": "killed"}
    return [ours("smollm2-135m", 134515008, 10.0), ours("qwen2.5-0.5b", 494032768, 30.0), trl, failed]


def test_the_table_has_a_row_per_run_and_skips_failed_lines(tmp_path):
    path = tmp_path / "scale.md"
    sm.write_table(fake_lines(), path, "results.jsonl")
    text = path.read_text()
    rows = [x for x in text.split("## Cost laws")[0].splitlines() if x.startswith("| default |")]
    assert len(rows) == 5  # 2 models x GRPO, CAST + TRL; the failed line has no row
    assert "CPU X (2 cores)" in text and "`results.jsonl` (4 lines" in text
    assert rows[0].startswith("| default | smollm2-135m | 0.135B | bfloat16 | 2 x 8 x 128 | TRL GRPO | 20.0 |")
    assert rows[0].endswith("| — | 10.00 | 30.00 | — | 5.60 |")  # TRL: no teacher column, no MLX peak
    cast = next(r for r in rows if "| CAST |" in r and "0.494B" in r)
    assert cast.endswith("| 30.0 (128) | 1.00 | 60.00 | 31.00 | 4.94 | 1.50 |")
    # the laws: each of our runs measured at two sizes; TRL at one has none
    laws = [x for x in text.split("## Cost laws")[1].splitlines() if x.startswith("| default |")]
    assert [x.split(" | ")[1] for x in laws] == ["CAST", "GRPO"]
    steps = {"CAST": (11.0, 31.0), "GRPO": (10.0, 30.0)}  # ours(): step + teacher; peak = params / 1e8
    for law in laws:
        run, power, peak = law.split(" | ")[1], float(law.split(" | ")[-2]), float(law.split(" | ")[-1][:-2])
        want = math.log(steps[run][1] / steps[run][0]) / math.log(494032768 / 134515008)
        assert power == pytest.approx(want, abs=0.005) and peak == pytest.approx(1.0, abs=0.005)


def test_a_power_law_s_exponent_is_its_log_log_slope():
    assert sm.exponent([(10.0, 3.0 * 10.0**0.8), (100.0, 3.0 * 100.0**0.8), (1000.0, 3.0 * 1000.0**0.8)]) == (
        pytest.approx(0.8)
    )
    assert sm.exponent([(10.0, 1.0)]) is None and sm.exponent([(10.0, 1.0), (10.0, 2.0)]) is None
    assert sm.exponent([(10.0, None), (100.0, 2.0)]) is None  # a missing value is no point


def test_the_plot_is_a_png(tmp_path):
    path = tmp_path / "scale.png"
    sm.write_plot(fake_lines(), path)
    assert path.read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------- bench_peers: bfloat16 and ratios


@pytest.mark.parametrize(
    "system, machine, cpuinfo, sysctl, native, said",
    [
        ("Linux", "x86_64", "flags\t\t: fpu avx2 avx512f avx512_bf16\n", None, True, "avx512_bf16"),
        ("Linux", "x86_64", "flags : fpu avx512f amx_bf16 amx_tile\n", None, True, "amx_bf16"),
        ("Linux", "x86_64", "flags : fpu avx2 avx512f avx512bw\n", None, False, "none of"),
        ("Linux", "aarch64", "Features\t: fp asimd sve bf16 i8mm\n", None, True, "bf16"),
        ("Linux", "x86_64", "", None, False, "none of"),
        ("Darwin", "arm64", "", "1", True, "FEAT_BF16=1"),
        ("Darwin", "arm64", "", "0", False, "FEAT_BF16=0"),
        ("Darwin", "arm64", "", None, False, "FEAT_BF16=unknown"),
        ("Windows", "AMD64", "", None, False, "not detected"),
    ],
)
def test_native_bf16_reads_the_cpu_flags(system, machine, cpuinfo, sysctl, native, said):
    found, text = bench_peers.native_bf16(system, machine, cpuinfo, sysctl)
    assert found is native and said in text


def test_trl_runs_bfloat16_only_where_native_unless_asked():
    assert bench_peers.trl_dtypes(None, True) == ["float32", "bfloat16"]
    assert bench_peers.trl_dtypes(None, False) == ["float32"]
    assert bench_peers.trl_dtypes(["bfloat16"], False) == ["bfloat16"]


def test_ratios_are_against_the_faster_trl_run():
    trl = {"float32": {"step_s": 40.0, "rollout_tok_s": 25.0}, "bfloat16": {"step_s": 32.0, "rollout_tok_s": 30.0}}
    assert bench_peers.fastest(trl) == "bfloat16"
    assert bench_peers.fastest({"float32": {"step_s": None}}) is None and bench_peers.fastest({}) is None
    ours = {"cast": {"step_s": 16.0, "rollout_tok_s": 60.0}, "grpo": {"step_s": 8.0, "rollout_tok_s": 45.0}}
    assert bench_peers.ratios_vs(ours, trl[bench_peers.fastest(trl)]) == {
        "cast_step_vs_trl": 0.5,
        "cast_rollout_tok_s_vs_trl": 2.0,
        "grpo_step_vs_trl": 0.25,
        "grpo_rollout_tok_s_vs_trl": 1.5,
    }


def test_trl_gets_the_prompts_in_the_order_our_run_draws_them(tmp_path):
    from types import SimpleNamespace

    from cast_mlx import config
    from cast_mlx.training import sampling

    data_dir = bench_peers.write_workload(tmp_path / "w")
    steps, n = 40, len(bench_peers.workload_problems())  # past one epoch of 64 prompts
    recipe = config.load_recipe(bench_peers.RECIPE, bench_peers.workload_overrides(data_dir, "grpo", steps))
    state, drawn = SimpleNamespace(epoch=0, cursor=0), []
    for _ in range(steps):
        drawn += sampling.next_indices(n, state, recipe)
    order = bench_peers.training_order(data_dir, steps)
    assert order[: len(drawn)] == drawn and len(order) == 2 * n
    assert order[:n] != list(range(n))  # the default recipe shuffles: file order would differ


def test_check_drawn_refuses_a_step_that_sampled_other_prompts(tmp_path):
    questions = ["q0", "q1", "q2", "q3"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "problem": p}) + "\n" for s, p in [(1, "q1"), (2, "q2")]))
    bench_peers.check_drawn(samples, questions, per_step=2)
    samples.write_text(json.dumps({"step": 2, "problem": "q1"}) + "\n")
    with pytest.raises(RuntimeError, match="step 2 sampled 'q1'"):
        bench_peers.check_drawn(samples, questions, per_step=2)


def test_our_peer_runs_filter_in_trls_order(tmp_path):
    """bench_peers' runs of ours sample as transformers' `generate` does (top-k, then top-p
    over what top-k kept), and the workload's recipe takes that setting."""
    from cast_mlx import config

    sets = bench_peers.workload_overrides(tmp_path, "grpo") + bench_peers.PEER_SAMPLING
    recipe = config.load_recipe(bench_peers.RECIPE, sets)
    assert recipe.sampling.filter_order == "sequential"
    assert (recipe.sampling.top_k, recipe.sampling.top_p) == (20, 0.95)

"""training/memory_plan.py: the config read without the weights, the weight bytes (float and
4-bit), the prediction against measured peaks at three model shapes (within 15%), the refusal
before loading (CLI), `optimizer.micro_batch_size: auto`, and a model the plan does not know."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_cli

sys.path.insert(0, str(ROOT / "scripts"))
import scale_models as sm  # noqa: E402

from cast_mlx import config as cfg  # noqa: E402
from cast_mlx.training import memory_laws as laws  # noqa: E402
from cast_mlx.training import memory_plan as mp  # noqa: E402
from cast_mlx.training import model_shape as ms  # noqa: E402
from cast_mlx.training import preflight  # noqa: E402

GB = 2**30


# --------------------------------------------------------------------------- the config and the weights


def test_the_config_is_read_from_the_folder_the_embedded_cache_or_the_hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    config, folder, note = ms.model_config(str(tiny_model_dir))
    assert folder == tiny_model_dir and note is None and config["model_type"] == "llama"
    # the embedded model: its converted config, or the built-in copy before the first fetch
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path / "empty-home"))
    config, folder, note = ms.model_config("smollm2-135m-instruct")
    assert folder is None and config == laws.BUILTIN_CONFIGS["smollm2-135m-instruct"]
    # a hub id: only from the local Hugging Face cache, never the network
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config, folder, note = ms.model_config("someone/some-model")
    assert config is None and "not in the local Hugging Face cache" in note
    snapshot = tmp_path / "hub" / "models--someone--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--someone--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--some-model" / "refs" / "main").write_text("a" * 40)
    shutil.copy(tiny_model_dir / "config.json", snapshot / "config.json")
    config, folder, note = ms.model_config("someone/some-model")
    assert folder == snapshot and config["hidden_size"] == 32


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen3-1.7b"])
def test_the_weight_bytes_are_those_of_the_built_model(name):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = sm.config(name)
    shape = ms.shape_of(config)
    counts = sm.param_count(config)
    assert mp.weight_bytes(shape, "float32") == counts["total"] * 4
    if name == "tiny":  # 4-bit in groups of 64 (scale_models.QUANT): packed weights, scales, biases
        model = sm.build(name, "4bit")
        built = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        quantized = mp.weight_bytes(ms.Shape(**{**shape.__dict__, "quant": dict(sm.QUANT)}), "quantized")
        assert quantized == pytest.approx(built, rel=0.01)
        mx.clear_cache()


# --------------------------------------------------------------------------- predicted against measured


# The peaks are measured in a fresh process: MLX's peak counts every live array of the process,
# and a test session holds others (the embedded model of earlier tests).
MEASURE = (
    "import json, sys; sys.path.insert(0, 'scripts'); import fit_memory_plan as fit; "
    "p = json.loads(sys.argv[1]); p['phases'] = tuple(p['phases']); "
    "print(json.dumps(fit.measure(fit.Point(**p))))"
)


def measured_against_predicted(point) -> list[tuple[str, float, float]]:
    import dataclasses
    import subprocess

    import fit_memory_plan as fit

    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(dataclasses.asdict(point))],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    guess = fit.predicted(row)
    return [(phase, row["measured"][phase], guess[phase]) for phase in point.phases]


def check_within(results, tolerance=0.15):
    for phase, got, want in results:
        assert want == pytest.approx(got, rel=tolerance), f"{phase}: measured {got:.1f} MiB, predicted {want:.1f}"


def test_the_plan_is_within_15_percent_of_the_measured_peaks_at_the_tiny_shape(smol_dir):
    import fit_memory_plan as fit

    # not a calibration point: two waves of 4 streams, CAST's teacher, 96 tokens
    point = fit.Point("tiny", "cast", prompts=2, group=4, micro_batch=4, max_new=96, lora_layers=8, max_batch=4)
    check_within(measured_against_predicted(point))


def test_the_plan_is_within_15_percent_of_the_measured_peaks_at_a_wide_shape(smol_dir):
    import fit_memory_plan as fit

    point = fit.Point("wide", "grpo", prompts=2, group=4, micro_batch=2, max_new=96, lora_layers=4, max_batch=8)
    check_within(measured_against_predicted(point))


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_the_measured_peaks_at_smollm2_135m(smol_dir):
    import fit_memory_plan as fit

    point = fit.Point("smollm2-135m", "cast", prompts=2, group=4, micro_batch=4, max_new=96, lora_layers=12)
    check_within(measured_against_predicted(point))


def test_the_plan_holds_for_the_cpus_own_scoring_paths(capsys):
    """Session 19's peaks at SmolLM2-135M's shape, measured as a CPU run scores (numpy passes,
    the packed answer-free teacher; `fit_memory_plan.py --check smollm2-135m --cpu-paths`):
    the plan, fitted on MLX's own ops, under-counts no phase by more than 3% and over-counts
    none by more than 16% (the packed teacher's logits are numpy's). `--check` reports them
    with the current constants; the fit never takes such rows."""
    import fit_memory_plan as fit

    source = ROOT / "docs/runs/bench-cpu-s19/memory-plan-cpu-paths.jsonl"
    rows = [json.loads(x) for x in source.read_text().splitlines() if x.strip()]
    assert len(rows) == 6 and all(row["cpu_paths"] for row in rows)
    checked = 0
    for row in rows:
        guess = fit.predicted(row)
        for phase in row["point"]["phases"]:
            got, want = row["measured"][phase], guess[phase]
            assert got * 0.97 <= want <= got * 1.16, f"{row['point']} {phase}: measured {got:.1f}, predicted {want:.1f}"
            checked += 1
    assert checked == 17
    assert fit.main(["--from", str(source), "--check"]) == 0
    report = capsys.readouterr().out
    assert "| smollm2-135m | float32 | cast | 2 x 8, 8, 64, 8, 64 | teacher | 635.9 |" in report
    assert "largest error: 15.4%" in report
    assert fit.fit(rows) == {k: getattr(laws, k) for k in fit.CONSTANTS}  # nothing taken: the constants as they are
    with pytest.raises(SystemExit):
        fit.main(["--cpu-paths"])


def test_the_plan_of_the_mac_recipe_at_qwen2_5_0_5b(monkeypatch):
    """recipes/qwen0.5b.yaml's settings at Qwen2.5-0.5B's shape: float32 (this CPU) above 4-bit,
    whose weights are 7x smaller and whose LoRA layers are not merged while sampling. On a GPU
    the 4-bit update counts its head at the factor fitted to the one peak measured on CUDA
    (8.87 GB at micro-batch 4, docs/benchmarks.md), so the plan gives that peak back there and
    puts the recipe's micro-batch 2 under 8 GB (issue's target; unmeasured)."""
    from cast_mlx.engine import fastmath

    recipe = cfg.load_recipe(ROOT / "recipes" / "qwen0.5b.yaml")
    shape = ms.shape_of(sm.config("qwen2.5-0.5b") | {"quantization": {"group_size": 64, "bits": 4}})
    work = mp.replace(mp.workload(recipe, prompt_tokens=50, teacher_tokens=0), dtype="quantized")
    assert not work.gpu  # this CPU
    monkeypatch.setattr(fastmath, "on_cpu", lambda: False)
    assert mp.workload(recipe, prompt_tokens=50, teacher_tokens=0).gpu
    four = mp.predict(shape, work)
    full = mp.predict(shape, mp.replace(work, dtype="float32"))
    assert mp.peak_of(full)[1] > mp.peak_of(four)[1] + full["weights"] - four["weights"]
    assert four["weights"] < 0.4 * GB and four["merged"] == 0  # QLoRA keeps its LoRA layers
    on_gpu = mp.replace(work, gpu=True)
    assert mp.predict(shape, mp.replace(on_gpu, micro_batch=4))["update"] == pytest.approx(8.868 * GB, rel=0.01)
    assert mp.predict(shape, mp.replace(work, micro_batch=4))["update"] == pytest.approx(4.88 * GB, rel=0.01)
    assert work.micro_batch == 2
    assert mp.peak_of(mp.predict(shape, on_gpu)) == ("update", pytest.approx(4.65 * GB, rel=0.01))
    assert mp.predict(shape, mp.replace(on_gpu, dtype="float32")) == full  # the factor is the quantized head's only


# --------------------------------------------------------------------------- the refusal, auto, unknown models


def tiny_sets(model: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"model.name={model}", "sampling.prompts_per_step=2", "sampling.group_size=4",
            "sampling.max_new_tokens=64", "lora.num_layers=1", "logging.eval_every=0", "schedule.steps=1",
            f"logging.out_dir={out}", *extra]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


def limit_between(model: Path, sets: list[str]) -> tuple[float, int, int]:
    """A memory limit between the plan's peak at micro-batch 3 and at the recipe's 4, the
    micro-batch that fits under it (3) and the peak at 4."""
    recipe = cfg.load_recipe(ROOT / "recipes" / "smoke.yaml", [s for s in sets if s != "--set"])
    problems, _ = preflight.load_data(recipe)
    config, folder, _ = ms.model_config(str(model))
    shape = ms.shape_of(config)
    prompt, teacher = mp.longest_prompts(recipe, problems, ms.load_tokenizer(folder))
    work = mp.workload(recipe, prompt, teacher)
    peaks = {m: mp.peak_of(mp.predict(shape, mp.adjusted(work, "optimizer.micro_batch_size", m)))[1] for m in (3, 4)}
    assert peaks[3] < peaks[4]
    return (peaks[3] + peaks[4]) / 2 / GB, 3, peaks[4]


def test_a_plan_over_the_limit_is_refused_before_loading_with_the_field_and_the_value_that_fits(
    tmp_path, tiny_model_dir
):
    # the model folder without its weights: loading it would fail with another error
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bare / f.name)
    sets = tiny_sets(bare, tmp_path / "run")
    limit, fits, _ = limit_between(bare, sets)
    refused = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                      *sets, "--set", f"system.memory_limit_gb={limit!r}")  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    line = refused.stderr
    assert line.startswith("error: optimizer.micro_batch_size: the memory plan's "), line
    assert (
        f"above system.memory_limit_gb = {limit:g} GB" in line
        and f"optimizer.micro_batch_size={fits} (or auto)" in line
    )
    assert "Traceback" not in refused.stderr and not (tmp_path / "run").exists()
    # the value it names fits: the same limit with it trains
    ran = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                  *tiny_sets(tiny_model_dir, tmp_path / "ok", f"optimizer.micro_batch_size={fits}"),
                  "--set", f"system.memory_limit_gb={limit!r}")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert re.search(
        r"memory plan: load [\d.e-]+ GB, rollout [\d.e-]+ GB, teacher [\d.e-]+ GB, update [\d.e-]+ GB \(peak",
        ran.stdout,
    )


def test_micro_batch_auto_picks_the_largest_that_fits_and_the_run_uses_it(tmp_path, tiny_model_dir):
    sets = tiny_sets(tiny_model_dir, tmp_path / "auto", "optimizer.micro_batch_size=auto", "checkpoint.every=1")
    limit, fits, _ = limit_between(tiny_model_dir, sets)
    ran = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                  *sets, "--set", f"system.memory_limit_gb={limit!r}")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert f"micro_batch_size auto: {fits}" in ran.stdout
    stored = cfg.load_recipe(tmp_path / "auto" / "checkpoints" / "step_000001" / "recipe.yaml")
    assert stored.optimizer.micro_batch_size == fits  # the run's recipe holds the value it used
    # no limit: everything fits this machine, so auto takes every row of the step (2 x 4)
    free = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                   *tiny_sets(tiny_model_dir, tmp_path / "free", "optimizer.micro_batch_size=auto"))  # fmt: skip
    assert free.returncode == 0 and "micro_batch_size auto: 8" in free.stdout, free.stderr


@pytest.mark.parametrize(
    "value, error",
    [
        ("auto", None),
        ("3", None),
        ("big", "optimizer.micro_batch_size: expected int or one of 'auto', got 'big'"),
        ("AUTO", "optimizer.micro_batch_size: expected int or one of 'auto', got 'AUTO'"),
        ("0", "optimizer.micro_batch_size: must be >= 1, got 0"),
        ("2.5", "optimizer.micro_batch_size: expected int or one of 'auto', got 2.5"),
    ],
)
def test_micro_batch_size_takes_an_integer_or_auto(value, error):
    if error is None:
        assert str(cfg.load_recipe(None, [f"optimizer.micro_batch_size={value}"]).optimizer.micro_batch_size) == value
    else:
        with pytest.raises(cfg.ConfigError) as caught:
            cfg.load_recipe(None, [f"optimizer.micro_batch_size={value}"])
        assert str(caught.value) == error


def test_a_model_the_plan_does_not_know_runs_with_a_note(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))  # mlx-lm: a llama
    plan, note = mp.plan_run(cfg.load_recipe(None, [f"model.name={other}"]), [])
    assert plan is None and note == "none (model type 'mistral' is not one it knows (llama, qwen2, qwen3))"
    ran = run_cli("-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--no-dashboard",
                  *tiny_sets(other, tmp_path / "run", "optimizer.micro_batch_size=auto"))  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "memory plan: none (model type 'mistral'" in ran.stdout
    assert "optimizer.micro_batch_size auto: 8, the field's default" in ran.stdout


def test_the_budget_is_the_limit_or_what_the_machine_has():
    limited = cfg.load_recipe(None, ["system.memory_limit_gb=12"])
    assert preflight.memory_budget(limited) == (12 * GB, "system.memory_limit_gb = 12 GB")
    budget, label = preflight.memory_budget(cfg.load_recipe(None))
    assert budget == preflight.machine_memory() > GB and label.startswith("this machine's ")


@pytest.mark.parametrize("cpu_paths", [False, True])
def test_measure_sets_the_scoring_paths_and_gives_them_back(cpu_paths):
    import fit_memory_plan as fit

    from cast_mlx.engine import head, hostmath, packed

    before = hostmath.enabled, packed.enabled, head.KEEP_EXP
    with fit.scoring_paths(cpu_paths):
        assert (hostmath.enabled, packed.enabled, head.KEEP_EXP) == (cpu_paths, cpu_paths, None if cpu_paths else False)
    assert (hostmath.enabled, packed.enabled, head.KEEP_EXP) == before
    with pytest.raises(RuntimeError), fit.scoring_paths(cpu_paths):
        raise RuntimeError("a failed measurement")
    assert (hostmath.enabled, packed.enabled, head.KEEP_EXP) == before

"""The training loop end to end on the embedded model with the smoke recipe."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from cast_mlx import config as cfg
from cast_mlx.algorithm.teacher import teacher_gaps
from cast_mlx.engine import models, rollout
from cast_mlx.engine.logprobs import score_in_buckets
from cast_mlx.errors import EXIT_DRIFT
from cast_mlx.training import checkpoint, trainer
from cast_mlx.training.trajectory import judge, score_teacher
from cast_mlx.training.update import update

from helpers import ROOT, run_cli, smoke_args, tiny_checkpoint

VOLATILE = ("time/", "tokens_per_s/", "memory/", "compile_count")


def teacher_gaps_of(run, traj):
    """The teacher stage on a sampled trajectory, over the rollout's own mask."""
    traj.mask = traj.rollout.mask
    score_teacher(traj, run.model, run.tokenizer, run.recipe, run.teacher, run.ref_params)
    return traj.gaps


def update_of(run, contexts, tokens, mask, adv, truncated, frozen=None):
    return update(
        run.model,
        run.optimizer,
        run.loss_fn,
        run.recipe,
        run.world,
        contexts=contexts,
        tokens=tokens,
        mask=mask,
        adv=adv,
        truncated=truncated,
        frozen=frozen,
    )


def _train(tmp_path: Path, name: str, *extra: str, timeout=900):
    out = tmp_path / name
    proc = run_cli(*smoke_args(out, *extra), timeout=timeout)
    return out, proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(VOLATILE)}


def test_smoke_run_writes_metrics_and_mlx_lm_adapters(tmp_path, smol_dir):
    out, proc = _train(tmp_path, "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "entropy",
        "learning_rate",
        "grad_norm",
        "cast/groups/mixed",
        "cast/gap/correct_neg/share",
        "cast/eos/neg_gap_share",
        "cast/eos/adv_mean/all_wrong",
        "cast/content/neg_gap_share",
        "time/sample",
        "time/update",
        "memory/peak_gb",
    ):
        assert key in lines[0], key
    assert all(0.0 <= m["reward"] <= 1.0 and math.isfinite(m["loss"]) for m in lines)
    assert all(
        0.0 <= m["cast/eos/neg_gap_share"] <= 1.0 and 0.0 <= m["cast/content/neg_gap_share"] <= 1.0 for m in lines
    )
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "completion" in json.loads(samples[0])
    assert not any(k.startswith("comm/") for k in lines[0])  # one process: no collectives
    ckpt = checkpoint.find_checkpoint(out)
    assert ckpt.name == "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 1
    for f in (
        "adapters.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "teacher.safetensors",
        "state.json",
        "recipe.yaml",
    ):
        assert (ckpt / f).is_file(), f
    assert "step 2/2" in proc.stdout and "done: 2 steps" in proc.stdout
    assert "\x1b" not in proc.stdout  # not a TTY: plain lines, no control codes

    # mlx-lm loads the adapters as they are, and fuses them
    import mlx_lm

    model, tok = mlx_lm.load(str(smol_dir), adapter_path=str(ckpt))
    assert isinstance(mlx_lm.generate(model, tok, "1 + 1 =", max_tokens=3), str)
    fused = tmp_path / "fused"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(smol_dir),
            "--adapter-path",
            str(ckpt),
            "--save-path",
            str(fused),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (fused / "config.json").is_file()


def test_resume_is_bit_identical(tmp_path, smol_dir):
    straight, proc = _train(tmp_path, "straight", "--set", "schedule.steps=4", "--set", "checkpoint.every=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    part, proc = _train(
        tmp_path, "part", "--set", "schedule.steps=4", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=5"
    )
    assert proc.returncode == 0
    # cut the second run back to its step-2 checkpoint, then resume it
    root = part / checkpoint.CHECKPOINTS
    for name in ("step_000003", "step_000004"):
        if (root / name).exists():
            import shutil

            shutil.rmtree(root / name)
    (root / checkpoint.LATEST).write_text("step_000002\n")
    proc = run_cli("-m", "cast_mlx.train", "--resume", str(part), "--quiet", "--no-dashboard", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    a = mx.load(str(checkpoint.find_checkpoint(straight) / "adapters.safetensors"))
    b = mx.load(str(checkpoint.find_checkpoint(part) / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    ma, mb = _metrics(straight), _metrics(part)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [_stable(m) for m in ma] == [_stable(m) for m in mb]


def test_sigterm_checkpoints_and_exits_143(tmp_path, smol_dir):
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        *smoke_args(out),
        "--set",
        "schedule.steps=50",
        "--set",
        "checkpoint.every=100",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM: stopped after step" in stdout and "--resume" in stdout
    ckpt = checkpoint.find_checkpoint(out)
    steps = [m["step"] for m in _metrics(out)]
    assert ckpt.name == f"step_{steps[-1]:06d}"
    assert not list((out / checkpoint.CHECKPOINTS).glob(".tmp-*"))
    # ... and the run resumes from it (one more step)
    proc = run_cli(
        "-m",
        "cast_mlx.train",
        "--resume",
        str(out),
        "--quiet",
        "--no-dashboard",
        "--set",
        f"schedule.steps={steps[-1] + 1}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in _metrics(out)] == steps + [steps[-1] + 1]


def test_grpo_smoke_run(tmp_path, smol_dir):
    out, proc = _train(tmp_path, "grpo", "--set", "algorithm.name=grpo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    ckpt = checkpoint.find_checkpoint(out)
    assert not (ckpt / "teacher.safetensors").exists()  # GRPO has no teacher
    import mlx_lm

    mlx_lm.load(str(smol_dir), adapter_path=str(ckpt))


def test_half_written_checkpoint_is_ignored(tmp_path):
    """kill -9 between files leaves a .tmp folder or a step folder without all its files:
    the previous complete checkpoint is the one found."""
    run = tmp_path / "run"
    root = run / checkpoint.CHECKPOINTS
    good = tiny_checkpoint(run, 2, "r")
    (root / ".tmp-step_000003-99").mkdir()
    (root / ".tmp-step_000003-99" / "adapters.safetensors").write_text("x")
    assert checkpoint.find_checkpoint(run) == good
    partial = root / "step_000004"  # e.g. copied by hand and cut short
    partial.mkdir()
    (partial / "adapters.safetensors").write_text("x")
    (root / checkpoint.LATEST).write_text("step_000004\n")
    assert checkpoint.find_checkpoint(run) == good
    (root / checkpoint.LATEST).unlink()
    assert checkpoint.find_checkpoint(run) == good
    with pytest.raises(checkpoint.TrainingError, match="no complete checkpoint"):
        checkpoint.find_checkpoint(tmp_path / "elsewhere")


@pytest.fixture()
def smoke_run(tmp_path, smol_dir):
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'r'}"])
    with trainer.setup(recipe) as run:
        yield run


def test_nan_steps_skip_updates_then_stop(smoke_run):
    run = smoke_run
    before = models.lora_state(run.model)
    real = run.loss_fn

    def nan_loss(*args, **kwargs):
        value, metrics = real(*args, **kwargs)
        return value * float("nan"), metrics

    run.loss_fn = nan_loss
    run.recipe.algorithm.name = "cast"  # cast: zero-variance groups still carry loss
    with pytest.raises(checkpoint.TrainingError, match="consecutive steps with non-finite"):
        for _ in range(run.recipe.system.max_bad_steps):
            trainer.train_step(run)
    after = models.lora_state(run.model)
    for k in before:
        np.testing.assert_array_equal(np.array(before[k]), np.array(after[k]))
    with pytest.raises(ValueError, match="NaN"):
        bad = {k: v * float("nan") for k, v in after.items()}
        from mlx.utils import tree_unflatten

        run.model.update(tree_unflatten(list(bad.items())))
        models.save_adapters(run.model, run.out_dir / "x", run.adapter_config)


def test_accumulation_matches_one_big_batch(tmp_path, smol_dir):
    """Micro-batches of 1 and of all rows give the same update (normalised over the batch),
    and so do scoring every row with its own full forward (`system.share_prefix: false`) and
    running the update from the rollout's frozen-block states (`system.reuse_frozen`, last
    case without), teacher gaps included."""
    results, all_gaps = [], []
    for micro, share, reuse in ((1, True, True), (8, False, True), (8, True, True), (8, True, False)):
        recipe = cfg.load_recipe(
            ROOT / "recipes/smoke.yaml",
            [
                f"logging.out_dir={tmp_path / f'{micro}-{share}-{reuse}'}",
                f"optimizer.micro_batch_size={micro}",
                f"system.share_prefix={str(share).lower()}",
                f"system.reuse_frozen={str(reuse).lower()}",
                "sampling.group_size=4",
            ],
        )
        with trainer.setup(recipe) as run:
            run.optimizer = optim.SGD(learning_rate=1.0)  # the update is the (clipped) gradient itself
            start = models.lora_state(run.model)
            problems = trainer.next_prompts(run)
            traj = trainer.sample(run, problems)
            prompts, out = traj.prompts, traj.rollout
            assert (out.frozen is not None) == reuse and (not reuse or out.frozen.split == 30 - recipe.lora.num_layers)
            rewards = mx.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
            gaps = teacher_gaps_of(run, traj)
            all_gaps.append(np.array(gaps))
            adv, _ = run.advantages(rewards, gaps, out.mask, step=0)
            truncated = mx.zeros((8,))
            contexts = [prompts[i // 4] for i in range(8)]
            result = update_of(run, contexts, out.tokens, out.mask, adv, truncated, frozen=out.frozen)
            loss, gnorm, applied = result.loss, result.grad_norm, result.applied
            assert applied
            now = models.lora_state(run.model)
            results.append((loss, gnorm, {k: np.array(now[k]) - np.array(start[k]) for k in now}))
    *others, (l8, g8, d8) = results
    scale = max(np.abs(d).max() for d in d8.values())
    assert all(np.abs(d8[k]).max() > 0 for k in d8 if k.endswith("lora_b"))  # lora_a: 0 at step 0
    assert np.abs(all_gaps[-1]).max() > 0.01  # a real teacher gap (plain context)
    for (l1, g1, d1), gaps in zip(others, all_gaps):
        np.testing.assert_allclose(gaps, all_gaps[-1], atol=1e-4)
        assert abs(l1 - l8) <= 1e-5 * max(1.0, abs(l8))
        assert abs(g1 - g8) <= 1e-4 * g8
        for k in d1:
            np.testing.assert_allclose(d1[k], d8[k], atol=1e-4 * scale, err_msg=k)


def test_grpo_skips_zero_variance_groups(smoke_run):
    run = smoke_run
    problems = trainer.next_prompts(run)
    traj = trainer.sample(run, problems)
    prompts, out = traj.prompts, traj.rollout
    n = out.tokens.shape[0]
    from cast_mlx.algorithm.compiled import CompiledAdvantages

    grpo = CompiledAdvantages("grpo", group_size=run.recipe.sampling.group_size, scale_rewards="group")
    adv, _ = grpo(mx.ones((n,)), mx.zeros(out.mask.shape), out.mask)
    before = models.lora_state(run.model)
    result = update_of(run, [prompts[i // 2] for i in range(n)], out.tokens, out.mask, adv, mx.zeros((n,)))
    assert not result.applied and result.aux["rows_skipped"] == n
    after = models.lora_state(run.model)
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)


def test_gap_is_exactly_zero_for_an_identical_teacher(tmp_path, smol_dir):
    """Teacher = policy weights (step 0) and context `same`: g = 0 exactly, with nothing
    scored, so nothing flips by numerical noise; the teacher's scoring path and the
    sampler's log-probs agree to ~1e-4 (far above a weight-lag gap right after a refresh)."""
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'z'}", "teacher.context=same"])
    with trainer.setup(recipe) as run:
        problems = trainer.next_prompts(run)
        traj = trainer.sample(run, problems)
        out = traj.rollout
        assert run.teacher.is_policy(run.model)
        gaps, lp_t = teacher_gaps(
            run.model,
            run.teacher,
            traj.contexts,
            traj.contexts,
            out,
            out.mask,
            same_context=True,
            temperature=run.recipe.sampling.temperature,
            micro_batch=8,
            share_prefix=True,
        )
        assert gaps is not None and float(mx.abs(gaps).max()) == 0.0 and lp_t is None
        score = lambda b: run.teacher.score(run.model, b, recipe.sampling.temperature)  # noqa: E731
        lp_t = score_in_buckets(score, traj.contexts, out.tokens, out.mask, 8, True, out.frozen)
        assert float(mx.abs(lp_t * out.mask).sum()) > 0  # real log-probs, not zeros
        assert float(mx.abs((lp_t - out.logprobs) * out.mask).max()) < 5e-4


def test_same_teacher_gaps_wait_for_the_update(tmp_path, smol_dir):
    """`teacher.context: same` with one update per batch: lp_old is the update's own forward
    (spec step 3), so the teacher stage scores the teacher alone. The gaps, advantages and
    update equal those of scoring lp_old in a pass of its own; the rows the update skips
    (truncated) are scored with the weights before the step."""
    sets = [f"logging.out_dir={tmp_path / 's'}", "teacher.context=same", "sampling.group_size=4"]
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", sets)
    with trainer.setup(recipe) as run:
        mx.random.seed(1)  # a policy away from its teacher (the initial adapter)
        moved = {k: 0.05 * mx.random.normal(v.shape) for k, v in models.lora_state(run.model).items()}
        run.model.update(tree_unflatten(list(moved.items())))
        assert not run.teacher.is_policy(run.model)
        traj = trainer.sample(run, trainer.next_prompts(run))
        judge(traj, run.tokenizer, run.recipe, run.verifier, run.reward_fns, run.special_ids)
        r, out = run.recipe, traj.rollout
        common = dict(temperature=r.sampling.temperature, micro_batch=4, share_prefix=True)
        gaps, _ = teacher_gaps(
            run.model, run.teacher, traj.contexts, traj.contexts, out, traj.mask, same_context=True, **common
        )
        adv, _ = run.advantages(traj.rewards, gaps, traj.mask, step=0, special=traj.special)
        run.optimizer = optim.SGD(learning_rate=1.0)
        start = models.lora_state(run.model)
        update_of(run, traj.contexts, out.tokens, traj.mask, adv, traj.truncated, frozen=out.frozen)
        two_pass = models.lora_state(run.model)
        run.model.update(tree_unflatten(list(start.items())))

        skipped = int(traj.truncated.sum())
        assert 0 < skipped < traj.n_rows  # both kinds of row: scored in the update, and not
        metrics, _ = trainer.learn(run, traj)
        assert metrics["update_applied"]
        assert float(mx.abs(gaps).max()) > 1e-3  # a real weight-lag gap
        np.testing.assert_allclose(np.array(traj.gaps), np.array(gaps), atol=2e-5)
        np.testing.assert_allclose(np.array(traj.adv), np.array(adv), atol=2e-5)
        now = models.lora_state(run.model)
        for k in now:
            moved_a, moved_b = np.array(two_pass[k]) - np.array(start[k]), np.array(now[k]) - np.array(start[k])
            np.testing.assert_allclose(moved_b, moved_a, atol=1e-4 * max(np.abs(moved_a).max(), 1e-8), err_msg=k)


def test_kl_to_the_base_model_is_zero_then_positive(tmp_path, smol_dir):
    """loss.beta > 0: the reference is the base model (LoRA off), so the first step's KL is 0
    (lora_b starts at 0) and after one update it is positive and finite."""
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", [f"logging.out_dir={tmp_path / 'r'}", "loss.beta=0.1"])
    with trainer.setup(recipe) as run:
        first, _ = trainer.train_step(run)
        second, _ = trainer.train_step(run)
    assert run.verifier._pool is not None and not any(run.verifier._pool._workers)  # the with closed it
    assert first["update_applied"] and second["update_applied"]
    assert abs(first["kl"]) < 1e-6
    assert 0 < second["kl"] < 1.0


def test_special_and_eos_masks():
    tokens = mx.array([[5, 2, 0], [7, 8, 9], [3, 1, 2]])
    lengths = mx.array([2, 3, 3])
    truncated = mx.array([0.0, 1.0, 0.0])
    mask = mx.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=mx.float32)
    special, eos = rollout.special_and_eos(tokens, lengths, truncated, mask, [1, 2])
    assert special.tolist() == [[0, 1, 0], [0, 0, 0], [0, 1, 1]]  # the padding 0 is not special
    assert eos.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 1]]  # the truncated row has no EOS


def test_special_tokens_follow_the_verifier_in_a_step(tmp_path, smol_dir):
    """The recipe switch reaches the compiled advantages: every final EOS gets its row's GRPO
    advantage (B in a mixed group, 0 in a zero-variance one); a full step logs the EOS metrics."""
    sets = [
        f"logging.out_dir={tmp_path / 'v'}",
        "algorithm.special_tokens=verifier",
        "algorithm.gap_centering=true",
        "sampling.group_size=4",
        "sampling.max_new_tokens=16",
    ]
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", sets)
    with trainer.setup(recipe) as run:
        problems = trainer.next_prompts(run)
        traj = trainer.sample(run, problems)
        out = traj.rollout
        truncated = mx.array([1.0 if f == "length" else 0.0 for f in out.finish_reasons])
        special, eos = rollout.special_and_eos(out.tokens, out.lengths, truncated, out.mask, run.special_ids)
        gaps = teacher_gaps_of(run, traj)
        rewards = mx.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # a mixed and an all-wrong group
        adv, base = run.advantages(rewards, gaps, out.mask, step=0, special=special)
        expected = np.where(np.arange(8) < 4, np.array(base), 0.0)[:, None]
        on = np.array(special) > 0
        assert on.any()  # the rollout has special tokens (at least its EOS)
        np.testing.assert_allclose(np.array(adv)[on], np.broadcast_to(expected, on.shape)[on], atol=1e-7)
        metrics, _ = trainer.train_step(run)
    for key in ("eos/neg_gap_share", "content/neg_gap_share", "eos/adv_mean/mixed_correct", "eos/adv_mean/all_wrong"):
        assert 0.0 <= abs(metrics[f"cast/{key}"]) <= 1.2, key


def test_stop_on_drift_checkpoints_and_exits_4(tmp_path, smol_dir, capsys):
    """A history of short, rewarded steps, then a step whose 4-token completions are mostly cut
    off: the guard fires on that step, says so, writes its checkpoint and stops."""
    sets = [
        f"logging.out_dir={tmp_path / 'd'}",
        "system.stop_on_drift=true",
        "system.drift_window=1",
        "sampling.max_new_tokens=4",
        "schedule.steps=5",
        "checkpoint.every=10",
    ]
    recipe = cfg.load_recipe(ROOT / "recipes/smoke.yaml", sets)
    with trainer.setup(recipe) as run:
        run.state.history = [[0.0, 1.0]]  # as if a step before had answered everything in time
        code = trainer.fit(run, live=False)
    assert code == EXIT_DRIFT == 4
    lines = _metrics(tmp_path / "d")
    assert [m["step"] for m in lines] == [1] and lines[0]["health/drift"] == 1
    assert lines[0]["completions/clipped_ratio"] >= 0.2  # risen by drift_rise from 0
    assert checkpoint.find_checkpoint(tmp_path / "d").name == "step_000001"
    out = capsys.readouterr().out
    assert "warning: length drift at step 1" in out and "stopped after step 1: system.stop_on_drift is on" in out

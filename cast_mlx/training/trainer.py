"""The training loop: sample -> rewards -> teacher -> advantages -> update -> metrics.

A `Run` holds what a run owns (model, optimizer, teacher, data, compiled functions) and a
`TrainState` the counters a checkpoint restores. One step (`train_step`) samples a
`Trajectory` and passes it through the stages, each in its own module:

1. sampling: P prompts x G completions from the current policy (`engine.rollout`).
2. rewards: decode and judge every row (`tasks.rewards.judge_rows`).
3. teacher: the teacher's log-prob gap and the KL reference (`algorithm.teacher`).
4. advantages: the recipe's registered estimator, compiled (`algorithm.compiled`); within
   the update for a `same`-context teacher, whose gaps need its log-probs (`trajectory`).
5. update: micro-batched gradients, clip, AdamW, the NaN guard (`training.update`).
6. the metrics line (`training.metrics`); `fit` writes checkpoints (`training.checkpoint`).

Randomness is derived from `(seed, step)` and the data order from `(seed, epoch)`, so a
run resumed from a checkpoint continues bit-identically on the same machine.

Data parallelism (`mlx.launch -n N`): each process samples, judges, scores and computes
advantages for its slice of the step's prompts; the loss normaliser, gradients and metrics
are reduced over processes (`engine.distributed`); rank 0 alone prints and writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from cast_mlx import config as cfg
from cast_mlx.algorithm.compiled import CompiledAdvantages, CompiledPolicyLoss, compile_count
from cast_mlx.algorithm.estimators import get_estimator
from cast_mlx.algorithm.teacher import Teacher
from cast_mlx.engine import blas, models, rollout
from cast_mlx.engine import distributed as dist
from cast_mlx.engine.logprobs import frozen_blocks
from cast_mlx.errors import EXIT_DRIFT, EXIT_SIGNAL, TrainingError, disk_full
from cast_mlx.tasks import data, rewards, verify
from cast_mlx.training import callbacks as cb
from cast_mlx.training import checkpoint as ckpt_io
from cast_mlx.training import memory_plan, preflight, sampling
from cast_mlx.training.checkpoint import TrainState
from cast_mlx.training.dashboard import make_view
from cast_mlx.training.evaluation import base_model_eval, evaluate_held_out
from cast_mlx.training.metrics import length_drift, memory_usage, step_metrics
from cast_mlx.training.signals import SIGNAL_OF_CODE, StopRequest
from cast_mlx.training.summary import (
    REPORT_LATER,
    best_saved_eval,
    disk_full_line,
    drift_message,
    stale_note,
    summary_lines,
    write_run_report,
)
from cast_mlx.training.trajectory import Trajectory, advantages_in_update, gaps_after_update, judge, score_teacher
from cast_mlx.training.update import build_optimizer, count_step, guarded_update, lr_schedule


@dataclass
class Run:
    recipe: cfg.Recipe
    model: nn.Module
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    adapter_config: dict
    optimizer: optim.Optimizer
    teacher: Teacher | None
    ref_params: dict | None  # adapters disabled (k3 KL reference), only when beta > 0
    problems: list
    held_out: list  # the fixed eval problems (empty when logging.eval_every is 0)
    advantages: CompiledAdvantages
    loss_fn: CompiledPolicyLoss
    verifier: verify.Verifier
    out_dir: Path
    special_ids: list[int]  # EOS and the other special/template token ids
    # the blocks below the first LoRA block, whose output the rollout keeps for the update
    # (0: none, or system.reuse_frozen false); LoRA's blocks do not change during a run
    frozen_split: int = 0
    reward_fns: list = field(default_factory=list)  # reward.functions; empty: the math verifier alone
    memory: str = ""  # the memory plan's header line (memory_plan.describe)
    # progress inside a step, for the dashboard (fit points it at the callbacks)
    phase: Callable[..., None] = field(default=lambda *args: None)
    state: TrainState = field(default_factory=TrainState)
    world: dist.World = field(default_factory=dist.World)

    # `with setup(recipe) as run:` stops the verifier's worker processes at the end.
    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.verifier.close()


# --------------------------------------------------------------------------- set-up


def setup(recipe: cfg.Recipe, out_dir: Path | None = None, world: dist.World | None = None) -> Run:
    """Load the model, attach LoRA, build the optimizer, teacher, data and compiled fns.
    `world`: this process's place in a data-parallel run (default: a single process)."""
    world = world or dist.World()
    dist.check_recipe(recipe, world.size)
    if recipe.system.memory_limit_gb:
        mx.set_memory_limit(int(recipe.system.memory_limit_gb * 2**30))
    if recipe.system.cache_limit_gb is not None:
        mx.set_cache_limit(int(recipe.system.cache_limit_gb * 2**30))
    problems, held_out = preflight.load_data(recipe)  # before the model: a data error costs no load time
    plan, note = memory_plan.plan_run(recipe, problems, world.size)  # a step that cannot fit stops here
    recipe = memory_plan.with_micro_batch(recipe, plan)  # `auto`: the plan's pick
    warm = preflight.check_warm_start(recipe)
    reward_fns = rewards.parse_functions(recipe.reward, answer_format=recipe.data.answer_format)
    model, tokenizer = models.load(recipe.model.name, dtype=recipe.model.dtype)
    preflight.check_context(recipe, model, tokenizer, problems + held_out)
    lo = recipe.lora
    adapter_config = models.attach_lora(
        model,
        rank=lo.rank,
        alpha=lo.alpha,
        dropout=lo.dropout,
        num_layers=lo.num_layers,
        keys=lo.keys,
        seed=recipe.seed,
    )
    if warm is not None:  # before the teacher is created: its first snapshot is this adapter
        preflight.load_warm_start(model, warm)
    model.train(lo.dropout > 0)
    a = recipe.algorithm
    teacher = None
    if get_estimator(a.name).uses_teacher:
        teacher = Teacher.create(
            model, kind=recipe.teacher.kind, refresh=recipe.teacher.refresh, ema_decay=recipe.teacher.ema_decay
        )
    ref_params = None
    if recipe.loss.beta > 0:
        ref_params = Teacher.create(model, kind="base").params
    params = {k: v for k, v in asdict(a).items() if k != "name"}
    advantages = CompiledAdvantages(a.name, group_size=recipe.sampling.group_size, **params)
    loss_fn = CompiledPolicyLoss.of(recipe.loss)
    return Run(
        recipe=recipe,
        model=model,
        tokenizer=tokenizer,
        adapter_config=adapter_config,
        optimizer=build_optimizer(recipe),
        teacher=teacher,
        ref_params=ref_params,
        problems=problems,
        held_out=held_out,
        advantages=advantages,
        loss_fn=loss_fn,
        verifier=verify.Verifier(workers=1, timeout=2.0).start(),
        out_dir=Path(out_dir) if out_dir else cfg.out_dir(recipe),
        special_ids=rollout.special_token_ids(tokenizer),
        frozen_split=frozen_blocks(model) if recipe.system.reuse_frozen else 0,
        reward_fns=reward_fns,
        memory=memory_plan.describe(plan, note),
        state=TrainState(recipe_hash=cfg.recipe_hash(recipe), world_size=world.size, run_id=ckpt_io.new_run_id()),
        world=world,
    )


# --------------------------------------------------------------------------- sampling


def next_prompts(run: Run) -> list:
    """The step's batch of problems (P of them, the global batch), advancing the data
    cursor; every rank of a data-parallel run advances it the same way."""
    return [run.problems[i] for i in sampling.next_indices(len(run.problems), run.state, run.recipe)]


def sample(run: Run, problems: list, round: int = 0) -> Trajectory:
    """`G` completions of each of `problems`: this rank's equal share of the step's prompts,
    sampled as the same streams of the step's global rollout (so a completion's tokens do
    not depend on the number of processes)."""
    r, world = run.recipe, run.world
    prompts = [data.prompt_ids(run.tokenizer, p, r.data.system_prompt, r.data.answer_format) for p in problems]
    eos = set(run.tokenizer.eos_token_ids)
    streams = len(problems) * r.sampling.group_size
    run.phase("sampling", 0, r.sampling.max_new_tokens, f"0/{streams} streams done")
    out = rollout.generate_groups(
        run.model,
        prompts,
        r.sampling.group_size,
        r.sampling,
        eos,
        key=sampling.step_key(r.seed, run.state.step, round),
        stream_offset=world.rank * streams,
        total_streams=world.size * streams,
        progress=lambda t, cap, done, n: run.phase("sampling", t, cap, f"{done}/{n} streams done"),
        keep_states=run.frozen_split,
    )
    return Trajectory(problems, prompts, out, r.sampling.group_size)


# --------------------------------------------------------------------------- one step


def train_step(run: Run) -> tuple[dict, list[dict]]:
    """One full step. Returns the metrics line and a few sample records.

    In a data-parallel run every rank returns the same global metrics; the sample records
    are this rank's own first rows (rank 0's are the global batch's first rows)."""
    comm_start = run.world.comm_counters()
    t0 = time.perf_counter()
    traj, stats = draw_batch(run)
    mx.eval(traj.rollout.tokens, traj.rollout.logprobs)
    metrics, samples = learn(run, traj, sample_seconds=time.perf_counter() - t0, comm_start=comm_start)
    return metrics | stats, samples


def draw_batch(run: Run) -> tuple[Trajectory, dict]:
    """The step's trajectory (this rank's share of the prompts), and with
    `sampling.dynamic` its rounds (judged already) and their metrics."""
    r = run.recipe
    if not r.sampling.dynamic:
        return sample(run, dist.shard(next_prompts(run), run.world.rank, run.world.size)), {}

    def draw(round: int) -> Trajectory:  # one process (dist.check_recipe)
        traj = sample(run, next_prompts(run), round)
        judge(traj, run.tokenizer, r, run.verifier, run.reward_fns, run.special_ids)
        return traj

    return sampling.dynamic_batch(draw, r.sampling.prompts_per_step, r.sampling.max_rounds, run.special_ids)


def learn(run: Run, traj: Trajectory, sample_seconds: float = 0.0, comm_start=None) -> tuple[dict, list[dict]]:
    """Every stage of a step after sampling (`scripts/bench_step.py` runs it on a fixed batch)."""
    r, st = run.recipe, run.state
    comm_start = comm_start or run.world.comm_counters()
    times = {"sample": sample_seconds}

    # -- rewards
    t = time.perf_counter()
    run.phase("verifying", 0, 1)
    if traj.judged is None:  # dynamic sampling judged its rounds already
        judge(traj, run.tokenizer, r, run.verifier, run.reward_fns, run.special_ids)
    times["verify"] = time.perf_counter() - t

    # -- teacher gaps and the KL reference
    t = time.perf_counter()
    if run.teacher is not None or run.ref_params is not None:
        run.phase("teacher", 0, 1)
    score_teacher(traj, run.model, run.tokenizer, r, run.teacher, run.ref_params)
    times["teacher"] = time.perf_counter() - t

    # -- advantages and the update (a `same` teacher's gaps wait for the update's lp_old)
    t = time.perf_counter()
    deferred = traj.gaps is None
    gaps = mx.zeros(traj.rollout.mask.shape) if deferred else traj.gaps
    traj.adv, traj.base = run.advantages(traj.rewards, gaps, traj.mask, step=st.step, special=traj.special)
    before = models.lora_state(run.model)  # arrays are replaced, not written: no copy
    result = guarded_update(
        run.model,
        run.optimizer,
        run.loss_fn,
        r,
        run.world,
        inputs={"rewards": traj.rewards, "teacher gaps": traj.teacher_lp if deferred else gaps, "advantages": traj.adv},
        contexts=traj.contexts,
        tokens=traj.rollout.tokens,
        mask=traj.mask,
        adv=traj.adv,
        truncated=traj.truncated,
        ref_lp=traj.ref_lp,
        frozen=traj.rollout.frozen,
        phase=run.phase,
        advantages_of=advantages_in_update(traj, run.advantages, st.step) if deferred else None,
    )
    if deferred:
        gaps_after_update(traj, run.model, r, result.behaviour, before)
        traj.adv, traj.base = run.advantages(traj.rewards, traj.gaps, traj.mask, step=st.step, special=traj.special)
    mx.clear_cache()
    times["update"] = time.perf_counter() - t

    # -- counters and the teacher's refresh
    updates = st.step * r.loss.num_iterations
    lr = float((run.optimizer.learning_rate if result.applied else lr_schedule(r)(mx.array(updates))).item())
    all_skipped = result.aux["rows_skipped"] == traj.n_rows * run.world.size
    if count_step(st, result, all_skipped, r.system.max_bad_steps) and run.teacher is not None:
        run.teacher.after_step(run.model, st.step)

    # -- the metrics line
    metrics = step_line(run, traj, result, lr, times, comm_start)
    return metrics, traj.sample_records(st.step, r.logging.samples_per_step)


def step_line(run: Run, traj: Trajectory, result, lr: float, times: dict, comm_start) -> dict:
    """The step's metrics from every rank's rows; phase times and memory are the slowest rank's."""
    r, st, world = run.recipe, run.state, run.world
    rows = dist.gather_rows(world, traj.columns())
    usage = memory_usage()
    comm = world.comm_since(comm_start)  # this rank's collectives of the step, before the one below
    slowest = dist.max_values(world, times | usage)
    times, usage = {k: slowest[k] for k in times}, {k: slowest[k] for k in usage}
    metrics = step_metrics(
        rows,
        group_size=r.sampling.group_size,
        a_max=r.algorithm.a_max if get_estimator(r.algorithm.name).facts.clips_at_a_max else None,
        step=st.step,
        epoch=st.epoch,
        loss_value=result.loss,
        grad_norm=result.grad_norm,
        aux=result.aux,
        lr=lr,
        times=times,
        usage=usage,
        applied=result.applied,
        compile_count=compile_count(),
    )
    if world.size > 1:
        metrics |= comm
    judged = traj.judged.judged if traj.judged else {}
    metrics |= rewards.metrics_of({n: cast("list[float]", rows[f"reward_fn/{n}"].tolist()) for n in judged})
    st.history.append([metrics["completions/clipped_ratio"], metrics["reward"]])
    metrics["health/drift"] = int(length_drift(st.history, r.system.drift_window, r.system.drift_rise))
    return metrics


# --------------------------------------------------------------------------- checkpoints


def save(run: Run) -> Path:
    return ckpt_io.save_checkpoint(
        run.out_dir,
        run.state,
        model=run.model,
        adapter_config=run.adapter_config,
        optimizer=run.optimizer,
        teacher=run.teacher,
        recipe=run.recipe,
    )


def resume(run: Run, ckpt: Path) -> None:
    """Restore a freshly set-up run from checkpoint `ckpt`."""
    run.state = ckpt_io.load_checkpoint(
        ckpt, run.world.size, model=run.model, optimizer=run.optimizer, teacher=run.teacher
    )


# --------------------------------------------------------------------------- the loop


def run_info(run: Run) -> dict:
    r = run.recipe
    info: dict[str, str | int] = {
        "run": r.name,
        "model": f"{r.model.name} ({models.resolve_dtype(r.model.dtype)})",
        "algorithm": f"{r.algorithm.name} ({label})" if (label := cfg.run_label(r)) else r.algorithm.name,
        "backend": str(mx.default_device()),
        "blas": blas.active_blas(),
        "out": str(run.out_dir),
        "step": run.state.step,  # where this invocation starts (a resumed run: its checkpoint's)
        "memory plan": run.memory,
    }
    if run.world.size > 1:
        info["processes"] = run.world.size
    return info


def resume_command(run: Run) -> str:
    command = f"python -m cast_mlx.train --resume {run.out_dir}"
    if run.world.size > 1:
        command += f" (under mlx.launch, with the same {run.world.size} processes)"
    return command


def make_callbacks(run: Run, live: bool, resumed: bool) -> cb.CallbackList:
    """Rank 0's sinks and view (under mlx.launch stdout is a pipe; the launcher passes
    COLUMNS when it runs on a terminal); the other ranks of a data-parallel run get none."""
    if not run.world.is_main:
        return cb.CallbackList([])
    r = run.recipe
    force = run.world.size > 1 and "COLUMNS" in os.environ  # force_terminal
    view = make_view(r.schedule.steps, live and r.logging.dashboard, force, r.logging.eval_every, r.data.answer_format)
    return cb.CallbackList([*cb.sinks(r, run.out_dir, run.state.step if resumed else None), view])


def fit(run: Run, live: bool = True, resumed_from: Path | None = None) -> int:
    """Train to `schedule.steps`; returns the process exit code.

    Data parallel: every rank runs this loop in lockstep; only rank 0 prints, writes the
    metrics and the checkpoints. A stop signal seen by any rank stops all of them after the
    same step (the stop is agreed on between steps), and the ranks leave together once
    rank 0's last checkpoint is written."""
    r, world = run.recipe, run.world
    if world.is_main:  # the run has really started: the folder becomes this run's
        if resumed_from:
            ckpt_io.remove_later(run.out_dir, run.state.step)
        else:
            ckpt_io.clear_run(run.out_dir)
        if stale := ckpt_io.remove_stale_tmp(run.out_dir):
            print(stale_note(stale))
    callbacks = make_callbacks(run, live, resumed=resumed_from is not None)
    run.phase = callbacks.on_phase
    tell, log = callbacks.on_message, callbacks.on_metrics

    def agreed_stop() -> int:  # 0: go on; else the exit code of the signal some rank got
        return dist.max_int(world, stop.code if stop.signal_name else 0, "agreeing on a stop")

    written: list[Path] = []  # the checkpoints this invocation wrote (rank 0)

    def checkpoint() -> None:
        if world.is_main:
            run.phase("checkpoint", 0, 1)
            written.append(save(run))

    stop = StopRequest().install()
    drift_seen = False
    last_saved = run.state.step if resumed_from else -1
    every = r.logging.eval_every
    eval_args = (run.model, run.tokenizer, run.held_out, r, run.verifier, world, run.phase)
    started = time.perf_counter()
    best = best_saved_eval(run.out_dir) if resumed_from else -1.0  # the best checkpointed eval so far

    def finish(report_page: bool = True) -> None:  # rank 0: the summary and the report page, once a checkpoint exists
        if not callbacks or not (written or resumed_from):
            return
        report = write_run_report(run.out_dir) if report_page else None
        try:
            last = written[-1] if written else resumed_from
            lines = summary_lines(r, run.out_dir, run.state.step, time.perf_counter() - started, last, report)
        except (OSError, ValueError, KeyError, ZeroDivisionError) as exc:  # the checkpoints are safe already
            lines = [f"warning: no summary ({type(exc).__name__}: {exc})"]
        if not report_page:
            lines.append(f"  report: not written (the disk is full); {REPORT_LATER.format(run_dir=run.out_dir)}")
        for line in lines:
            tell(line)

    def out_of_space() -> None:  # rank 0: a write found the disk full; the checkpoints written are whole
        last = written[-1] if written else resumed_from
        tell(disk_full_line(run.state.step, last, resume_command(run)))
        if last is not None:
            finish(report_page=False)  # the page would take space the disk does not have

    try:
        info = run_info(run) if callbacks else {}
        callbacks.on_train_begin(info)
        dist.barrier(world, "start-up (every rank loads the model)")
        if resumed_from:
            tell(f"resumed from {resumed_from} at step {run.state.step}")
        elif every:  # the starting point of the eval curve
            log({"step": 0, **base_model_eval(*eval_args)}, [])
        code = agreed_stop()
        while run.state.step < r.schedule.steps and not code:
            metrics, samples = train_step(run)
            if every and (run.state.step % every == 0 or run.state.step == r.schedule.steps):
                metrics.update(evaluate_held_out(*eval_args))
            log(metrics, samples)
            st = run.state.step
            if st % r.checkpoint.every == 0 or st == r.schedule.steps:
                checkpoint()
                last_saved = st
                if world.is_main and metrics.get("eval/accuracy", -1.0) > best:
                    best = metrics["eval/accuracy"]
                    ckpt_io.mark_best(run.out_dir, written[-1])  # kept by pruning
            if metrics["health/drift"] and not drift_seen:  # the same decision on every rank
                drift_seen = True
                tell(drift_message(run.state.history, run.recipe.system.drift_window, run.state.step))
                if r.system.stop_on_drift:
                    code = EXIT_DRIFT
                    break
            code = agreed_stop()
        if last_saved != run.state.step:
            checkpoint()
        dist.barrier(world, "finishing (rank 0 writes the last checkpoint)")
        if code == EXIT_DRIFT:
            tell(f"stopped after step {run.state.step}: system.stop_on_drift is on; the checkpoint is written")
        elif code:
            tell(
                f"{SIGNAL_OF_CODE.get(code, 'stop')}: stopped after step {run.state.step}; "
                f"resume with {resume_command(run)}"
            )
        elif callbacks:  # rank 0: the checkpoints are in its folder
            tell(f"done: {run.state.step} steps; adapters in {written[-1] if written else resumed_from}")
        finish()
        return code
    except KeyboardInterrupt:
        if world.is_main:
            print(f"interrupted during step {run.state.step + 1}; the last checkpoint is intact: {resume_command(run)}")
            finish()
        return EXIT_SIGNAL["SIGINT"]
    except (OSError, RuntimeError) as exc:  # a TrainingError; a full disk wherever this run writes
        full = disk_full(exc, getattr(exc, "filename", None) or run.out_dir)
        if full is None:
            if isinstance(exc, TrainingError):
                finish()  # what the checkpoints hold, before the error line
            raise
        if world.is_main:
            out_of_space()
        if full is exc:
            raise
        raise full from exc
    finally:
        stop.restore()
        callbacks.on_train_end()

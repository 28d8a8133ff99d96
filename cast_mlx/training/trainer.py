"""The training loop: sample -> verify -> teacher -> advantages -> loss -> LoRA update.

The loop is a handful of functions over a `Run` (the objects a run holds) and a
`TrainState` (the counters a checkpoint must restore). One step, in spec order:

1. `sample`: P prompts x G completions from the current policy (rollout engine).
2. `score_rewards`: decode, verify, binary rewards.
3. `teacher_gaps`: teacher log-probs on the teacher context + the same tokens, minus the
   old policy's log-probs (skipped under GRPO).
4. advantages: the recipe's registered estimator (`cast_mlx.algorithm.advantages`), compiled.
5. `update`: micro-batched forward/backward with the loss normalised over the whole
   batch, gradient-norm clip, AdamW on the LoRA tensors; NaN/inf skips the update.
6. teacher refresh and the metrics line (`cast_mlx.training.metrics`); `fit` hands it to the
   callbacks (sinks and view, `cast_mlx.training.callbacks`) and writes checkpoints
   (`cast_mlx.training.checkpoint`).

Randomness is derived from `(seed, step)` and the data order from `(seed, epoch)`, so a
run resumed from a checkpoint continues bit-identically on the same machine.

Data parallelism (`mlx.launch -n N`): `Run.world` says which of the N processes this is.
Each one samples, verifies, scores and computes advantages for its slice of the step's
prompts; the loss normaliser, gradients and metrics are reduced over processes (see
`cast_mlx.engine.distributed`); rank 0 alone prints and writes metrics and checkpoints. With a
world of one, every collective is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from cast_mlx import __version__
from cast_mlx import config as cfg
from cast_mlx.algorithm.advantages import get_estimator
from cast_mlx.algorithm.compiled import CompiledAdvantages, CompiledPolicyLoss, compile_count
from cast_mlx.algorithm.loss import loss_norm, rows_with_loss
from cast_mlx.algorithm.teacher import Teacher, swapped_lora, teacher_contexts
from cast_mlx.engine import blas, models, rollout
from cast_mlx.engine import distributed as dist
from cast_mlx.engine.logprobs import frozen_blocks, length_buckets, score_in_buckets, token_logprobs, trimmed_batch
from cast_mlx.engine.rollout import decode_completions
from cast_mlx.tasks import data, rewards, verify
from cast_mlx.tasks.rewards import metrics_of as reward_metrics
from cast_mlx.training import callbacks as cb
from cast_mlx.training import checkpoint as ckpt_io
from cast_mlx.training.checkpoint import TrainingError, TrainState
from cast_mlx.training.dashboard import make_view
from cast_mlx.training.evaluation import bootstrap_ci, evaluate, per_problem_values
from cast_mlx.training.metrics import length_drift, memory_usage, step_metrics
from cast_mlx.training.summary import best_saved_eval, summary_lines, write_run_report


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
    # (logprobs.frozen_blocks; 0: none, or system.reuse_frozen false); fixed for the run
    frozen_split: int = 0
    reward_fns: list = field(default_factory=list)  # reward.functions; empty: the math verifier alone
    # on_phase of the callbacks (fit sets it): progress inside a step, for the dashboard
    phase: Callable[..., None] = field(default=lambda *args: None)
    state: TrainState = field(default_factory=TrainState)
    world: dist.World = field(default_factory=dist.World)

    # `with setup(recipe) as run:` stops the verifier's worker processes at the end.
    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.verifier.close()


# --------------------------------------------------------------------------- set-up


def lr_schedule(recipe: cfg.Recipe):
    """Linear warmup to `lr`, then constant / linear / cosine / polynomial (power 2) decay."""
    lr, steps = recipe.optimizer.lr, recipe.schedule.steps
    warmup = int(round(recipe.schedule.warmup_ratio * steps))
    end = lr * recipe.schedule.min_lr_ratio
    rest = max(steps - warmup, 1)
    decay = recipe.schedule.decay
    if decay == "constant":
        after = lambda s: mx.array(lr, mx.float32)  # noqa: E731
    elif decay == "linear":
        after = optim.linear_schedule(lr, end, rest)
    elif decay == "cosine":
        after = optim.cosine_decay(lr, rest, end)
    else:

        def after(s):
            frac = mx.minimum(s.astype(mx.float32) / rest, 1.0)
            return (lr - end) * (1.0 - frac) ** 2 + end

    if warmup <= 1:  # a one-step warmup would start at lr / 1 = lr: no warmup at all
        return after
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup - 1), after], [warmup])


def build_optimizer(recipe: cfg.Recipe) -> optim.Optimizer:
    o = recipe.optimizer
    return optim.AdamW(learning_rate=lr_schedule(recipe), betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def setup(recipe: cfg.Recipe, out_dir: Path | None = None, world: dist.World | None = None) -> Run:
    """Load the model, attach LoRA, build the optimizer, teacher, data and compiled fns.
    `world`: this process's place in a data-parallel run (default: a single process)."""
    world = world or dist.World()
    dist.check_recipe(recipe, world.size)
    if recipe.system.memory_limit_gb:
        mx.set_memory_limit(int(recipe.system.memory_limit_gb * 2**30))
    if recipe.system.cache_limit_gb is not None:
        mx.set_cache_limit(int(recipe.system.cache_limit_gb * 2**30))
    problems, held_out = load_data(recipe)  # before the model: a data error costs no load time
    warm = check_warm_start(recipe)
    reward_fns = rewards.parse_functions(recipe.reward, answer_format=recipe.data.answer_format)
    model, tokenizer = models.load(recipe.model.name, dtype=recipe.model.dtype)
    check_context(recipe, model, tokenizer, problems + held_out)
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
        load_warm_start(model, warm)
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
    L = recipe.loss
    loss_fn = CompiledPolicyLoss(
        eps_low=L.eps_low, eps_high=L.eps_high, loss_agg=L.loss_agg, mask_truncated=L.mask_truncated, beta=L.beta
    )
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
        state=TrainState(recipe_hash=cfg.recipe_hash(recipe), world_size=world.size, run_id=ckpt_io.new_run_id()),
        world=world,
    )


def load_data(recipe: cfg.Recipe) -> tuple[list, list]:
    """The training problems and the held-out eval problems; a data problem (a missing or
    empty file, rows that do not parse, bytes that are not UTF-8) is a ConfigError."""
    try:
        problems = task_problems(recipe, "train")
        held_out = eval_problems(recipe) if recipe.logging.eval_every else []
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise cfg.ConfigError(f"data: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return problems, held_out


def check_warm_start(recipe: cfg.Recipe) -> Path | None:
    """`model.adapter_path`'s folder, after checking (before any model loads) that its
    adapter_config.json describes the recipe's LoRA: the same rank, scale, layers and keys."""
    path = recipe.model.adapter_path
    if path is None:
        return None
    folder = Path(path)
    where = f"model.adapter_path: {folder}"
    if not (folder / models.ADAPTER_WEIGHTS).is_file() or not (folder / models.ADAPTER_CONFIG).is_file():
        raise cfg.ConfigError(
            f"{where} is not an mlx-lm adapter folder (needs {models.ADAPTER_CONFIG} and {models.ADAPTER_WEIGHTS})"
        )
    try:
        saved = json.loads((folder / models.ADAPTER_CONFIG).read_text())
        params = saved.get("lora_parameters", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise cfg.ConfigError(f"{where}: {models.ADAPTER_CONFIG} is unreadable ({exc})") from exc
    lo = recipe.lora
    if saved.get("fine_tune_type", "lora") != "lora":
        raise cfg.ConfigError(f"{where}: a {saved.get('fine_tune_type')!r} adapter; only LoRA adapters can start a run")
    checks = [
        ("lora.num_layers", saved.get("num_layers"), lo.num_layers),
        ("lora.rank", params.get("rank"), lo.rank),
        ("lora.alpha (scale = alpha / rank)", params.get("scale"), lo.alpha / lo.rank),
        ("lora.keys", sorted(params["keys"]) if params.get("keys") else None, sorted(lo.keys)),
    ]
    for name, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise cfg.ConfigError(
                f"{name}: the recipe has {ours!r}, the adapter in {folder} {theirs!r}; make them match"
            )
    return folder


def load_warm_start(model, folder: Path) -> None:
    """Load the adapter tensors into the freshly attached LoRA layers, strictly (the names
    and shapes of this model; a key list mlx-lm left implicit is checked here)."""
    weights = cast("dict[str, mx.array]", mx.load(str(folder / models.ADAPTER_WEIGHTS)))
    try:
        ckpt_io.check_tensors(
            f"model.adapter_path: {folder / models.ADAPTER_WEIGHTS}", weights, models.lora_state(model)
        )
    except ckpt_io.CheckpointError as exc:
        raise cfg.ConfigError(str(exc)) from exc
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())


def context_length(model) -> int | None:
    """The model's context window, when its config says (mlx-lm models keep it in `args`)."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(recipe: cfg.Recipe, model, tokenizer, problems: list) -> None:
    """The longest prompt plus `sampling.max_new_tokens` must fit the model's context (a
    ConfigError otherwise; it needs the tokenizer, so it runs right after the load)."""
    limit = context_length(model)
    if limit is None or not problems:
        return
    d = recipe.data
    longest = max(
        len(tokenizer.encode(data.build_prompt(tokenizer, p, d.system_prompt, d.answer_format))) for p in problems
    )
    if longest + recipe.sampling.max_new_tokens > limit:
        raise cfg.ConfigError(
            f"sampling.max_new_tokens: the longest prompt ({longest} tokens) plus {recipe.sampling.max_new_tokens} "
            f"new tokens exceed {recipe.model.name}'s context of {limit} tokens"
        )


# --------------------------------------------------------------------------- data order


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"cast-mlx/order/{seed}/{epoch}").shuffle(order)
    return order


def next_prompts(run: Run) -> list:
    """The step's batch of problems (P of them, the global batch), advancing the data
    cursor; every rank of a data-parallel run advances it the same way."""
    st, p = run.state, run.recipe.sampling.prompts_per_step
    picked: list[int] = []
    while len(picked) < p:
        order = epoch_order(len(run.problems), run.recipe.seed, st.epoch, run.recipe.data.shuffle)
        take = order[st.cursor : st.cursor + p - len(picked)]
        picked += take
        st.cursor += len(take)
        if st.cursor >= len(order):
            st.epoch, st.cursor = st.epoch + 1, 0
    return [run.problems[i] for i in picked]


def step_key(seed: int, step: int) -> mx.array:
    return mx.random.key((seed * 1_000_003 + step) % (2**63))


# --------------------------------------------------------------------------- phases


def sample(run: Run, problems: list):
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
        key=step_key(r.seed, run.state.step),
        stream_offset=world.rank * streams,
        total_streams=world.size * streams,
        progress=lambda t, cap, done, n: run.phase("sampling", t, cap, f"{done}/{n} streams done"),
        keep_states=run.frozen_split,
    )
    return prompts, out


def score_rewards(run: Run, problems: list, texts: list[str], prompts: list[list[int]], out) -> dict:
    """The rewards `[N]` the estimator reads, with per-row `strict` / `lenient` / `dropped`
    flags and the reward functions' metrics. A dropped row (unusable gold, a function that
    cannot judge it) carries no loss.

    Without `reward.functions`: the verifier's 0/1 at `data.reward`'s strictness. With them:
    their weighted sum; CAST and RLSD read the correct/wrong decision (sum >=
    `reward.correct_threshold`: their trajectory types need one), GRPO the sum itself."""
    r = run.recipe
    g, fmt = r.sampling.group_size, r.data.answer_format
    rows = [problems[i // g] for i in range(len(texts))]
    if not run.reward_fns:
        verdicts = run.verifier.verify_batch([(t, p.gold, fmt) for t, p in zip(texts, rows)])
        values = [verify.reward(v, r.data.reward) for v in verdicts]
        return {
            "rewards": mx.array([0.0 if v is None else v for v in values], dtype=mx.float32),
            "strict": [bool(v and v.strict) for v in verdicts],
            "lenient": [bool(v and v.lenient) for v in verdicts],
            "dropped": [v is None for v in values],
            "judged": {},
        }
    lengths = [int(n) for n in out.lengths.tolist()]
    prompt_text = [run.tokenizer.decode(prompts[i // g]) for i in range(len(texts))]
    result = rewards.score(
        run.reward_fns,
        completions=texts,
        prompts=prompt_text,
        answers=[p.gold for p in rows],
        columns={
            "questions": [p.question for p in rows],
            "solutions": [p.solution for p in rows],
            "completion_ids": [out.tokens[i, : lengths[i]].tolist() for i in range(len(texts))],
            "lengths": lengths,
            "truncated": [f == "length" for f in out.finish_reasons],
        },
        pool_or_verifier=run.verifier,
        answer_format=fmt,
        strictness=r.data.reward,
        max_new_tokens=r.sampling.max_new_tokens,
        buffer=r.reward.overlong_buffer,
        threshold=r.reward.correct_threshold,
        timeout=r.reward.timeout,
    )
    binary = get_estimator(r.algorithm.name).uses_teacher
    values = [float(c) if binary else (v or 0.0) for v, c in zip(result.rewards, result.correct)]
    if result.verdicts is not None:
        strict = [bool(v and v.strict) for v in result.verdicts]
        lenient = [bool(v and v.lenient) for v in result.verdicts]
    else:  # no math function: "correct" is the threshold's decision
        strict = lenient = list(result.correct)
    return {
        "rewards": mx.array(values, dtype=mx.float32),
        "strict": strict,
        "lenient": lenient,
        "dropped": list(result.dropped),
        "judged": result.judged(),  # every reward function's values (NaN: not judged)
    }


def row_contexts(run: Run, problems: list, prompts: list[list[int]]) -> list[list[int]]:
    """The teacher's context of every row (one per prompt, repeated G times)."""
    mode = run.recipe.teacher.context
    refs = [p.solution or p.gold for p in problems]
    instruction = data.ANSWER_INSTRUCTIONS.get(run.recipe.data.answer_format, "")  # none: no instruction
    ctx = teacher_contexts(mode, run.tokenizer, [p.question for p in problems], prompts, refs, instruction)
    g = run.recipe.sampling.group_size
    return [ctx[i // g] for i in range(len(problems) * g)]


def teacher_gaps(run: Run, problems, prompts, out, mask):
    """`g = lp_T - lp_old` `[N, L]` (zeros under GRPO) and the teacher log-probs.

    `lp_old` is the sampler's log-probs, except with `teacher.context: same`: then it is
    scored by the teacher's own chunked forward, so a teacher with the policy's weights
    gives exactly g = 0 (the sampler's KV-cache path differs by ~1e-4, which would flip
    tokens at random); with a different context the gaps are far larger than that."""
    if run.teacher is None:
        return mx.zeros(mask.shape), None
    temperature = run.recipe.sampling.temperature
    size, share = run.recipe.optimizer.micro_batch_size, run.recipe.system.share_prefix
    contexts = row_contexts(run, problems, prompts)
    g = run.recipe.sampling.group_size
    # the rollout's frozen-block states are the student's context's (the `same` teacher's)
    frozen = out.frozen if all(c == prompts[i // g] for i, c in enumerate(contexts)) else None
    if run.recipe.teacher.context == "same":
        lp_old = score_in_buckets(
            lambda b: mx.stop_gradient(token_logprobs(run.model, b, temperature)),
            contexts,
            out.tokens,
            mask,
            size,
            share,
            frozen,
        )
    else:
        lp_old = out.logprobs
    lp_t = score_in_buckets(
        lambda b: run.teacher.score(run.model, b, temperature), contexts, out.tokens, mask, size, share, frozen
    )
    return (lp_t - lp_old) * mask, lp_t


LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean")  # policy_loss's metrics (+ kl_mean)


def update(run: Run, contexts, tokens, mask, adv, truncated, ref_lp=None, frozen=None):
    """Accumulate gradients over micro-batches, clip, and apply one AdamW step (with
    `frozen`, the rollout's frozen-block states of these rows: only the top blocks run).

    Returns (loss, grad_norm, aux metrics, applied?). Rows without loss (zero advantage
    everywhere with beta = 0, or truncated when masked) are skipped: they would add
    nothing to the loss or the gradient, and the normaliser is the whole batch's.

    In a data-parallel run the rows are this rank's; the normaliser is the global batch's,
    so the gradients summed over ranks are the single-process accumulated gradient, and
    the loss, grad norm and aux metrics returned are global (the same on every rank, so
    every rank takes the same decisions). A rank without loss-bearing rows still joins.
    """
    r, world = run.recipe, run.world
    norm = dist.global_norm(world, loss_norm(mask, truncated, mask_truncated=r.loss.mask_truncated))
    rows = rows_with_loss(adv, mask, truncated, beta=r.loss.beta, mask_truncated=r.loss.mask_truncated)
    temperature = r.sampling.temperature

    def micro_loss(model, batch, adv_mb, trunc_mb, ref_mb):
        lp, ent = token_logprobs(model, batch, temperature, with_entropy=True)
        old = mx.stop_gradient(lp)  # one update per batch: ratio = 1, gradient of the surrogate
        value, metrics = run.loss_fn(lp, old, adv_mb, batch.mask, trunc_mb, ref_mb, norm)
        return value, (metrics, mx.stop_gradient((ent * batch.mask).sum()))

    grad_fn = nn.value_and_grad(run.model, micro_loss)
    total, grads, entropy_sum = mx.array(0.0), None, mx.array(0.0)
    metric_names = LOSS_METRICS + (("kl_mean",) if ref_lp is not None else ())
    metric_sums = {k: mx.array(0.0) for k in metric_names}
    # micro-batches of rows of similar length, each padded only to its own longest row
    # (and, with system.share_prefix, of one prompt: scored after one pass of it)
    share = r.system.share_prefix
    by_prompt = [contexts[i] for i in rows] if share else None
    buckets = length_buckets(mask[mx.array(rows)], r.optimizer.micro_batch_size, by_prompt) if rows else []
    run.phase("update", 0, len(buckets))
    for done, mb in enumerate(([rows[j] for j in b] for b in buckets), 1):
        idx = mx.array(mb)
        batch = trimmed_batch(contexts, tokens, mask, mb, share, frozen)
        length = batch.tokens.shape[1]
        ref_mb = None if ref_lp is None else ref_lp[idx, :length]
        (value, (metrics, ent)), g = grad_fn(run.model, batch, adv[idx, :length], truncated[idx], ref_mb)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        total = total + value
        entropy_sum = entropy_sum + ent
        for k, v in metrics.items():
            metric_sums[k] = metric_sums[k] + v
        mx.eval(grads, total)
        run.phase("update", done, len(buckets))
    # the tokens of the rows that went through the forward pass (for the mean entropy)
    n_tok = mask[mx.array(rows)].sum() if rows else mx.array(0.0)
    stats = dist.sum_values(
        world,
        {
            "loss": total,
            "entropy": entropy_sum,
            "tokens": n_tok,
            "rows": len(rows),
            "all_rows": mask.shape[0],
            **metric_sums,
        },
    )
    aux = {k: stats[k] for k in metric_names} if stats["rows"] else {}
    aux["entropy"] = stats["entropy"] / stats["tokens"] if stats["tokens"] else 0.0
    aux["rows_skipped"] = int(stats["all_rows"] - stats["rows"])
    if not stats["rows"]:  # nothing carries loss this step (e.g. all groups zero-variance)
        return 0.0, 0.0, aux, False
    if grads is None:  # rows elsewhere but none here: join the sum with zeros
        grads = tree_map(mx.zeros_like, run.model.trainable_parameters())
    grads = dist.sum_tree(world, grads)
    grads, grad_norm = optim.clip_grad_norm(grads, r.optimizer.max_grad_norm)
    loss_value, grad_norm = stats["loss"], grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        return loss_value, grad_norm, aux, False
    run.optimizer.update(run.model, grads)
    mx.eval(run.model.trainable_parameters(), run.optimizer.state)
    return loss_value, grad_norm, aux, True


# --------------------------------------------------------------------------- one step


def first_nonfinite(arrays: dict[str, mx.array], mask: mx.array) -> str | None:
    """The name of the first array with a NaN/inf (`[N, L]` ones over the real tokens of
    `mask` only: padding may hold anything), or None."""
    for name, a in arrays.items():
        if a.ndim == mask.ndim:
            a = mx.where(mask != 0, a, 0.0)
        if not bool(mx.all(mx.isfinite(a)).item()):
            return name
    return None


def train_step(run: Run) -> tuple[dict, list[dict]]:
    """One full step. Returns the metrics line and a few sample records.

    In a data-parallel run every rank returns the same global metrics; the sample records
    are this rank's own first rows (rank 0's are the global batch's first rows)."""
    world = run.world
    comm_start = (world.comm_seconds, world.comm_bytes, world.comm_calls)
    t0 = time.perf_counter()
    problems = dist.shard(next_prompts(run), world.rank, world.size)
    prompts, out = sample(run, problems)
    mx.eval(out.tokens, out.logprobs)
    return learn(run, problems, prompts, out, sample_seconds=time.perf_counter() - t0, comm_start=comm_start)


def learn(
    run: Run, problems: list, prompts: list[list[int]], out, sample_seconds: float = 0.0, comm_start=None
) -> tuple[dict, list[dict]]:
    """Everything of a step after sampling: verify, teacher, advantages, update, the metrics
    line (`train_step`'s second half; `scripts/bench_step.py` times it on a fixed batch)."""
    r, st, world = run.recipe, run.state, run.world
    if comm_start is None:
        comm_start = (world.comm_seconds, world.comm_bytes, world.comm_calls)
    times = {"sample": sample_seconds}
    t = time.perf_counter()
    run.phase("verifying", 0, 1)
    texts = decode_completions(run.tokenizer, out)  # without the final EOS token
    scored = score_rewards(run, problems, texts, prompts, out)
    rewards, dropped = scored["rewards"], scored["dropped"]
    times["verify"] = time.perf_counter() - t

    keep = mx.array([0.0 if d else 1.0 for d in dropped])[:, None]
    mask = out.mask * keep
    truncated = mx.array([1.0 if f == "length" else 0.0 for f in out.finish_reasons])
    special, eos = rollout.special_and_eos(out.tokens, out.lengths, truncated, mask, run.special_ids)

    t = time.perf_counter()
    if run.teacher is not None or run.ref_params is not None:
        run.phase("teacher", 0, 1)
    contexts = [prompts[i // r.sampling.group_size] for i in range(mask.shape[0])]  # student's
    gaps, _ = teacher_gaps(run, problems, prompts, out, mask)
    ref_lp = None
    if run.ref_params is not None:
        with swapped_lora(run.model, run.ref_params):
            ref_lp = score_in_buckets(
                lambda b: mx.stop_gradient(token_logprobs(run.model, b, r.sampling.temperature)),
                contexts,
                out.tokens,
                mask,
                r.optimizer.micro_batch_size,
                r.system.share_prefix,
                out.frozen,
            )
            mx.eval(ref_lp)  # inside the swap, and timed as teacher work
    mx.eval(gaps)
    times["teacher"] = time.perf_counter() - t

    t = time.perf_counter()
    adv, base = run.advantages(rewards, gaps, mask, step=st.step, special=special)
    # A NaN must not pass for "nothing to learn" (rows are picked by |A| > 0, false for NaN):
    # every rank takes the same decision, as the update has collectives.
    nonfinite = first_nonfinite({"rewards": rewards, "teacher gaps": gaps, "advantages": adv}, mask)
    if dist.max_int(world, int(nonfinite is not None), "agreeing on finite advantages"):
        loss_value, grad_norm, applied = math.nan, math.nan, False
        aux = {"entropy": math.nan, "rows_skipped": 0}
    else:
        mx.clear_cache()
        loss_value, grad_norm, aux, applied = update(
            run, contexts, out.tokens, mask, adv, truncated, ref_lp, out.frozen
        )
    mx.clear_cache()
    times["update"] = time.perf_counter() - t

    lr = float(run.optimizer.learning_rate.item()) if applied else float(lr_schedule(r)(mx.array(st.step)).item())
    if applied or aux["rows_skipped"] == mask.shape[0] * world.size:
        st.step += 1
        st.bad_steps = 0
        if run.teacher is not None:
            run.teacher.after_step(run.model, st.step)
    else:
        st.bad_steps += 1
        st.step += 1  # the batch is consumed; the update is skipped
        if st.bad_steps >= r.system.max_bad_steps:
            what = f"non-finite {nonfinite}" if nonfinite else f"loss {loss_value}, grad norm {grad_norm}"
            raise TrainingError(
                f"{st.bad_steps} consecutive steps with non-finite values (last: {what}); "
                "lower optimizer.lr or check the data and the checkpoint"
            )

    rows = dist.gather_rows(
        world,
        {
            "rewards": rewards,
            "base": base,
            "gaps": gaps,
            "adv": adv,
            "mask": mask,
            "truncated": truncated,
            "lengths": out.lengths,
            "special": special,
            "eos": eos,
            "strict": mx.array(scored["strict"]),
            "lenient": mx.array(scored["lenient"]),
            "dropped": mx.array(dropped),
            **{f"reward_fn/{name}": mx.array(values, dtype=mx.float32) for name, values in scored["judged"].items()},
        },
    )
    usage = memory_usage()
    # this rank's collectives of the step (all but the timing reduction just below)
    comm = {
        "time/comm": world.comm_seconds - comm_start[0],
        "comm/bytes": world.comm_bytes - comm_start[1],
        "comm/calls": world.comm_calls - comm_start[2],
    }
    slowest = dist.max_values(world, times | usage)  # each phase: the slowest rank's
    times, usage = {k: slowest[k] for k in times}, {k: slowest[k] for k in usage}
    metrics = step_metrics(
        rows,
        group_size=r.sampling.group_size,
        a_max=r.algorithm.a_max,
        step=st.step,
        epoch=st.epoch,
        loss_value=loss_value,
        grad_norm=grad_norm,
        aux=aux,
        lr=lr,
        times=times,
        usage=usage,
        applied=applied,
        compile_count=compile_count(),
    )
    if world.size > 1:
        metrics |= comm
    # rewards/<name>/mean and /std, over the rows of every rank
    metrics |= reward_metrics({n: cast("list[float]", rows[f"reward_fn/{n}"].tolist()) for n in scored["judged"]})
    st.history.append([metrics["completions/clipped_ratio"], metrics["reward"]])
    metrics["health/drift"] = int(length_drift(st.history, r.system.drift_window, r.system.drift_rise))
    samples = [
        {
            "step": st.step,
            "problem": problems[i // r.sampling.group_size].question,
            "gold": problems[i // r.sampling.group_size].gold,
            "completion": texts[i],
            "reward": float(rewards[i].item()),
            "finish": out.finish_reasons[i],
        }
        for i in range(min(r.logging.samples_per_step, len(texts)))
    ]
    return metrics, samples


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


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second SIGINT
    abandons the step at once (the last checkpoint stays valid)."""

    CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal_name is not None and name == "SIGINT":
                raise KeyboardInterrupt
            self.signal_name = name

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

    @property
    def code(self) -> int:
        if self.signal_name is None:
            return 1
        return self.CODES.get(self.signal_name, 1)


def task_problems(recipe: cfg.Recipe, which: str) -> list:
    """The recipe's `train` or held-out `eval` problems: the arithmetic eval split never
    overlaps the train split; gsm8k/math use their test split, a custom task its
    `data.eval_split` with the same field mapping."""
    d = recipe.data
    train = which == "train"
    n, seed = (d.train_size, recipe.seed) if train else (d.eval_size, 0)
    if d.task == "custom":
        return data.load_custom(d, d.train_split if train else d.eval_split, n, seed)
    split = "train" if train else ("eval" if d.task == "arithmetic" else "test")
    return data.load_task(d.task, split, path=d.path, n=n, level=d.level, seed=seed)


def eval_problems(recipe: cfg.Recipe) -> list:
    """The fixed held-out set for in-training eval."""
    return task_problems(recipe, "eval")


def evaluate_now(run: Run, problems: list) -> dict:
    """Greedy accuracy of the current policy on `problems`, as `eval/*` metrics (mean and
    bootstrap CI over problems) plus `eval/per_problem` (the 0/1 lists, which the metrics
    files keep in eval.jsonl for paired tests). In a data-parallel run each rank answers its
    contiguous slice and the per-problem results are gathered, so no rank waits idle."""
    r, world = run.recipe, run.world
    t = time.perf_counter()
    run.phase("eval", 0, len(problems))
    mine = dist.shard_uneven(problems, world.rank, world.size)
    values: dict[str, list[float]] = {"greedy/strict": [], "greedy/lenient": []}
    if mine:
        result = evaluate(
            run.model,
            run.tokenizer,
            mine,
            answer_format=r.data.answer_format,
            system_prompt=r.data.system_prompt,
            max_new_tokens=r.sampling.max_new_tokens,
            max_batch=r.sampling.max_batch,
            verifier=run.verifier,
            n_resamples=200,
            progress=lambda done, n: run.phase("eval", done, n),
        )
        values = per_problem_values(result.problems, k=1)
    gathered = dist.gather_rows(
        world, {k: mx.array(v, dtype=mx.float32) for k, v in values.items()}, "gathering eval results"
    )
    strict = cast("list[float]", gathered["greedy/strict"].tolist())
    lenient = cast("list[float]", gathered["greedy/lenient"].tolist())
    return eval_metrics(lenient, strict) | {"time/eval": time.perf_counter() - t}


def eval_metrics(lenient: list[float], strict: list[float]) -> dict:
    low, high = bootstrap_ci(lenient, seed=0, n_resamples=200)
    return {
        "eval/accuracy": float(np.mean(lenient)),
        "eval/accuracy_ci_low": low,
        "eval/accuracy_ci_high": high,
        "eval/accuracy_strict": float(np.mean(strict)),
        "eval/n": len(lenient),
        "eval/per_problem": {"lenient": lenient, "strict": strict},
    }


def base_eval_key(run: Run, problems: list) -> str:
    """What the greedy eval of a fresh run's step-0 policy depends on: the base model (the
    LoRA B matrices start at 0) or the warm-start adapter, the problems and the settings."""
    r = run.recipe
    what = {
        "cast_mlx": __version__,
        "mlx": getattr(mx, "__version__", "?"),
        "model": r.model.name,
        "dtype": models.resolve_dtype(r.model.dtype),
        "problems": [[p.id, p.question, p.gold] for p in problems],
        "answer_format": r.data.answer_format,
        "system_prompt": r.data.system_prompt,
        "max_new_tokens": r.sampling.max_new_tokens,
        "max_batch": r.sampling.max_batch,
        "adapter": adapter_digest(r.model.adapter_path),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def adapter_digest(path: str | None) -> str | None:
    """A warm start's adapter weights, by content (the step-0 policy is that adapter)."""
    if path is None:
        return None
    return hashlib.sha256((Path(path) / models.ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def base_model_eval(run: Run, problems: list) -> dict:
    """The step-0 eval, read from `$CAST_MLX_HOME/evals/` when a run with the same model,
    problems and eval settings computed it before (compare.py's variants and seeds share
    it); computed and stored otherwise. Single-process runs only (every rank of a
    data-parallel run must take the same path)."""
    path = models.home() / "evals" / f"base-{base_eval_key(run, problems)}.json"
    if run.world.size == 1 and path.is_file():
        try:
            stored = json.loads(path.read_text())
            return eval_metrics(stored["lenient"], stored["strict"]) | {"time/eval": 0.0, "eval/cached": True}
        except (OSError, ValueError, KeyError):
            pass  # unreadable: compute it again
    metrics = evaluate_now(run, problems)
    if run.world.size == 1:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(metrics["eval/per_problem"]))
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written costs only time
    return metrics


def run_info(run: Run) -> dict:
    r = run.recipe
    info: dict[str, str | int] = {
        "run": r.name,
        "model": f"{r.model.name} ({models.resolve_dtype(r.model.dtype)})",
        "algorithm": r.algorithm.name,
        "backend": str(mx.default_device()),
        "blas": blas.active_blas(),
        "out": str(run.out_dir),
        "step": run.state.step,  # where this invocation starts (a resumed run: its checkpoint's)
    }
    if run.world.size > 1:
        info["processes"] = run.world.size
    return info


def resume_command(run: Run) -> str:
    command = f"python -m cast_mlx.train --resume {run.out_dir}"
    if run.world.size > 1:
        command += f" (under mlx.launch, with the same {run.world.size} processes)"
    return command


SIGNAL_OF_CODE = {code: name for name, code in StopRequest.CODES.items()}


EXIT_DRIFT = 4  # system.stop_on_drift stopped the run


def drift_message(run: Run) -> str:
    w, hist = run.recipe.system.drift_window, run.state.history
    before, last = hist[-2 * w : -w], hist[-w:]
    mean = lambda rows, i: sum(h[i] for h in rows) / len(rows)  # noqa: E731
    return (
        f"warning: length drift at step {run.state.step}: the truncation rate rose to {mean(last, 0):.2f} "
        f"(mean of the last {w} steps) while the reward went {mean(before, 1):.3f} -> {mean(last, 1):.3f}; "
        "see health/drift and the cast/eos/* metrics"
    )


def make_callbacks(run: Run, live: bool, resumed: bool) -> list[cb.TrainingCallback]:
    """Rank 0's sinks and view (under mlx.launch stdout is a pipe; the launcher passes
    COLUMNS when it runs on a terminal); the other ranks of a data-parallel run get none."""
    if not run.world.is_main:
        return []
    r = run.recipe
    view = make_view(
        r.schedule.steps,
        live and r.logging.dashboard,
        force_terminal=run.world.size > 1 and "COLUMNS" in os.environ,
        eval_every=r.logging.eval_every,
    )
    return [*cb.sinks(r, run.out_dir, run.state.step if resumed else None), view]


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
    callbacks = make_callbacks(run, live, resumed=resumed_from is not None)

    def phase(*args) -> None:
        for c in callbacks:
            c.on_phase(*args)

    run.phase = phase

    def tell(text: str) -> None:
        for c in callbacks:
            c.on_message(text)

    def log(metrics: dict, samples: list[dict]) -> None:
        for c in callbacks:
            c.on_metrics(metrics, samples)

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
    held_out = run.held_out
    started = time.perf_counter()
    best = best_saved_eval(run.out_dir) if resumed_from else -1.0  # the best checkpointed eval so far

    def finish() -> None:  # rank 0: the summary and the report page, once a checkpoint exists
        if not callbacks or not (written or resumed_from):
            return
        report = write_run_report(run.out_dir)
        try:
            lines = summary_lines(run, time.perf_counter() - started, written[-1] if written else resumed_from, report)
        except (OSError, ValueError, KeyError, ZeroDivisionError) as exc:  # the checkpoints are safe already
            lines = [f"warning: no summary ({type(exc).__name__}: {exc})"]
        for line in lines:
            tell(line)

    try:
        info = run_info(run) if callbacks else {}
        for c in callbacks:
            c.on_train_begin(info)
        dist.barrier(world, "start-up (every rank loads the model)")
        if resumed_from:
            tell(f"resumed from {resumed_from} at step {run.state.step}")
        elif every:  # the starting point of the eval curve
            log({"step": 0, **base_model_eval(run, held_out)}, [])
        code = agreed_stop()
        while run.state.step < r.schedule.steps and not code:
            metrics, samples = train_step(run)
            if every and (run.state.step % every == 0 or run.state.step == r.schedule.steps):
                metrics.update(evaluate_now(run, held_out))
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
                tell(drift_message(run))
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
        return 130
    except TrainingError:
        finish()  # what the checkpoints hold, before the error line
        raise
    finally:
        stop.restore()
        for c in callbacks:
            c.on_train_end()

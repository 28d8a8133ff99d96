"""The training loop: sample -> verify -> teacher -> advantages -> loss -> LoRA update.

The loop is a handful of functions over a `Run` (the objects a run holds) and a
`TrainState` (the counters a checkpoint must restore). One step, in spec order:

1. `sample`: P prompts x G completions from the current policy (rollout engine).
2. `score_rewards`: decode, verify, binary rewards.
3. `teacher_gaps`: teacher log-probs on the teacher context + the same tokens, minus the
   old policy's log-probs (skipped under GRPO).
4. advantages (compiled, by algorithm name).
5. `update`: micro-batched forward/backward with the loss normalised over the whole
   batch, gradient-norm clip, AdamW on the LoRA tensors; NaN/inf skips the update.
6. teacher refresh, metrics, checkpoint.

Randomness is derived from `(seed, step)` and the data order from `(seed, epoch)`, so a
run resumed from a checkpoint continues bit-identically on the same machine.

Data parallelism (`mlx.launch -n N`): `Run.world` says which of the N processes this is.
Each one samples, verifies, scores and computes advantages for its slice of the step's
prompts; the loss normaliser, gradients and metrics are reduced over processes (see
`cast_mlx.distributed`); rank 0 alone prints and writes metrics and checkpoints. With a
world of one, every collective is skipped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cast_mlx import blas

blas.load()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from cast_mlx import config as cfg  # noqa: E402
from cast_mlx import data, models, rollout, verify  # noqa: E402
from cast_mlx import distributed as dist  # noqa: E402
from cast_mlx.eval import decode_completions  # noqa: E402
from cast_mlx.compiled import CompiledAdvantages, CompiledPolicyLoss, compile_count  # noqa: E402
from cast_mlx.logprobs import length_buckets, score_in_buckets, token_logprobs, trimmed_batch  # noqa: E402
from cast_mlx.loss import cast_diagnostics, loss_norm  # noqa: E402
from cast_mlx.teacher import Teacher, swapped_lora, teacher_contexts  # noqa: E402

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # file in the checkpoints folder naming the newest complete checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many NaN steps); the message says why."""


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # next index into this epoch's order
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    recipe_hash: str = ""
    world_size: int = 1  # processes that trained it; a resume must use as many


@dataclass
class Run:
    recipe: cfg.Recipe
    model: nn.Module
    tokenizer: object
    adapter_config: dict
    optimizer: optim.Optimizer
    teacher: Teacher | None
    ref_params: dict | None  # adapters disabled (k3 KL reference), only when beta > 0
    problems: list
    advantages: CompiledAdvantages
    loss_fn: CompiledPolicyLoss
    verifier: verify.Verifier
    out_dir: Path
    state: TrainState = field(default_factory=TrainState)
    world: dist.World = field(default_factory=dist.World)


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
    return optim.AdamW(learning_rate=lr_schedule(recipe), betas=list(o.betas), eps=o.eps,
                       weight_decay=o.weight_decay)


def setup(recipe: cfg.Recipe, out_dir: Path | None = None, world: dist.World | None = None) -> Run:
    """Load the model, attach LoRA, build the optimizer, teacher, data and compiled fns.
    `world`: this process's place in a data-parallel run (default: a single process)."""
    world = world or dist.World()
    dist.check_recipe(recipe, world.size)
    if recipe.system.memory_limit_gb:
        mx.set_memory_limit(int(recipe.system.memory_limit_gb * 2**30))
    if recipe.system.cache_limit_gb is not None:
        mx.set_cache_limit(int(recipe.system.cache_limit_gb * 2**30))
    problems = data.load_task(recipe.data.task, "train", path=recipe.data.path,
                              n=recipe.data.train_size, level=recipe.data.level, seed=recipe.seed)
    model, tokenizer = models.load(recipe.model.name, dtype=recipe.model.dtype)
    lo = recipe.lora
    adapter_config = models.attach_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                                        num_layers=lo.num_layers, keys=lo.keys, seed=recipe.seed)
    model.train(lo.dropout > 0)
    a = recipe.algorithm
    teacher = None
    if a.name != "grpo":
        teacher = Teacher.create(model, kind=recipe.teacher.kind, refresh=recipe.teacher.refresh,
                                 ema_decay=recipe.teacher.ema_decay)
    ref_params = None
    if recipe.loss.beta > 0:
        ref_params = Teacher.create(model, kind="base").params
    params = {k: v for k, v in asdict(a).items() if k != "name"}
    params["scale_rewards"] = cfg.resolved_scale_rewards(a)
    advantages = CompiledAdvantages(a.name, group_size=recipe.sampling.group_size, **params)
    L = recipe.loss
    loss_fn = CompiledPolicyLoss(eps_low=L.eps_low, eps_high=L.eps_high, loss_agg=L.loss_agg,
                                 mask_truncated=L.mask_truncated, beta=L.beta)
    return Run(
        recipe=recipe, model=model, tokenizer=tokenizer, adapter_config=adapter_config,
        optimizer=build_optimizer(recipe), teacher=teacher, ref_params=ref_params,
        problems=problems, advantages=advantages, loss_fn=loss_fn,
        verifier=verify.Verifier(workers=1, timeout=2.0),
        out_dir=Path(out_dir) if out_dir else cfg.out_dir(recipe),
        state=TrainState(recipe_hash=cfg.recipe_hash(recipe), world_size=world.size),
        world=world,
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
    picked = []
    while len(picked) < p:
        order = epoch_order(len(run.problems), run.recipe.seed, st.epoch, run.recipe.data.shuffle)
        take = order[st.cursor: st.cursor + p - len(picked)]
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
    prompts = [data.prompt_ids(run.tokenizer, p, r.data.system_prompt, r.data.answer_format)
               for p in problems]
    eos = set(run.tokenizer.eos_token_ids)
    streams = len(problems) * r.sampling.group_size
    out = rollout.generate_groups(run.model, prompts, r.sampling.group_size, r.sampling, eos,
                                  key=step_key(r.seed, run.state.step),
                                  stream_offset=world.rank * streams, total_streams=world.size * streams)
    return prompts, out


def score_rewards(run: Run, problems: list, texts: list[str]):
    """Binary rewards `[N]` and the verdicts; None rewards (unusable gold) count as dropped."""
    g = run.recipe.sampling.group_size
    fmt = run.recipe.data.answer_format
    items = [(t, problems[i // g].gold, fmt) for i, t in enumerate(texts)]
    verdicts = run.verifier.verify_batch(items)
    rewards = [verify.reward(v, run.recipe.data.reward) for v in verdicts]
    dropped = [r is None for r in rewards]
    return mx.array([0.0 if r is None else r for r in rewards], dtype=mx.float32), verdicts, dropped


def row_contexts(run: Run, problems: list, prompts: list[list[int]]) -> list[list[int]]:
    """The teacher's context of every row (one per prompt, repeated G times)."""
    mode = cfg.resolved_teacher_context(run.recipe)
    refs = [p.solution or p.gold for p in problems]
    ctx = teacher_contexts(mode, run.tokenizer, [p.question for p in problems], prompts, refs)
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
    size = run.recipe.optimizer.micro_batch_size
    contexts = row_contexts(run, problems, prompts)
    if cfg.resolved_teacher_context(run.recipe) == "same":
        lp_old = score_in_buckets(lambda b: mx.stop_gradient(token_logprobs(run.model, b, temperature)),
                                  contexts, out.tokens, mask, size)
    else:
        lp_old = out.logprobs
    lp_t = score_in_buckets(lambda b: run.teacher.score(run.model, b, temperature),
                            contexts, out.tokens, mask, size)
    return (lp_t - lp_old) * mask, lp_t


LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean")  # policy_loss's metrics (+ kl_mean)


def update(run: Run, contexts, tokens, mask, adv, truncated, ref_lp=None):
    """Accumulate gradients over micro-batches, clip, and apply one AdamW step.

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
    carries = (mx.abs(adv) * mask).sum(axis=1) > 0
    if r.loss.beta > 0:
        carries = mask.sum(axis=1) > 0
    if r.loss.mask_truncated:
        carries = mx.logical_and(carries, truncated == 0)
    rows = [i for i, c in enumerate(carries.tolist()) if c]
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
    buckets = length_buckets(mask[mx.array(rows)], r.optimizer.micro_batch_size) if rows else []
    for mb in ([rows[j] for j in b] for b in buckets):
        idx = mx.array(mb)
        batch = trimmed_batch(contexts, tokens, mask, mb)
        length = batch.tokens.shape[1]
        ref_mb = None if ref_lp is None else ref_lp[idx, :length]
        (value, (metrics, ent)), g = grad_fn(run.model, batch, adv[idx, :length], truncated[idx], ref_mb)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        total = total + value
        entropy_sum = entropy_sum + ent
        for k, v in metrics.items():
            metric_sums[k] = metric_sums[k] + v
        mx.eval(grads, total)
    # the tokens of the rows that went through the forward pass (for the mean entropy)
    n_tok = mask[mx.array(rows)].sum() if rows else mx.array(0.0)
    stats = dist.sum_values(world, {"loss": total, "entropy": entropy_sum, "tokens": n_tok,
                                    "rows": len(rows), "all_rows": mask.shape[0], **metric_sums})
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


def train_step(run: Run) -> tuple[dict, list[dict]]:
    """One full step. Returns the metrics line and a few sample records.

    In a data-parallel run every rank returns the same global metrics; the sample records
    are this rank's own first rows (rank 0's are the global batch's first rows)."""
    r, st, world = run.recipe, run.state, run.world
    comm_start = (world.comm_seconds, world.comm_bytes, world.comm_calls)
    times = {}
    t0 = time.perf_counter()
    problems = dist.shard(next_prompts(run), world.rank, world.size)
    prompts, out = sample(run, problems)
    mx.eval(out.tokens, out.logprobs)
    times["sample"] = time.perf_counter() - t0

    t = time.perf_counter()
    texts = decode_completions(run.tokenizer, out)  # without the final EOS token
    rewards, verdicts, dropped = score_rewards(run, problems, texts)
    times["verify"] = time.perf_counter() - t

    keep = mx.array([0.0 if d else 1.0 for d in dropped])[:, None]
    mask = out.mask * keep
    truncated = mx.array([1.0 if f == "length" else 0.0 for f in out.finish_reasons])

    t = time.perf_counter()
    contexts = [prompts[i // r.sampling.group_size] for i in range(mask.shape[0])]  # student's
    gaps, _ = teacher_gaps(run, problems, prompts, out, mask)
    ref_lp = None
    if run.ref_params is not None:
        with swapped_lora(run.model, run.ref_params):
            ref_lp = score_in_buckets(
                lambda b: mx.stop_gradient(token_logprobs(run.model, b, r.sampling.temperature)),
                contexts, out.tokens, mask, r.optimizer.micro_batch_size)
            mx.eval(ref_lp)  # inside the swap, and timed as teacher work
    mx.eval(gaps)
    times["teacher"] = time.perf_counter() - t

    t = time.perf_counter()
    adv, base = run.advantages(rewards, gaps, mask, step=st.step)
    mx.clear_cache()
    loss_value, grad_norm, aux, applied = update(run, contexts, out.tokens, mask, adv, truncated, ref_lp)
    mx.clear_cache()
    times["update"] = time.perf_counter() - t

    lr = float(run.optimizer.learning_rate.item()) if applied else float(
        lr_schedule(r)(mx.array(st.step)).item())
    if applied or aux["rows_skipped"] == mask.shape[0] * world.size:
        st.step += 1
        st.bad_steps = 0
        if run.teacher is not None:
            run.teacher.after_step(run.model, st.step)
    else:
        st.bad_steps += 1
        st.step += 1  # the batch is consumed; the update is skipped
        if st.bad_steps >= r.system.max_bad_steps:
            raise TrainingError(
                f"{st.bad_steps} consecutive steps with a non-finite loss or gradient "
                f"(last loss {loss_value}, grad norm {grad_norm}); lower optimizer.lr or check the data"
            )

    rows = dist.gather_rows(world, {
        "rewards": rewards, "base": base, "gaps": gaps, "adv": adv, "mask": mask, "truncated": truncated,
        "lengths": out.lengths, "strict": mx.array([bool(v and v.strict) for v in verdicts]),
        "lenient": mx.array([bool(v and v.lenient) for v in verdicts]), "dropped": mx.array(dropped),
    })
    usage = {"memory/peak_gb": mx.get_peak_memory() / 2**30, "memory/rss_gb": _rss_gb()}
    # this rank's collectives of the step (all but the timing reduction just below)
    comm = {"time/comm": world.comm_seconds - comm_start[0], "comm/bytes": world.comm_bytes - comm_start[1],
            "comm/calls": world.comm_calls - comm_start[2]}
    slowest = dist.max_values(world, times | usage)  # each phase: the slowest rank's
    times, usage = {k: slowest[k] for k in times}, {k: slowest[k] for k in usage}
    metrics = step_metrics(run, rows, loss_value, grad_norm, aux, lr, times, usage, applied)
    if world.size > 1:
        metrics |= comm
    samples = [
        {"step": st.step, "problem": problems[i // r.sampling.group_size].question,
         "gold": problems[i // r.sampling.group_size].gold, "completion": texts[i],
         "reward": float(rewards[i].item()), "finish": out.finish_reasons[i]}
        for i in range(min(r.logging.samples_per_step, len(texts)))
    ]
    return metrics, samples


def step_metrics(run, rows: dict, loss_value, grad_norm, aux, lr, times, usage, applied) -> dict:
    """The metrics line of a step from the per-row arrays of the whole batch (`rows`:
    rewards, base, gaps, adv, mask, truncated, lengths, and the strict / lenient / dropped
    flags), the update's results, the phase times and the memory use."""
    r = run.recipe
    g = r.sampling.group_size
    rewards, base, gaps, adv = rows["rewards"], rows["base"], rows["gaps"], rows["adv"]
    mask, truncated = rows["mask"], rows["truncated"]
    rew = rewards.reshape(-1, g)
    lengths = rows["lengths"].astype(mx.float32)
    ended = 1.0 - truncated
    n_ended = float(ended.sum().item())
    gen_tokens = float(rows["lengths"].sum().item())
    n_rows = rewards.shape[0]
    diag = cast_diagnostics(rewards, base, gaps, adv, mask, a_max=r.algorithm.a_max, group_size=g)
    m = {
        "step": run.state.step,
        "epoch": run.state.epoch,
        "reward": rewards.mean().item(),
        "reward_std": float(mx.sqrt(((rew - rew.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
                                    / max(g - 1, 1)).mean().item()),
        "frac_reward_zero_std": float((rew.max(axis=1) == rew.min(axis=1)).astype(mx.float32).mean().item()),
        "accuracy/strict": sum(rows["strict"].tolist()) / n_rows,
        "accuracy/lenient": sum(rows["lenient"].tolist()) / n_rows,
        "reward/dropped": sum(rows["dropped"].tolist()),
        "completions/mean_length": lengths.mean().item(),
        "completions/mean_terminated_length": float((lengths * ended).sum().item()) / max(n_ended, 1.0),
        "completions/max_length": float(lengths.max().item()),
        "completions/clipped_ratio": float(truncated.mean().item()),
        "loss": loss_value,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "update_applied": applied,
        "clip_ratio/low_mean": aux.get("clip_frac_low", 0.0),
        "clip_ratio/high_mean": aux.get("clip_frac_high", 0.0),
        "ratio_mean": aux.get("ratio_mean", 1.0),
        "entropy": aux["entropy"],
        "rows_skipped": aux["rows_skipped"],
        "compile_count": compile_count(),
        "time/sample": times["sample"],
        "time/verify": times["verify"],
        "time/teacher": times["teacher"],
        "time/update": times["update"],
        "time/step": sum(times.values()),
        "tokens_per_s/generate": gen_tokens / max(times["sample"], 1e-9),
        "tokens_per_s/train": float(mask.sum().item()) / max(times["update"], 1e-9),
        **usage,
    }
    if "kl_mean" in aux:
        m["kl"] = aux["kl_mean"]
    for k, v in diag.items():
        m[f"cast/{k}"] = float(v.item()) if isinstance(v, mx.array) else float(v)
    return m


def _rss_gb() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(run: Run) -> Path:
    """Write `checkpoints/step_NNNNNN` atomically (temp dir + rename), then point `latest`
    at it; older checkpoints beyond `checkpoint.keep` are removed afterwards."""
    root = checkpoint_root(run.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{run.state.step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    models.save_adapters(run.model, tmp, run.adapter_config)
    opt_state = dict(tree_flatten(run.optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
    if run.teacher is not None:
        mx.save_safetensors(str(tmp / "teacher.safetensors"), run.teacher.params)
    meta = asdict(run.state) | {"teacher_version": run.teacher.version if run.teacher else 0}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "recipe.yaml").write_text(cfg.to_yaml(run.recipe))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: -run.recipe.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in ("state.json", models.ADAPTER_WEIGHTS, "optimizer.safetensors"))


def find_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint of a run dir or checkpoints dir (or the folder itself).

    `latest` names it; if that is missing or points at something incomplete, the newest
    complete `step_*` folder is used. Half-written `.tmp-*` folders are never candidates.
    """
    path = Path(path)
    if _complete(path):
        return path
    for root in (path / CHECKPOINTS, path):
        pointer = root / LATEST
        if pointer.is_file() and _complete(root / pointer.read_text().strip()):
            return root / pointer.read_text().strip()
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))
        if complete:
            return complete[-1]
    raise TrainingError(f"--resume {path}: no complete checkpoint found under {path}/{CHECKPOINTS}")


def checkpoint_world_size(ckpt: Path) -> int:
    """How many processes trained the checkpoint (1 for checkpoints older than that field)."""
    return int(json.loads((Path(ckpt) / "state.json").read_text()).get("world_size", 1))


def check_world_size(ckpt: Path, size: int) -> None:
    """A TrainingError unless the checkpoint was written by a run of `size` processes: the
    data slices, the random streams and the float summation order depend on it."""
    saved = checkpoint_world_size(ckpt)
    if saved != size:
        how = "in one process (without mlx.launch)" if saved == 1 else f"with mlx.launch -n {saved} (or a hostfile of {saved} hosts)"
        raise TrainingError(f"--resume {ckpt}: the checkpoint was written by {saved} process(es) and this run has "
                            f"{size}; resume it {how}")


def load_checkpoint(run: Run, ckpt: Path) -> None:
    """Restore adapters, optimizer, teacher and counters into a freshly set-up run."""
    check_world_size(ckpt, run.world.size)
    state = json.loads((ckpt / "state.json").read_text())
    teacher_version = state.pop("teacher_version", 0)
    run.state = TrainState(**state)
    weights = mx.load(str(ckpt / models.ADAPTER_WEIGHTS))
    run.model.load_weights(list(weights.items()), strict=False)
    run.optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    if run.teacher is not None:
        run.teacher.params = mx.load(str(ckpt / "teacher.safetensors"))
        run.teacher.version = teacher_version
    mx.eval(run.model.trainable_parameters(), run.optimizer.state)


# --------------------------------------------------------------------------- the loop


class Sinks:
    """metrics.jsonl / samples.jsonl, and wandb / tensorboard when asked and installed."""

    def __init__(self, run: Run, resume_step: int | None):
        self.dir = run.out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.samples_path = self.dir / "metrics.jsonl", self.dir / "samples.jsonl"
        if resume_step is None:
            for p in (self.metrics_path, self.samples_path):
                p.unlink(missing_ok=True)
        else:  # drop lines written after the checkpoint we resume from
            for p in (self.metrics_path, self.samples_path):
                if p.exists():
                    keep = [line for line in p.read_text().splitlines()
                            if line and json.loads(line)["step"] <= resume_step]
                    p.write_text("".join(line + "\n" for line in keep))
        self.extra = []
        log = run.recipe.logging
        if log.wandb:
            try:
                import wandb

                self.extra.append(("wandb", wandb.init(project="cast-mlx", name=run.recipe.name,
                                                       config=cfg.to_dict(run.recipe))))
            except ImportError:
                print("warning: logging.wandb is on but wandb is not installed; skipping it")
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore

                self.extra.append(("tensorboard", SummaryWriter(str(self.dir / "tensorboard"))))
            except ImportError:
                try:
                    from tensorboardX import SummaryWriter  # type: ignore

                    self.extra.append(("tensorboard", SummaryWriter(str(self.dir / "tensorboard"))))
                except ImportError:
                    print("warning: logging.tensorboard is on but no SummaryWriter is installed; skipping it")

    def write(self, metrics: dict, samples: list[dict]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        with open(self.samples_path, "a") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        for kind, sink in self.extra:
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if kind == "wandb":
                sink.log(numeric, step=metrics["step"])
            else:
                for k, v in numeric.items():
                    sink.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        for kind, sink in self.extra:
            sink.finish() if kind == "wandb" else sink.close()


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second SIGINT
    abandons the step at once (the last checkpoint stays valid)."""

    CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self):
        self.signal_name: str | None = None

    def install(self):
        import signal

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal_name is not None and name == "SIGINT":
                raise KeyboardInterrupt
            self.signal_name = name

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self):
        import signal

        for s, h in self.previous.items():
            signal.signal(s, h)

    @property
    def code(self) -> int:
        return self.CODES.get(self.signal_name, 1)


def eval_problems(recipe: cfg.Recipe) -> list:
    """The fixed held-out set for in-training eval (the arithmetic eval split never
    overlaps the train split; gsm8k/math use their test split)."""
    d = recipe.data
    split = "eval" if d.task == "arithmetic" else "test"
    return data.load_task(d.task, split, path=d.path, n=d.eval_size, level=d.level, seed=0)


def evaluate_now(run: Run, problems: list) -> dict:
    """Greedy accuracy of the current policy on `problems`, as `eval/*` metrics (mean and
    bootstrap CI over problems). In a data-parallel run each rank answers its contiguous
    slice and the per-problem results are gathered, so no rank waits idle."""
    from cast_mlx.eval import bootstrap_ci, evaluate, per_problem_values

    r, world = run.recipe, run.world
    t = time.perf_counter()
    mine = dist.shard_uneven(problems, world.rank, world.size)
    values = {"greedy/strict": [], "greedy/lenient": []}
    if mine:
        result = evaluate(run.model, run.tokenizer, mine, answer_format=r.data.answer_format,
                          system_prompt=r.data.system_prompt, max_new_tokens=r.sampling.max_new_tokens,
                          max_batch=r.sampling.max_batch, verifier=run.verifier, n_resamples=200)
        values = per_problem_values(result.problems, k=1)
    gathered = dist.gather_rows(world, {k: mx.array(v, dtype=mx.float32) for k, v in values.items()},
                                "gathering eval results")
    strict, lenient = gathered["greedy/strict"].tolist(), gathered["greedy/lenient"].tolist()
    low, high = bootstrap_ci(lenient, seed=0, n_resamples=200)
    return {"eval/accuracy": float(np.mean(lenient)), "eval/accuracy_ci_low": low,
            "eval/accuracy_ci_high": high, "eval/accuracy_strict": float(np.mean(strict)),
            "eval/n": len(problems), "time/eval": time.perf_counter() - t}


def run_info(run: Run) -> dict:
    r = run.recipe
    info = {
        "run": r.name,
        "model": f"{r.model.name} ({models.resolve_dtype(r.model.dtype)})",
        "algorithm": r.algorithm.name,
        "backend": str(mx.default_device()),
        "blas": blas.active_blas(),
        "out": str(run.out_dir),
    }
    if run.world.size > 1:
        info["processes"] = run.world.size
    return info


class NoSinks:
    """What ranks other than 0 write: nothing."""

    def write(self, metrics: dict, samples: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def resume_command(run: Run) -> str:
    command = f"python -m cast_mlx.train --resume {run.out_dir}"
    if run.world.size > 1:
        command += f" (under mlx.launch, with the same {run.world.size} processes)"
    return command


SIGNAL_OF_CODE = {code: name for name, code in StopRequest.CODES.items()}


def fit(run: Run, live: bool = True, resumed_from: Path | None = None) -> int:
    """Train to `schedule.steps`; returns the process exit code.

    Data parallel: every rank runs this loop in lockstep; only rank 0 prints, writes the
    metrics and the checkpoints. A stop signal seen by any rank stops all of them after the
    same step (the stop is agreed on between steps), and the ranks leave together once
    rank 0's last checkpoint is written."""
    from cast_mlx.dashboard import SilentView, make_view

    r, world = run.recipe, run.world
    main = world.is_main
    sinks = Sinks(run, run.state.step if resumed_from else None) if main else NoSinks()
    stop = StopRequest().install()
    if main:  # under mlx.launch stdout is a pipe; the launcher passes COLUMNS when on a terminal
        view = make_view(r.schedule.steps, run_info(run), live and r.logging.dashboard,
                         force_terminal=world.size > 1 and "COLUMNS" in os.environ)
    else:
        view = SilentView()
    last_saved = run.state.step if resumed_from else -1
    every = r.logging.eval_every
    held_out = eval_problems(r) if every else []

    def agreed_stop() -> int:  # 0: go on; else the exit code of the signal some rank got
        return dist.max_int(world, stop.code if stop.signal_name else 0, "agreeing on a stop")

    def save() -> None:
        if main:
            save_checkpoint(run)

    try:
        with view:
            dist.barrier(world, "start-up (every rank loads the model)")
            if resumed_from:
                view.message(f"resumed from {resumed_from} at step {run.state.step}")
            elif every:  # the starting point of the eval curve
                baseline = {"step": 0, **evaluate_now(run, held_out)}
                sinks.write(baseline, [])
                view.message(f"step 0 eval accuracy {baseline['eval/accuracy']:.3f} "
                             f"(n={baseline['eval/n']})")
            code = agreed_stop()
            while run.state.step < r.schedule.steps and not code:
                metrics, samples = train_step(run)
                if every and (run.state.step % every == 0 or run.state.step == r.schedule.steps):
                    metrics.update(evaluate_now(run, held_out))
                sinks.write(metrics, samples)
                view.update(metrics, samples)
                st = run.state.step
                if st % r.checkpoint.every == 0 or st == r.schedule.steps:
                    save()
                    last_saved = st
                code = agreed_stop()
            if last_saved != run.state.step:
                save()
            dist.barrier(world, "finishing (rank 0 writes the last checkpoint)")
            if code:
                view.message(f"{SIGNAL_OF_CODE.get(code, 'stop')}: stopped after step {run.state.step}; "
                             f"resume with {resume_command(run)}")
                return code
    except KeyboardInterrupt:
        if main:
            print(f"interrupted during step {run.state.step + 1}; the last checkpoint is intact: "
                  f"{resume_command(run)}")
        return 130
    finally:
        stop.restore()
        sinks.close()
        run.verifier.close()
    if main:
        view.message(f"done: {run.state.step} steps; adapters in {find_checkpoint(run.out_dir)}")
    return 0

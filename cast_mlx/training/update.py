"""The update stage: the learning-rate schedule and optimizer, micro-batched gradient
accumulation with the loss normalised over the whole batch, the gradient-norm clip, one
AdamW step on the LoRA tensors, and the NaN guard around it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from cast_mlx import config as cfg
from cast_mlx.algorithm.loss import loss_mask, loss_norm, rows_with_loss
from cast_mlx.engine import distributed as dist
from cast_mlx.engine.logprobs import length_buckets, token_logprobs, trimmed_batch
from cast_mlx.errors import TrainingError

LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean")  # policy_loss's metrics (+ kl_mean)


def lr_schedule(recipe: cfg.Recipe):
    """Linear warmup to `lr`, then constant / linear / cosine / polynomial (power 2) decay,
    over the optimizer's updates (`loss.num_iterations` per step)."""
    lr, steps = recipe.optimizer.lr, recipe.schedule.steps * recipe.loss.num_iterations
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


@dataclass
class UpdateResult:
    """What one update did: the global loss and grad norm, the loss's aux metrics (plus
    `entropy` and `rows_skipped`), whether the step was applied, and the name of the first
    non-finite input when the guard stopped it."""

    loss: float
    grad_norm: float
    aux: dict = field(default_factory=dict)
    applied: bool = False
    nonfinite: str | None = None
    behaviour: list = field(default_factory=list)  # per micro-batch: (rows, log-probs before the step)


def first_nonfinite(arrays: dict[str, mx.array], mask: mx.array) -> str | None:
    """The name of the first array with a NaN/inf (`[N, L]` ones over the real tokens of
    `mask` only: padding may hold anything), or None."""
    for name, a in arrays.items():
        if a.ndim == mask.ndim:
            a = mx.where(mask != 0, a, 0.0)
        if not bool(mx.all(mx.isfinite(a)).item()):
            return name
    return None


def guarded_update(model, optimizer, loss_fn, recipe: cfg.Recipe, world: dist.World, *, inputs: dict, **batch):
    """`update`, unless one of `inputs` (rewards, gaps, advantages) holds a NaN/inf: a NaN
    must not pass for "nothing to learn" (rows are picked by |A| > 0, false for NaN). Every
    rank takes the same decision, as the update has collectives."""
    nonfinite = first_nonfinite(inputs, batch["mask"])
    if dist.max_int(world, int(nonfinite is not None), "agreeing on finite advantages"):
        return UpdateResult(math.nan, math.nan, {"entropy": math.nan, "rows_skipped": 0}, False, nonfinite)
    mx.clear_cache()
    return update(model, optimizer, loss_fn, recipe, world, **batch)


def count_step(state, result: UpdateResult, all_skipped: bool, max_bad_steps: int) -> bool:
    """Advance `state.step` (the batch is consumed either way) and count consecutive steps
    whose update was refused; too many in a row end the run with a TrainingError. Returns
    whether the step counts as a good one (applied, or nothing to learn)."""
    state.step += 1
    if result.applied or all_skipped:
        state.bad_steps = 0
        return True
    state.bad_steps += 1
    if state.bad_steps >= max_bad_steps:
        what = (
            f"non-finite {result.nonfinite}"
            if result.nonfinite
            else f"loss {result.loss}, grad norm {result.grad_norm}"
        )
        raise TrainingError(
            f"{state.bad_steps} consecutive steps with non-finite values (last: {what}); "
            "lower optimizer.lr or check the data and the checkpoint"
        )
    return False


def accumulate_gradients(
    model,
    loss_fn,
    recipe: cfg.Recipe,
    norm,
    rows,
    contexts,
    tokens,
    mask,
    adv,
    truncated,
    ref_lp,
    frozen,
    phase,
    old_lp: list | None = None,
    advantages_of: Callable | None = None,
):
    """The LoRA gradient of the loss summed over micro-batches of `rows` (the rows with loss),
    with the loss's value, the entropy sum, the loss metrics' sums and each micro-batch's
    rows and log-probs: `(grads or None, total, entropy_sum, metric_sums, lps)`. `old_lp`:
    the behaviour log-probs of each micro-batch (the `lps` of an earlier call on the same
    rows); None: the policy's own (ratio 1: the first update on a batch). `advantages_of`:
    `(rows, lp_old) -> advantages`, for advantages that read `lp_old` (gaps that wait for
    the update); `adv` then only picked the rows. The update takes a step with it;
    `diagnose --vs-grpo` compares two of them on the same batch."""
    r = recipe
    temperature = r.sampling.temperature
    current: list[int] = []  # the micro-batch's rows, for advantages_of

    def micro_loss(model, batch, adv_mb, trunc_mb, ref_mb, old_mb):
        lp, ent = token_logprobs(model, batch, temperature, with_entropy=True)
        old = mx.stop_gradient(lp) if old_mb is None else old_mb
        if advantages_of is not None:
            adv_mb = advantages_of(current, old)
        value, metrics = loss_fn(lp, old, adv_mb, batch.mask, trunc_mb, ref_mb, norm)
        return value, (metrics, mx.stop_gradient((ent * batch.mask).sum()), mx.stop_gradient(lp))

    grad_fn = nn.value_and_grad(model, micro_loss)
    total, grads, entropy_sum = mx.array(0.0), None, mx.array(0.0)
    metric_names = LOSS_METRICS + (("kl_mean",) if ref_lp is not None else ())
    metric_sums = {k: mx.array(0.0) for k in metric_names}
    lps: list[tuple[list[int], mx.array]] = []
    # micro-batches of rows of similar length, each padded only to its own longest row
    # (and, with system.share_prefix, of one prompt: scored after one pass of it)
    share = r.system.share_prefix
    by_prompt = [contexts[i] for i in rows] if share else None
    buckets = length_buckets(mask[mx.array(rows)], r.optimizer.micro_batch_size, by_prompt) if rows else []
    phase("update", 0, len(buckets))
    for done, mb in enumerate(([rows[j] for j in b] for b in buckets), 1):
        idx = mx.array(mb)
        batch = trimmed_batch(contexts, tokens, mask, mb, share, frozen)
        length = batch.tokens.shape[1]
        ref_mb = None if ref_lp is None else ref_lp[idx, :length]
        old_mb = None if old_lp is None else old_lp[done - 1][1]
        current[:] = mb
        (value, (metrics, ent, lp)), g = grad_fn(model, batch, adv[idx, :length], truncated[idx], ref_mb, old_mb)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        total = total + value
        entropy_sum = entropy_sum + ent
        for k, v in metrics.items():
            metric_sums[k] = metric_sums[k] + v
        lps.append((mb, lp))
        mx.eval(grads, total, lp)
        phase("update", done, len(buckets))
    return grads, total, entropy_sum, metric_sums, lps


def update(
    model,
    optimizer,
    loss_fn,
    recipe: cfg.Recipe,
    world: dist.World,
    *,
    contexts,
    tokens,
    mask,
    adv,
    truncated,
    ref_lp=None,
    frozen=None,
    phase: Callable[..., None] = lambda *a: None,
    advantages_of: Callable | None = None,
) -> UpdateResult:
    """Accumulate gradients over micro-batches, clip, and apply one AdamW step (with
    `frozen`, the rollout's frozen-block states of these rows: only the top blocks run).

    Rows without loss (zero advantage everywhere with beta = 0, or truncated when masked)
    are skipped: they would add nothing to the loss or the gradient, and the normaliser is
    the whole batch's.

    In a data-parallel run the rows are this rank's; the normaliser is the global batch's,
    so the gradients summed over ranks are the single-process accumulated gradient, and
    the loss, grad norm and aux metrics returned are global (the same on every rank, so
    every rank takes the same decisions). A rank without loss-bearing rows still joins.

    With `loss.num_iterations` = mu > 1: mu such updates on the same batch; the behaviour
    log-probs are the first update's own (taken before its step), so the later updates'
    ratios move and their clip acts. The result is the first update's, with
    `iteration_metrics` in its aux; the updates stop at the first one not applied.

    `advantages_of` (`accumulate_gradients`; one update per batch only): the advantages of
    each micro-batch from its own forward's log-probs; `adv` then only picks the rows. The
    result's `behaviour` holds each micro-batch's rows and log-probs before the step.
    """
    r = recipe
    if advantages_of is not None and r.loss.num_iterations != 1:
        raise ValueError("advantages_of: needs loss.num_iterations = 1 (later updates would need fixed advantages)")
    norm = dist.global_norm(world, loss_norm(mask, truncated, mask_truncated=r.loss.mask_truncated))
    rows = rows_with_loss(adv, mask, truncated, beta=r.loss.beta, mask_truncated=r.loss.mask_truncated)
    # the tokens of the rows that go through the forward pass (for the mean entropy), and
    # those of them that carry loss (for the mean ratio)
    n_tok = mask[mx.array(rows)].sum() if rows else mx.array(0.0)
    carried = loss_mask(mask, truncated, r.loss.mask_truncated)
    loss_tok = carried[mx.array(rows)].sum() if rows else mx.array(0.0)
    batch = dict(
        contexts=contexts, tokens=tokens, mask=mask, adv=adv, truncated=truncated, ref_lp=ref_lp, adv_of=advantages_of
    )
    results: list[UpdateResult] = []
    old_lp = None  # the behaviour policy's log-probs: the first update's, taken before its step
    while len(results) < r.loss.num_iterations:
        result, lps = _one_update(
            model, optimizer, loss_fn, r, world, norm, rows, n_tok, loss_tok, batch | {"frozen": frozen}, phase, old_lp
        )
        results.append(result)
        if old_lp is None:
            old_lp = result.behaviour = lps
        if not result.applied:  # nothing to learn, or a non-finite loss: no further updates on it
            break
    if r.loss.num_iterations > 1:
        results[0].aux |= iteration_metrics(results)
    return results[0]


def iteration_metrics(results: list[UpdateResult]) -> dict:
    """With several updates per batch: each update's loss, clip fractions and mean ratio
    (`.../iter{k}`), their means over the updates made under the plain names (the first
    update's ratio is 1 by construction), and how many updates were applied."""
    out: dict = {"updates_applied": sum(x.applied for x in results)}
    for k, x in enumerate(results, 1):
        out[f"loss/iter{k}"] = x.loss
        for name in LOSS_METRICS:
            if name in x.aux:
                out[f"{name}/iter{k}"] = x.aux[name]
    for name in LOSS_METRICS:
        values = [x.aux[name] for x in results if name in x.aux]
        if values:
            out[name] = sum(values) / len(values)
    return out


def _one_update(model, optimizer, loss_fn, r, world, norm, rows, n_tok, loss_tok, batch, phase, old_lp):
    """One clipped update on the batch: accumulated gradients, clip, AdamW. Returns the
    `UpdateResult` and the micro-batches' log-probs before the step."""
    metric_names = LOSS_METRICS + (("kl_mean",) if batch["ref_lp"] is not None else ())
    grads, total, entropy_sum, metric_sums, lps = accumulate_gradients(
        model, loss_fn, r, norm, rows, batch["contexts"], batch["tokens"], batch["mask"], batch["adv"],
        batch["truncated"], batch["ref_lp"], batch["frozen"], phase, old_lp=old_lp, advantages_of=batch["adv_of"],
    )  # fmt: skip
    stats = dist.sum_values(
        world,
        {
            "loss": total,
            "entropy": entropy_sum,
            "tokens": n_tok,
            "loss_tokens": loss_tok,
            "rows": len(rows),
            "all_rows": batch["mask"].shape[0],
            **metric_sums,
        },
    )
    aux = {k: stats[k] for k in metric_names} if stats["rows"] else {}
    if stats["rows"] and stats["loss_tokens"]:
        # the loss's token metrics are sums over the whole batch's loss tokens; the mean
        # ratio is over the tokens of the rows that carry loss, not the skipped rows'
        aux["ratio_mean"] = stats["ratio_mean"] * float(norm.num_tokens) / stats["loss_tokens"]
    aux["entropy"] = stats["entropy"] / stats["tokens"] if stats["tokens"] else 0.0
    aux["rows_skipped"] = int(stats["all_rows"] - stats["rows"])
    if not stats["rows"]:  # nothing carries loss this step (e.g. all groups zero-variance)
        return UpdateResult(0.0, 0.0, aux, False), lps
    if grads is None:  # rows elsewhere but none here: join the sum with zeros
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
    grads = dist.sum_tree(world, grads)
    grads, grad_norm = optim.clip_grad_norm(grads, r.optimizer.max_grad_norm)
    loss_value, grad_norm = stats["loss"], grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        return UpdateResult(loss_value, grad_norm, aux, False), lps
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return UpdateResult(loss_value, grad_norm, aux, True), lps

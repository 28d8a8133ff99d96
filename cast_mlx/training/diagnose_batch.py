"""The model-facing part of `cast_mlx.diagnose`: sample, verify and score a batch with the
project's rollout, verifier, teacher contexts and chunked scoring (`collect`), give the
model the LoRA views a lagged teacher needs (`lora_views`), and take the update's LoRA
gradient of two advantage rules on the same batch (`gradient_comparison`). The numbers
are computed from these arrays in `cast_mlx.training.diagnose`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence, cast

import numpy as np

from cast_mlx.tasks import data
from cast_mlx.training.diagnose import Collected, compare_vectors, token_class, token_weights


def collect(
    model,
    tokenizer,
    problems,
    *,
    contexts: Sequence[str],
    group_size: int,
    sampling,
    answer_format: str,
    system_prompt: str | None,
    reward: str,
    seed: int,
    micro_batch: int = 8,
    scorer: Callable | None = None,
    teacher_params: dict | None = None,
) -> Collected:
    """Sample, verify and score. `scorer(contexts, tokens, mask, lp_old)` returns the
    teacher's log-probs `[N, L]` (default: the model's chunked scoring at the sampling
    temperature with the LoRA tensors `teacher_params` swapped in, or the policy itself
    when None; `lp_old` is the sampler's); tests pass a fake one with known gaps. For the
    `same` context `lp_old` is the policy's own chunked scoring, as in training, so that a
    teacher equal to the policy gives exactly 0."""
    import mlx.core as mx

    from cast_mlx.algorithm.teacher import model_logprobs, row_contexts, swapped_lora
    from cast_mlx.config import RewardConfig
    from cast_mlx.engine import rollout
    from cast_mlx.tasks import verify
    from cast_mlx.tasks.rewards import judge_rows

    seconds = {}
    t = time.perf_counter()
    prompts = [data.prompt_ids(tokenizer, p, system_prompt, answer_format) for p in problems]
    eos_ids = set(tokenizer.eos_token_ids)
    out = rollout.generate_groups(model, prompts, group_size, sampling, eos_ids, key=mx.random.key(seed))
    mx.eval(out.tokens, out.logprobs)
    seconds["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = rollout.decode_completions(tokenizer, out)
    golds = [problems[i // group_size].gold for i in range(len(texts))]
    with verify.Verifier(workers=1) as verifier:  # the training step's judge, without plug-ins
        judged = judge_rows(
            golds,
            texts,
            fns=[],
            verifier=verifier,
            answer_format=answer_format,
            strictness=reward,
            reward=RewardConfig(),
            max_new_tokens=sampling.max_new_tokens,
            binary=True,
        )
    correct = np.array([bool(v) for v in judged.values])
    seconds["verify"] = time.perf_counter() - t

    tokens, mask = out.tokens, out.mask

    def own(ctx, toks, msk, lp_old=None):  # the policy's log-probs
        return model_logprobs(model, ctx, toks, msk, sampling.temperature, micro_batch, share_prefix=True)

    if scorer is None:

        def scorer(ctx, toks, msk, lp_old):
            if teacher_params is None:
                return own(ctx, toks, msk)
            with swapped_lora(model, teacher_params):
                lp = own(ctx, toks, msk)
                mx.eval(lp)
            return lp

    gaps = {}
    instruction = data.ANSWER_INSTRUCTIONS[answer_format]
    refs = [p.solution or p.gold for p in problems]
    for name in contexts:
        t = time.perf_counter()
        rows = row_contexts(name, tokenizer, [p.question for p in problems], prompts, refs, instruction, group_size)
        lp_old = own(rows, tokens, mask) if name == "same" else out.logprobs
        lp_t = scorer(rows, tokens, mask, lp_old)
        gaps[name] = np.array((lp_t - lp_old) * mask)
        seconds[f"teacher/{name}"] = time.perf_counter() - t

    finished = np.array([r == "eos" for r in out.finish_reasons])
    truncated = mx.array((~finished).astype(np.float32))
    special, eos = rollout.special_and_eos(tokens, out.lengths, truncated, mask, rollout.special_token_ids(tokenizer))
    ids, is_special = np.array(tokens), np.array(special) > 0
    texts_of = {i: tokenizer.decode([i]) for i in np.unique(ids).tolist()}
    classes = np.vectorize(lambda i, sp: token_class(texts_of[i], bool(sp)), otypes=[object])(ids, is_special)
    lengths = np.array(out.lengths)
    is_eos = np.array(eos) > 0
    return Collected(
        gaps,
        np.array(mask),
        correct,
        np.array(out.prompt_index),
        classes.astype(str),
        is_eos,
        lengths,
        ~finished,
        seconds,
        {
            "contexts": [prompts[i // group_size] for i in range(len(texts))],
            "tokens": tokens,
            "mask": mask,
            "truncated": truncated,
            "special": special,
            "rewards": mx.array(correct.astype(np.float32)),
        },
    )


def lora_views(model, recipe, policy_adapter: str | None, teacher_adapter: str | None) -> dict | None:
    """Give the model LoRA layers if it has none and return the teacher's LoRA tensors
    (None: the policy itself). `teacher_adapter` is an adapter folder or "base" (adapters
    off); without a policy adapter the policy is the base model, with the teacher's layers
    (or, with no teacher adapter either, the recipe's `lora` section, as at step 0).
    Raises ValueError when the two adapters' layers differ."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from cast_mlx.algorithm.teacher import adapters_off
    from cast_mlx.engine import models

    if policy_adapter is None:
        if teacher_adapter not in (None, "base"):
            from mlx_lm.tuner.utils import load_adapters

            load_adapters(model, teacher_adapter)
            teacher = models.lora_state(model)
            model.update(tree_unflatten(list(adapters_off(teacher).items())))  # the policy: the base model
            return teacher
        lora = recipe.lora
        models.attach_lora(
            model, rank=lora.rank, alpha=lora.alpha, dropout=0.0, num_layers=lora.num_layers, keys=lora.keys,
            seed=recipe.seed,
        )  # fmt: skip
    policy = models.lora_state(model)
    if teacher_adapter is None:
        return None
    if teacher_adapter == "base":
        return adapters_off(policy)
    teacher = cast("dict[str, mx.array]", mx.load(str(Path(teacher_adapter) / models.ADAPTER_WEIGHTS)))
    same_shapes = teacher.keys() == policy.keys() and all(teacher[k].shape == policy[k].shape for k in policy)
    if not same_shapes:
        raise ValueError(
            f"--teacher-adapter {teacher_adapter}: its LoRA layers differ from the policy's (rank, layers or keys)"
        )
    return teacher


def gradient_comparison(model, recipe, c: Collected, group_size: int) -> dict:
    """On the collected batch: the LoRA gradient of the recipe's algorithm (with the gaps of
    its teacher context; 0 for `same` when that was not measured: the teacher equals the
    policy right after a refresh) against GRPO's, as the update computes them (same loss,
    micro-batches and normaliser). Does the teacher change anything here?"""
    import dataclasses

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from cast_mlx.algorithm.compiled import CompiledPolicyLoss
    from cast_mlx.algorithm.estimators import compute_advantages
    from cast_mlx.algorithm.facts import facts_of
    from cast_mlx.algorithm.loss import loss_norm, rows_with_loss
    from cast_mlx.training.update import accumulate_gradients

    assert c.batch is not None, "gradient_comparison needs collect()'s batch"
    b, a, L = c.batch, recipe.algorithm, recipe.loss
    params = {k: v for k, v in dataclasses.asdict(a).items() if k != "name"}
    measured = c.gaps.get(recipe.teacher.context)
    gaps = mx.zeros(b["mask"].shape) if measured is None else mx.array(measured)
    common = dict(group_size=group_size, special=b["special"])
    variant, _ = compute_advantages(a.name, b["rewards"], gaps, b["mask"], **common, **params)
    grpo_params = params | {"scale_rewards": facts_of("grpo").scale_rewards}
    grpo, _ = compute_advantages("grpo", b["rewards"], gaps, b["mask"], **common, **grpo_params)
    loss_fn = CompiledPolicyLoss.of(dataclasses.replace(L, beta=0.0))  # the policy loss alone (no KL reference here)
    norm = loss_norm(b["mask"], b["truncated"], mask_truncated=L.mask_truncated)

    def gradient(adv) -> np.ndarray | None:
        rows = rows_with_loss(adv, b["mask"], b["truncated"], beta=0.0, mask_truncated=L.mask_truncated)
        grads = accumulate_gradients(
            model, loss_fn, recipe, norm, rows, b["contexts"], b["tokens"], b["mask"], adv, b["truncated"],
            None, None, lambda *_: None,
        )[0]  # fmt: skip
        if grads is None:
            return None
        flat = sorted(tree_flatten(grads), key=lambda kv: kv[0])
        return np.concatenate([np.array(v, dtype=np.float64).ravel() for _, v in flat])

    content = (np.array(b["mask"]) > 0) & (np.array(b["special"]) == 0)
    return {
        "algorithm": a.name,
        "context": recipe.teacher.context,
        **compare_vectors(gradient(variant), gradient(grpo)),
        **token_weights(np.array(variant), np.array(grpo), content, c.correct),
    }

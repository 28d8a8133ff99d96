"""Where one update micro-batch spends its time: the parts of the policy's forward and backward.

On the speed workload's shapes (`bench_step.py`): the embedded SmolLM2-135M-Instruct in its
default dtype (float32 on the CPU), LoRA rank 8 on all seven projections of the last 8
blocks, one prompt and `--rows` completions of `--length` tokens (random ids: the time does
not depend on them). Each part is timed `--repeats` times after a warm-up; the median is
reported, in seconds:

- `rollout_s` / `rollout_keep_states_s`: sampling the rows (prompt prefill + decode), without
  and with the frozen-block states kept (`generate_groups(keep_states=k)`);
- `backbone_all_blocks_s`: the hidden states of the completion positions through all blocks
  (the prompt once, `system.share_prefix`); `backbone_top_blocks_s`: the same from the kept
  states, through the blocks above the split only;
- `head_matmul_s`, `head_logprobs_s`, `head_logprobs_entropy_s`: the vocabulary head alone,
  then with the log-softmax, then with the entropy too;
- `grad_all_blocks_s` / `grad_top_blocks_s`: `value_and_grad` of the summed log-probs and
  entropies (what the update runs per micro-batch), without and with the kept states.

Prints ONE JSON line. Usage: python scripts/profile_update.py [--rows 8] [--length 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cast_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from cast_mlx.engine import logprobs, models, rollout  # noqa: E402
from cast_mlx.engine.blas import active_blas, thread_settings  # noqa: E402
from cast_mlx.engine.head import chunk_logprobs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import cpu_name, median_seconds  # noqa: E402

KEYS = [f"self_attn.{k}_proj" for k in "qkvo"] + [f"mlp.{k}_proj" for k in ("gate", "up", "down")]


def workload_model():
    """The embedded model in its default dtype with the speed workload's LoRA (rank 8, all seven
    projections of the last 8 blocks): `(model, tokenizer)`."""
    model, tok = models.load(models.DEFAULT_MODEL, "auto")
    models.attach_lora(model, rank=8, alpha=16, dropout=0.0, num_layers=8, keys=KEYS)
    return model, tok


def median_time(fn, repeats: int) -> float:
    return round(median_seconds(fn, repeats), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    model, tok = workload_model()
    split = logprobs.frozen_blocks(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 47 * 86?"}], add_generation_prompt=True)
    params = rollout.SamplingParams(temperature=1.0, max_new_tokens=args.length)
    eos = []  # no EOS: every row runs to the cap, so the shapes are the asked ones

    def sample(keep: int):
        return rollout.generate_groups(model, [prompt], args.rows, params, eos, key=0, keep_states=keep)

    out = sample(split)
    line = {
        "bench": "update_profile",
        "machine": cpu_name(),
        "blas": active_blas(),
        "threads": thread_settings(),
        "mlx": mx.__version__,
        "rows": args.rows,
        "length": args.length,
        "prompt_tokens": len(prompt),
        "split": split,
        "blocks": len(model.model.layers),
        "repeats": args.repeats,
        "rollout_s": median_time(lambda: sample(0), args.repeats),
        "rollout_keep_states_s": median_time(lambda: sample(split), args.repeats),
    }
    # non-zero LoRA B (a trained adapter), so that every gradient is a real one
    noise = [(k, 1e-3 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten([(k, v) for k, v in noise if k.endswith("lora_b")]))
    contexts, rows = [prompt] * args.rows, list(range(args.rows))
    full = logprobs.trimmed_batch(contexts, out.tokens, out.mask, rows)
    kept = logprobs.trimmed_batch(contexts, out.tokens, out.mask, rows, frozen=out.frozen)
    backbone, head = logprobs.backbone_and_head(model)
    states = logprobs._predicting_states(model, backbone, full)
    mx.eval(states)
    line["backbone_all_blocks_s"] = median_time(
        lambda: mx.eval(logprobs._predicting_states(model, backbone, full)), args.repeats
    )
    line["backbone_top_blocks_s"] = median_time(
        lambda: mx.eval(logprobs._predicting_states(model, backbone, kept)), args.repeats
    )
    line["head_matmul_s"] = median_time(lambda: mx.eval(head(states)), args.repeats)
    for name, entropy in (("head_logprobs_s", False), ("head_logprobs_entropy_s", True)):
        line[name] = median_time(
            lambda e=entropy: mx.eval(chunk_logprobs(head, states, full.tokens, 1.0, e)), args.repeats
        )

    def objective(m, batch):
        lp, ent = logprobs.token_logprobs(m, batch, 1.0, with_entropy=True)
        return lp.sum() + mx.stop_gradient(ent.sum())

    grad = nn.value_and_grad(model, objective)
    line["grad_all_blocks_s"] = median_time(lambda: mx.eval(grad(model, full)), args.repeats)
    line["grad_top_blocks_s"] = median_time(lambda: mx.eval(grad(model, kept)), args.repeats)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

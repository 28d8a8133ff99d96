"""Where one teacher forward spends its time: a per-op profile against the matmul floor.

On the speed workload's shapes (`bench_step.py`): the embedded SmolLM2-135M-Instruct in its
default dtype (float32 on the CPU), LoRA rank 8 on all seven projections of the last 8 blocks,
a snapshot teacher on an answer-free context (one prompt of ~70 tokens, `--rows` completions of
`--length` tokens, the shared prefix: the context once, then every completion token), scored
as the trainer scores it: packed (`Teacher.score_packed`: every position through the blocks
and the head as one matrix) where the model allows, else `--bucketed` (`Teacher.score`: the
rows as one batch after a pass of the context).

- `teacher_forward_s`: the whole call, lazily evaluated as in training (median of `--repeats`);
- `parts`: the same forward with every module's output evaluated where it is produced, each
  module's own time (its children's subtracted), summed over the blocks by kind: the seven
  projections (with their LoRA), `attention_core` (RoPE, the cache, scaled dot-product
  attention, reshapes), `swiglu`, `norm`, `block_rest` (the residual adds), `backbone_rest`
  (embedding, final norm, the cache's repeat to the rows) and `head` (the vocabulary matmul,
  log-softmax and gathers, by difference; packed, the pack's building too). `eager_total_s`
  is their sum: what the forward costs with no lazy fusion;
- `floor_s`: the forward's matmul FLOPs at `matmul_gflops` (bench_step's best rate on a
  block's largest matmul), and each part's share of the matmul FLOPs.

Prints ONE JSON line. Usage: python scripts/profile_teacher.py [--rows 8] [--length 128] [--repeats 3] [--bucketed]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import cast_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from cast_mlx.algorithm.teacher import Teacher  # noqa: E402
from cast_mlx.engine import logprobs, packed  # noqa: E402
from cast_mlx.engine.blas import active_blas, thread_settings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import cpu_name, matmul_gflop_by_part, matmul_gflops, median_seconds  # noqa: E402
from profile_update import workload_model  # noqa: E402

QUESTION = "Solve step by step and give the final answer after ####. What is 47 * 86 - 1234 + 56?"


class Clock:
    """Inclusive seconds per module path, each output evaluated where it is produced."""

    def __init__(self):
        self.inclusive: dict[str, float] = defaultdict(float)

    def wrap(self, model: nn.Module) -> None:
        for path, module in model.named_modules():
            parent = path.rsplit(".", 1)[0]
            if path and not parent.endswith("_proj"):  # a projection is timed with its LoRA
                module.__class__ = self._timed(type(module), path)

    def _timed(self, cls, path):
        clock = self

        class Timed(cls):  # type: ignore[misc, valid-type]
            def __call__(self, *args, **kwargs):
                mx.eval([a for a in args if isinstance(a, mx.array)])  # the caller's lazy work is the caller's
                start = time.perf_counter()
                out = super().__call__(*args, **kwargs)
                mx.eval(out)
                clock.inclusive[path] += time.perf_counter() - start
                return out

        Timed.__name__ = cls.__name__
        return Timed


def kind(path: str) -> str:
    last = path.rsplit(".", 1)[-1]
    if last.endswith("_proj"):
        return last
    if "norm" in last:
        return "norm"
    rest = "block_rest" if "layers." in path else "backbone_rest"
    return {"self_attn": "attention_core", "mlp": "swiglu"}.get(last, rest)


def exclusive(inclusive: dict[str, float]) -> dict[str, float]:
    """Each path's time minus its direct children's."""
    own = dict(inclusive)
    for path, seconds in inclusive.items():
        parent = path.rsplit(".", 1)[0] if "." in path else None
        while parent is not None and parent not in inclusive:
            parent = parent.rsplit(".", 1)[0] if "." in parent else None
        if parent is not None:
            own[parent] -= seconds
    return own


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucketed", action="store_true", help="score as one bucket (Teacher.score), not packed")
    args = ap.parse_args(argv)

    model, tok = workload_model()
    teacher = Teacher.create(model)
    context = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    vocab = model.model.embed_tokens.weight.shape[0]
    tokens = mx.random.randint(0, vocab, (args.rows, args.length), key=mx.random.key(0))
    mask = mx.ones(tokens.shape)
    batch = logprobs.trimmed_batch([context] * args.rows, tokens, mask, list(range(args.rows)))
    use_packed = packed.supported(model) and not args.bucketed

    def forward():
        if use_packed:  # as the trainer's teacher stage scores contexts of the teacher's own
            return teacher.score_packed(model, [context] * args.rows, tokens, mask, 1.0, tokens.size + len(context))
        return teacher.score(model, batch, 1.0)

    completion = args.rows * args.length
    gflop = matmul_gflop_by_part(model, len(context) + completion, completion)  # before the clock wraps
    forward()
    lazy = median_seconds(forward, args.repeats)
    clock = Clock()
    clock.wrap(model)
    forward()  # a warm-up of the eager path
    clock.inclusive.clear()
    runs = max(1, args.repeats)
    start = time.perf_counter()
    for _ in range(runs):
        forward()
    eager = (time.perf_counter() - start) / runs
    parts: dict[str, float] = defaultdict(float)
    for path, seconds in exclusive(clock.inclusive).items():
        parts["backbone_rest" if path == "model" else kind(path)] += seconds / runs
    parts["head"] = eager - sum(parts.values())  # what the modules did not take: head, log-softmax, gather
    args_ = model.args
    rate = matmul_gflops(args_.hidden_size, args_.intermediate_size)
    floor = sum(gflop.values()) / rate
    line = {
        "bench": "teacher_profile",
        "machine": cpu_name(),
        "blas": active_blas(),
        "threads": thread_settings(),
        "mlx": mx.__version__,
        "rows": args.rows,
        "length": args.length,
        "context_tokens": len(context),
        "repeats": runs,
        "packed": use_packed,
        "teacher_forward_s": round(lazy, 4),
        "eager_total_s": round(eager, 4),
        "matmul_gflop": round(sum(gflop.values()), 2),
        "matmul_gflops": round(rate, 1),
        "floor_s": round(floor, 4),
        "forward_vs_floor": round(lazy / floor, 2),
        "parts": {k: round(v, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "parts_floor_s": {k: round(v / rate, 4) for k, v in sorted(gflop.items(), key=lambda kv: -kv[1])},
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

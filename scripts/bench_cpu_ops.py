"""The CPU backend's cost of the ops a step is made of: why `fastmath` and the thread settings.

Times, in one process, medians of `--repeats` runs after a warm-up:

- elementwise ops on a `[8, 64, 1536]` float32 array (an MLP activation of one micro-batch),
  in ns per element: add, exp, power(2, .), sigmoid, `nn.silu(g) * u` (mlx-lm's SwiGLU) and
  `fastmath.swiglu`, forward and with the gradient;
- the head's exponential pass over `[8, 64, 49152]` logits: `mx.exp` against `fastmath.exp`;
- matmuls, in ms: attention's batched `[8, 3, 3, 64, 64] @ [8, 3, 1, 64, 64]` (hundreds of small
  GEMM calls: where waking BLAS threads costs most), and `[M, 576] @ [576, 1536]` for M = 16
  (a decode step) and 512 (a micro-batch);
- a micro-batch's attention in one block (`[8, 9, 64, 64]` queries after a 40-token context):
  MLX's `scaled_dot_product_attention`, and the softmax of its scores alone, MLX's and with
  `power(2, .)` for the exponential;
- a decode step of the embedded model with 100 positions cached, in ms: the whole step
  (blocks, norm, head) for 16 streams and for 1; for 16 streams: one block, that block's
  seven matmuls alone (the rest is the cost of its other ~30 small ops), all 30 blocks, the
  head's matmul; then all blocks with the recipes' LoRA attached (rank 8, last 8 blocks), as
  trained and merged as for sampling;
- `read_weights_ms`: numpy's sum over all the model's weights, the bytes every decode step
  reads once: that step's floor on this machine's memory.

Run it under different thread settings to compare them, e.g. `OMP_WAIT_POLICY=PASSIVE python
scripts/bench_cpu_ops.py`; the line records them (`threads`). Prints ONE JSON line.
Usage: python scripts/bench_cpu_ops.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from cast_mlx.engine import fastmath, kv_forward, models
from cast_mlx.engine.blas import active_blas, thread_settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import median_seconds  # noqa: E402
from profile_update import KEYS  # noqa: E402  (the recipes' LoRA projections)


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def decode_costs(model, repeats: int) -> dict:
    """One decode step of 16 streams of the embedded model, 100 positions cached: a block (with
    its cache), the seven matmuls of a block alone, all 30 blocks, and the head's matmul."""
    head = kv_forward.plain_head(model)
    cache, _, _ = kv_forward.prefill(model, head, [[1] + [28] * 99, [1] + [29] * 99], room=8)
    kv_forward.filter_cache(cache, np.repeat(np.arange(2), 8))
    mx.eval([c.state for c in cache])
    x = mx.random.normal((16, 1, model.args.hidden_size), key=mx.random.key(7))
    mx.eval(x)
    layers = model.model.layers

    def rewind(caches):  # the step's write is undone, so every repeat sees 100 positions
        for c in caches:
            c.trim(1)

    mask = create_attention_mask(x, cache[0])  # as the decode loop builds it

    def blocks(n):
        h = x
        for layer, c in zip(layers[:n], cache[:n]):
            h = layer(h, mask, c)
        mx.eval(h)
        rewind(cache[:n])
        return h

    attn, mlp = layers[0].self_attn, layers[0].mlp
    weights = [m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    weights += [m.weight for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    flat = x[:, 0, :]
    inputs = [flat if w.shape[1] == flat.shape[1] else mx.zeros((16, w.shape[1])) for w in weights]
    mx.eval(inputs)

    def step(rows):  # a whole decode step (blocks, norm, head) of `rows` streams
        ids = mx.full((rows, 1), 30, dtype=mx.int32)
        caches = cache if rows == 16 else one
        logits = kv_forward.next_logits_mx(model, head, ids, caches)
        mx.eval(logits)
        rewind(caches)
        return logits

    one, _, _ = kv_forward.prefill(model, head, [[1] + [28] * 99], room=8)
    mx.eval([c.state for c in one])
    out = {
        "step_16_streams": round(median_ms(lambda: step(16), max(3, repeats // 3)), 1),
        "step_1_stream": round(median_ms(lambda: step(1), max(3, repeats // 3)), 1),
        "one_block": round(median_ms(lambda: blocks(1), repeats), 3),
        "its_seven_matmuls": round(median_ms(lambda: [a @ w.T for a, w in zip(inputs, weights)], repeats), 3),
        "all_blocks": round(median_ms(lambda: blocks(len(layers)), max(3, repeats // 3)), 1),
        "head_matmul": round(median_ms(lambda: head @ flat.T, repeats), 3),
    }
    # the recipes' LoRA (rank 8, all seven projections of the last 8 blocks), as trained and
    # as sampled (merged into the linears, `models.merged_lora`)
    models.attach_lora(model, rank=8, alpha=16, dropout=0.0, num_layers=8, keys=KEYS)
    model.eval()
    out["all_blocks_lora"] = round(median_ms(lambda: blocks(len(layers)), max(3, repeats // 3)), 1)
    with models.merged_lora(model):
        out["all_blocks_lora_merged"] = round(median_ms(lambda: blocks(len(layers)), max(3, repeats // 3)), 1)
    return out


def attention_costs(repeats: int) -> dict:
    """A micro-batch's attention in one block (8 rows of 64 positions after a 40-token
    context; 9 query heads over 3 key/value heads): MLX's fused call, then the softmax of its
    scores alone, as MLX computes it and with `power(2, .)` for the exponential."""
    keys = mx.random.split(mx.random.key(1), 3)
    q = mx.random.normal((8, 9, 64, 64), key=keys[0])
    k, v = (mx.random.normal((8, 3, 104, 64), key=key) for key in keys[1:])
    scores = mx.random.normal((8, 9, 64, 104))
    mx.eval(q, k, v, scores)

    def power2_softmax(x):
        e = mx.power(2.0, (x - x.max(axis=-1, keepdims=True)) * fastmath.LOG2E)
        return e / e.sum(axis=-1, keepdims=True)

    sdpa = mx.fast.scaled_dot_product_attention
    return {
        "sdpa_causal": round(median_ms(lambda: sdpa(q, k, v, scale=0.125, mask="causal"), repeats), 3),
        "softmax": round(median_ms(lambda: mx.softmax(scores, axis=-1, precise=True), repeats), 3),
        "softmax_power2": round(median_ms(lambda: power2_softmax(scores), repeats), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    r = args.repeats
    # First, as in training: loading imports transformers, and with it torch's OpenMP runtime,
    # which changes how MKL's threads behave (passive waiting costs most with it loaded).
    model, _ = models.load(models.DEFAULT_MODEL, "auto")
    keys = mx.random.split(mx.random.key(0), 6)
    g = mx.random.normal((8, 64, 1536), key=keys[0]) * 3
    u = mx.random.normal((8, 64, 1536), key=keys[1])
    z = mx.random.normal((8, 64, 49152), key=keys[2]) * 3 - 10
    mx.eval(g, u, z)

    def per_element(fn):
        return round(median_ms(fn, r) * 1e6 / g.size, 2)

    slow_grad = mx.grad(lambda a: (nn.silu(a) * u).sum())
    fast_grad = mx.grad(lambda a: fastmath.swiglu(a, u).sum())
    line: dict = {
        "bench": "cpu_ops",
        "device": str(mx.default_device()),
        "blas": active_blas(),
        "threads": thread_settings(),
        "torch_loaded": "torch" in sys.modules,
        "ns_per_element": {
            "add": per_element(lambda: g + u),
            "exp": per_element(lambda: mx.exp(g)),
            "power2": per_element(lambda: mx.power(2.0, g)),
            "sigmoid": per_element(lambda: mx.sigmoid(g)),
            "silu_times_up": per_element(lambda: nn.silu(g) * u),
            "fast_swiglu": per_element(lambda: fastmath.swiglu(g, u)),
            "silu_times_up_grad": per_element(lambda: slow_grad(g)),
            "fast_swiglu_grad": per_element(lambda: fast_grad(g)),
        },
        "head_exp_ms": {
            "mx_exp": round(median_ms(lambda: mx.exp(z).sum(axis=-1), max(3, r // 3)), 1),
            "fastmath_exp": round(median_ms(lambda: fastmath.exp(z, cpu=True).sum(axis=-1), max(3, r // 3)), 1),
        },
    }
    q = mx.random.normal((8, 3, 3, 64, 64), key=keys[3])
    k = mx.random.normal((8, 3, 1, 64, 64), key=keys[4])
    w = mx.random.normal((1536, 576), key=keys[5])
    mx.eval(q, k, w)
    matmul = {"attention_scores_8x9x64x64": round(median_ms(lambda: q @ k.swapaxes(-1, -2), r), 3)}
    for m in (16, 512):
        x = mx.random.normal((m, 576), key=mx.random.key(m))
        mx.eval(x)
        matmul[f"m{m}_576x1536"] = round(median_ms(lambda x=x: x @ w.T, r), 3)
    line["matmul_ms"] = matmul
    line["attention_ms"] = attention_costs(r)
    # a decode step reads every weight once: reading them (numpy's sum) is its floor
    weights = np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.parameters())])
    line["read_weights_ms"] = {
        f"{weights.nbytes / 1e6:.0f}_MB": round(median_ms(lambda: mx.array(weights.sum()), r), 1)
    }
    line["decode_ms"] = decode_costs(model, r)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

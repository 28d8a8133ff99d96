"""The output head's log-softmax at given tokens: log-probs (and entropies) of `softmax(head(h) / T)`
without keeping `[positions, vocab]` logits, with a hand-written vjp. `logprobs` runs it on
the states that predict a batch's completion tokens; packed scoring on its packs. Why the
backward is written out: docs/design.md, "Log-probs"."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cast_mlx.engine import fastmath, hostmath


def transpose_of(head):
    """`dz -> dz @ W` for a head `h -> h @ W.T` without bias (an `nn.Linear`, a tied
    `nn.Embedding`, or their quantized kinds: a quantized matmul, untransposed), else None:
    the head's vjp then comes from `mx.vjp`, which builds the head's forward again."""
    owner = getattr(head, "__self__", head)  # `embed_tokens.as_linear` is a bound method
    if not isinstance(owner, nn.Module) or "bias" in owner:
        return None
    if type(owner) in (nn.Linear, nn.Embedding):
        weight = owner.weight
        return lambda dz: dz.astype(weight.dtype) @ weight
    if type(owner) in (nn.QuantizedLinear, nn.QuantizedEmbedding):
        q = owner
        return lambda dz: mx.quantized_matmul(
            dz.astype(q.scales.dtype), q.weight, scales=q.scales, biases=q.get("biases"), transpose=False,
            group_size=q.group_size, bits=q.bits, mode=q.mode,
        )  # fmt: skip
    return None


KEEP_EXP: bool | None = None  # the head's backward reads the forward's exponentials; None: on the CPU only


def logprobs_fn(head, tokens, inv_temp: float, with_entropy: bool):
    """`h -> (log-prob of tokens, entropy, logsumexp, e, sum e)` under `softmax(head(h) / T)`
    (e = exp(z - max z), an output on the CPU only), with a hand-written vjp.

    The `[rows, positions, vocab]` logits exist only inside it. The backward applies the
    closed-form gradients, d lp / dz = onehot - p and d H / dz = -p (z - E_p[z]), in a few
    elementwise passes, where autodiff of the forward re-ran every op of the logsumexp and
    the entropy and then differentiated each of them: on a 49k vocabulary those passes, not
    the matmul, were most of an update's head cost. Two ways (`KEEP_EXP`):
    - on the CPU the backward reads the forward's `e` (kept until then) and writes `g` at the
      tokens in place of a vocabulary-wide onehot; the entropy, which the update only
      reports, passes no gradient: two passes over the vocabulary where the other way
      runs the head's matmul again and six (docs/speed.md, "The head's backward on the CPU");
    - elsewhere (a Mac, a GPU: where memory is what limits, and what the memory plan's laws
      were measured on) it recomputes the logits, as `mx.checkpoint` would."""
    transpose = transpose_of(head)
    keep = fastmath.on_cpu() if KEEP_EXP is None else KEEP_EXP

    def logits_of(h):
        z = head(h).astype(mx.float32)
        return z if inv_temp == 1.0 else z * inv_temp  # x * 1 is x: skip a pass over the vocabulary

    @mx.custom_function
    def forward(h):
        z = logits_of(h)
        picked = mx.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
        # one exp pass for both: lse = m + log sum e, H = lse - sum(e z) / sum e, e = exp(z - m)
        top = mx.stop_gradient(z.max(axis=-1, keepdims=True))
        e = fastmath.exp(z - top)
        total = vocab_sum(e)
        lse = top[..., 0] + mx.log(total)
        entropy = lse - vocab_sum(e * z) / total if with_entropy else mx.zeros_like(picked)
        # e and its sum, for the backward: p = e / sum, no pass of its own in a forward
        return picked - lse, entropy, lse, e if keep else mx.zeros((1,)), total

    @forward.vjp
    def backward(h, cotangents, outputs):  # one primal: MLX passes the array itself
        g_lp, g_ent = cotangents[:2]  # the logsumexp, e and its sum are internal outputs
        _, entropy, lse, e, total = outputs
        if keep:  # -g p = e * (-g / sum e), then + g at each position's token (no onehot)
            dz = e * (-g_lp / total)[..., None]
            at = tokens[..., None]
            dz = mx.put_along_axis(dz, at, mx.take_along_axis(dz, at, axis=-1) + g_lp[..., None], axis=-1)
        else:
            z = logits_of(h)
            weight = g_lp[..., None]
            if with_entropy:  # E_p[z] = lse - H
                weight = weight + g_ent[..., None] * (z - (lse - entropy)[..., None])
            onehot = mx.arange(z.shape[-1]) == tokens[..., None]
            dz = g_lp[..., None] * onehot - fastmath.exp(z - lse[..., None]) * weight
        if inv_temp != 1.0:
            dz = dz * inv_temp
        if transpose is not None:
            return transpose(dz).astype(h.dtype)
        return mx.vjp(lambda x: head(x).astype(mx.float32), [h], [dz])[1][0]

    return forward


def vocab_sum(x: mx.array) -> mx.array:
    """`x.sum(axis=-1)` in blocks of up to 256 terms, then over the blocks. MLX's CPU sum
    accumulates one term after another: over a 49k vocabulary its log-sum-exp drifts by up to
    ~2e-4 from the exact value, in blocks by ~2e-6, as close as numpy's pairwise sum (which
    scoring uses on the CPU), so the two ways differ by rounding only."""
    width = x.shape[-1]
    block = next((b for b in (256, 128, 64, 32) if width % b == 0), width)
    if block == width:
        return x.sum(axis=-1)
    return x.reshape(*x.shape[:-1], width // block, block).sum(axis=-1).sum(axis=-1)


def chunk_logprobs(head, hidden, tokens, inv_temp, with_entropy: bool):
    """`(log-prob, entropy)` of `tokens` from their predicting states `hidden`, in one call."""
    lp, entropy, *_ = logprobs_fn(head, tokens, inv_temp, with_entropy)(hidden)
    return lp, entropy


def head_logprobs(head, hidden: mx.array, tokens: mx.array, inv_temp: float, with_entropy: bool, host: bool, rows: int):
    """`(log-prob, entropy)` `[K]` of `tokens` `[K]` from their predicting states `[K, H]`, the
    head run on `rows` of them at a time (`host`: the log-softmax's passes in numpy)."""
    lps, ents = [], []
    host_tokens = np.array(tokens) if host else None
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        if host_tokens is not None:
            logits = head(hidden[part]).astype(mx.float32)
            lp, ent, _ = hostmath.logits_stats(logits, host_tokens[part], inv_temp, with_entropy)
        else:
            lp, ent = chunk_logprobs(head, hidden[part], tokens[part], inv_temp, with_entropy)
        lps.append(lp)
        ents.append(ent)
    if not lps:  # no position to score
        return mx.zeros((0,)), mx.zeros((0,))
    return mx.concatenate(lps), mx.concatenate(ents)

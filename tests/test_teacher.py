"""Teacher view, contexts and chunked stop-gradient scoring on the real embedded model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx.algorithm import teacher
from cast_mlx.engine import fastmath, logprobs, models
from cast_mlx.engine import head as head_mod

LORA = dict(
    rank=4, alpha=8.0, dropout=0.0, num_layers=2, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
)


@pytest.fixture()
def lora_model(fresh_smol):
    model, tok = fresh_smol
    models.attach_lora(model, seed=0, **LORA)
    return model, tok


def _batch(tok):
    contexts = [tok.encode("What is 2 + 3?\n\n[Student response]\n"), tok.encode("Name a color.")]
    completions = [tok.encode("2 + 3 = 5. #### 5"), tok.encode(" Blue")]
    length = max(map(len, completions))
    tokens = mx.array([c + [0] * (length - len(c)) for c in completions])
    mask = mx.array([[1.0] * len(c) + [0.0] * (length - len(c)) for c in completions])
    return contexts, completions, logprobs.make_batch(contexts, tokens, mask)


def _perturb(model, seed=1, scale=0.05):
    """Stand-in for an optimizer step: new (non-zero) LoRA tensors."""
    state = models.lora_state(model)
    keys = mx.random.split(mx.random.key(seed), len(state))
    new = {k: v + scale * mx.random.normal(v.shape, key=key) for key, (k, v) in zip(keys, sorted(state.items()))}
    model.update(tree_unflatten(list(new.items())))


def test_contexts_text():
    assert teacher.question_only_context("What is 2+2?") == "What is 2+2?\n\n[Student response]\n"
    assert teacher.privileged_context("Q?", "4") == "Q?\n\n[Reference solution]\n4\n\n[Student response]\n"

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    assert teacher.teacher_contexts("same", Tok(), ["q"], [[5, 6]]) == [[5, 6]]
    plain = teacher.teacher_contexts("question-only", Tok(), ["hi"], [[5, 6]])
    assert plain == [[ord(c) for c in "hi\n\n[Student response]\n"]]
    with pytest.raises(ValueError, match="needs the reference"):
        teacher.teacher_contexts("privileged", Tok(), ["hi"], [[1]])


def test_chunked_scoring_matches_full_forward(lora_model):
    model, tok = lora_model
    _perturb(model)
    contexts, completions, batch = _batch(tok)
    results = [logprobs.token_logprobs(model, batch, 0.7, chunk=c) for c in (1, 3, 64)]
    for r in results[1:]:
        np.testing.assert_allclose(np.array(r), np.array(results[0]), atol=1e-4)  # BLAS order
    for i, (c, t) in enumerate(zip(contexts, completions)):
        logits = model(mx.array([c + t]))[0].astype(mx.float32) / 0.7
        lsm = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ref = [lsm[len(c) - 1 + j, t[j]].item() for j in range(len(t))]
        np.testing.assert_allclose(np.array(results[2][i, : len(t)]), ref, atol=1e-4)
        assert np.all(np.array(results[2][i, len(t) :]) == 0)  # padding stays 0


def test_snapshot_lags_and_refreshes(lora_model):
    model, tok = lora_model
    _, _, batch = _batch(tok)
    t = teacher.Teacher.create(model, kind="snapshot", refresh=2)
    scored = lambda m: np.array(logprobs.token_logprobs(m, batch, 1.0, numpy_passes=True))  # noqa: E731  (as score)
    base_lp = scored(model)  # lora_b = 0: the base model
    _perturb(model)
    policy_lp = scored(model)
    before = models.lora_state(model)
    teacher_lp = np.array(t.score(model, batch, 1.0))
    after = models.lora_state(model)
    assert before.keys() == after.keys()
    for k in before:  # the policy's own tensors are back, unchanged
        np.testing.assert_array_equal(np.array(before[k]), np.array(after[k]))
    np.testing.assert_allclose(teacher_lp, base_lp, atol=1e-6)
    assert np.abs(teacher_lp - policy_lp).max() > 1e-3  # the lag is real
    assert t.after_step(model, 1) is False  # not yet: refresh every 2 steps
    assert t.after_step(model, 2) is True
    np.testing.assert_allclose(np.array(t.score(model, batch, 1.0)), policy_lp, atol=1e-6)


def test_no_gradient_reaches_through_teacher(lora_model):
    model, tok = lora_model
    _perturb(model)
    _, _, batch = _batch(tok)
    t = teacher.Teacher.create(model, kind="snapshot")

    def loss_fn(m):
        return (t.score(m, batch, 1.0) * batch.mask).sum() + 0.0 * logprobs.token_logprobs(m, batch).sum()

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    from mlx.utils import tree_flatten

    flat = tree_flatten(grads)
    assert flat and all(float(mx.abs(g).max()) == 0.0 for _, g in flat)


def test_base_and_ema_kinds(lora_model, smol):
    model, tok = lora_model
    _, _, batch = _batch(tok)
    _perturb(model, seed=3)
    base = teacher.Teacher.create(model, kind="base")
    ema = teacher.Teacher.create(model, kind="ema", ema_decay=0.9)
    start = models.lora_state(model)
    _perturb(model, seed=4)
    now = models.lora_state(model)
    assert base.after_step(model, 10) is False
    assert ema.after_step(model, 1) is True
    for k in now:
        np.testing.assert_allclose(
            np.array(ema.params[k]), 0.9 * np.array(start[k]) + 0.1 * np.array(now[k]), atol=1e-7
        )
    # base = adapters disabled: equal to the plain model without LoRA
    plain, _ = smol
    np.testing.assert_allclose(
        np.array(base.score(model, batch, 1.0)),
        np.array(logprobs.token_logprobs(plain, batch, 1.0, numpy_passes=True)),
        atol=1e-6,
    )


def test_instructed_context_is_the_authors_text():
    from types import SimpleNamespace

    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: list(text.encode()))
    (ids,) = teacher.teacher_contexts("instructed", tok, ["What is 2 + 3?"], [[1, 2]], instruction="Say it.")
    assert bytes(ids).decode() == "What is 2 + 3?\n\nSay it.\n\n[Student response]\n"
    with pytest.raises(ValueError, match="instructed needs the task's answer instruction"):
        teacher.teacher_contexts("instructed", tok, ["q"], [[1]])
    with pytest.raises(ValueError, match="choose one of"):
        teacher.teacher_contexts("oracle", tok, ["q"], [[1]])


# --------------------------------------------------------------------------- shared prefix


def _group(tok, lengths=(7, 3, 5)):
    """One context and three completions of different lengths (right-padded)."""
    context = tok.encode("What is 12 + 30?\n\n[Student response]\n")
    rng = np.random.default_rng(0)
    rows = [rng.integers(10, 40000, size=n).tolist() for n in lengths]
    width = max(lengths)
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
    mask = mx.array([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    return context, tokens, mask


def test_length_buckets_keep_contexts_apart():
    mask = mx.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=mx.float32)
    assert logprobs.length_buckets(mask, 2) == [[2, 4], [0, 3], [1]]  # longest first, contexts mixed
    contexts = [[5], [5], [6], [6], [5]]
    assert logprobs.length_buckets(mask, 2, contexts) == [[4, 0], [1], [2, 3]]
    assert logprobs.length_buckets(mask, 8, contexts) == [[4, 0, 1], [2, 3]]


def test_split_by_cost_cuts_where_padding_costs_more_than_a_pass():
    split = logprobs.split_by_cost
    assert split([40, 40, 40], 8, 65) == [(0, 3)]  # equal lengths: one run
    assert split([100, 5, 5, 5, 5, 5, 5, 5], 8, 65) == [(0, 1), (1, 8)]  # 865 padded vs 235
    assert split([80, 60, 40, 35, 30, 25, 20, 15], 8, 65) == [(0, 2), (2, 8)]
    assert split([100, 5, 5, 5], 8, 1000) == [(0, 4)]  # a pass dearer than the padding
    runs = split([5] * 10, 4, 10)
    assert [b - a for a, b in runs] == [2, 4, 4] and runs[-1][1] == 10  # at most `size` rows
    assert split([], 4, 10) == []


def test_make_batch_shares_only_one_context():
    tokens, mask = mx.array([[1, 2], [3, 0]]), mx.array([[1.0, 1.0], [1.0, 0.0]])
    assert logprobs.make_batch([[7, 8], [7, 8]], tokens, mask).prefix == [7, 8]
    assert logprobs.make_batch([[7, 8], [7, 9]], tokens, mask).prefix is None
    assert logprobs.make_batch([[7, 8], [7, 8]], tokens, mask, share_prefix=False).prefix is None


def test_shared_prefix_gives_the_per_row_logprobs_and_gradients(lora_model):
    """One pass of the context into a KV cache that the rows extend: the same log-probs,
    entropies and LoRA gradients as one full forward per row."""
    model, tok = lora_model
    _perturb(model)
    context, tokens, mask = _group(tok)
    shared = logprobs.make_batch([context] * 3, tokens, mask)
    per_row = logprobs.make_batch([context] * 3, tokens, mask, share_prefix=False)
    assert shared.prefix == context and per_row.prefix is None

    def loss(m, batch):
        lp, ent = logprobs.token_logprobs(m, batch, 0.7, chunk=2, with_entropy=True)
        return (lp * mx.arange(1, 8)[None, :]).sum() + ent.sum(), (lp, ent)

    grad = nn.value_and_grad(model, loss)
    (va, (lp_a, ent_a)), ga = grad(model, shared)
    (vb, (lp_b, ent_b)), gb = grad(model, per_row)
    np.testing.assert_allclose(np.array(lp_a), np.array(lp_b), atol=1e-4)
    np.testing.assert_allclose(np.array(ent_a), np.array(ent_b), atol=1e-4)
    assert np.all(np.array(lp_a)[1, 3:] == 0) and np.all(np.array(lp_a)[2, 5:] == 0)  # padding
    assert abs(va.item() - vb.item()) < 1e-3 * abs(vb.item())
    flat_a, flat_b = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert set(flat_a) == set(flat_b) and any(float(mx.abs(v).max()) > 0 for v in flat_b.values())
    for k in flat_b:
        scale = float(mx.abs(flat_b[k]).max()) + 1e-8
        np.testing.assert_allclose(np.array(flat_a[k]) / scale, np.array(flat_b[k]) / scale, atol=1e-4, err_msg=k)


def test_shared_prefix_edge_cases_and_fallback(lora_model, monkeypatch):
    model, tok = lora_model
    _perturb(model)
    context, tokens, mask = _group(tok, lengths=(1, 1))  # one position: the context's last state only
    one = [logprobs.token_logprobs(model, logprobs.make_batch([context] * 2, tokens, mask, s), 1.0) for s in (1, 0)]
    np.testing.assert_allclose(np.array(one[0]), np.array(one[1]), atol=1e-4)
    # a model whose cache is not a plain KVCache (sliding window, recurrent) scores per row
    context, tokens, mask = _group(tok)
    batch = logprobs.make_batch([context] * 3, tokens, mask)
    want = np.array(logprobs.token_logprobs(model, batch, 1.0))
    monkeypatch.setattr(logprobs, "plain_cache", lambda m: None)
    calls = []
    backbone = model.model.__call__
    monkeypatch.setattr(type(model.model), "__call__", lambda self, *a, **k: calls.append(k) or backbone(*a, **k))
    got = np.array(logprobs.token_logprobs(model, batch, 1.0))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert len(calls) == 1 and calls[0].get("cache") is None  # one per-row forward, no cache


def test_scoring_in_buckets_runs_each_context_once(lora_model, monkeypatch):
    """`score_in_buckets` keeps a context's pass for the context's other buckets: the same
    log-probs as a fresh pass per bucket, with one pass of the context in all."""
    model, tok = lora_model
    _perturb(model)
    context, tokens, mask = _group(tok, lengths=(9, 2, 8, 1))
    contexts = [context] * 4
    want = np.array(logprobs.token_logprobs(model, logprobs.make_batch(contexts, tokens, mask), 1.0))
    passes = []
    backbone = model.model.__call__
    spy = lambda self, ids, **k: passes.append(ids.shape) or backbone(ids, **k)  # noqa: E731
    monkeypatch.setattr(type(model.model), "__call__", spy)
    got = logprobs.score_in_buckets(lambda b: logprobs.token_logprobs(model, b, 1.0), contexts, tokens, mask, 2)
    np.testing.assert_allclose(np.array(got), want, atol=1e-4)  # other paddings: rounding only
    assert passes.count((1, len(context))) == 1 and len(passes) == 3  # one context pass, then 2 buckets' rows


def test_length_buckets_cut_more_when_a_context_runs_once():
    mask = mx.array([[1.0] * 80 + [0.0] * 20, [1.0] * 100] + [[1.0] * 80 + [0.0] * 20] * 2)
    contexts = [[5] * 60] * 4
    assert logprobs.length_buckets(mask, 4, contexts) == [[1, 0, 2, 3]]  # 476 positions; cut: 492
    assert logprobs.length_buckets(mask, 4, contexts, context_once=True) == [[1], [0, 2, 3]]  # 416 / 372


@pytest.mark.model
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scoring_without_gradient_gives_the_update_paths_values(lora_model, temperature):
    """`numpy_passes` (numpy's passes over the vocabulary on the CPU) gives the log-probs and
    entropies of the differentiable path (MLX's), up to the drift of MLX's float32 sums over a
    49k vocabulary (~2e-4; numpy's pairwise sums are the closer: `test_hostmath`)."""
    model, tok = lora_model
    _, _, batch = _batch(tok)
    assert fastmath.on_cpu()
    want_lp, want_ent = logprobs.token_logprobs(model, batch, temperature, with_entropy=True)
    lp, ent = logprobs.token_logprobs(model, batch, temperature, with_entropy=True, numpy_passes=True)
    np.testing.assert_allclose(np.array(lp), np.array(want_lp), atol=5e-4)
    np.testing.assert_allclose(np.array(ent), np.array(want_ent), atol=5e-3)
    assert float(mx.abs(lp).min()) == 0.0 and float(mx.abs(lp).max()) > 0.1  # masked 0, scored not


class _Tiny(nn.Module):
    """A model without mlx-lm's decoder layout (11 tokens)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(11, 8), nn.Linear(8, 11)

    def __call__(self, x):
        return self.out(mx.tanh(self.embed(x)))


@pytest.mark.parametrize("host", [True, False], ids=["numpy-passes", "mlx-passes"])
def test_scoring_paths_agree_on_a_small_vocabulary(host, monkeypatch):
    """Both ways of scoring without a gradient (numpy's passes: the CPU; MLX's: any other
    backend) give the differentiable path's values to float32 rounding."""

    mx.random.seed(1)
    model = _Tiny()
    tokens, mask = mx.array([[1, 2, 3], [4, 5, 0]]), mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = logprobs.make_batch([[7, 8], [9]], tokens, mask)
    want = logprobs.token_logprobs(model, batch, 0.7, with_entropy=True)
    monkeypatch.setattr(fastmath, "on_cpu", lambda: host)
    got = logprobs.token_logprobs(model, batch, 0.7, with_entropy=True, numpy_passes=True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)


def test_a_model_of_unknown_layout_scores_from_its_full_logits():
    """A model without mlx-lm's decoder layout: its own logits, the identity as the head."""

    mx.random.seed(0)
    model = _Tiny()
    rows = [([7, 8], [1, 2, 3]), ([9], [4, 5])]
    tokens, mask = mx.array([[1, 2, 3], [4, 5, 0]]), mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp = np.array(logprobs.token_logprobs(model, logprobs.make_batch([c for c, _ in rows], tokens, mask), 0.7))
    for i, (context, completion) in enumerate(rows):
        logits = model(mx.array([context + completion]))[0] / 0.7
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        want = [logp[len(context) - 1 + j, t] for j, t in enumerate(completion)]
        np.testing.assert_allclose(lp[i, : len(completion)], want, atol=1e-5)
    assert lp[1, 2] == 0.0  # masked


HEAD_KINDS = ["linear", "tied-embedding", "linear-with-bias", "quantized-linear", "quantized-tied-embedding"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_head_vjp_equals_autodiff_of_the_plain_formula(kind, with_entropy, keep, monkeypatch):
    """The head's hand-written backward (closed-form softmax gradients, from the forward's
    exponentials kept or the logits recomputed) gives autodiff's values and gradients, for
    float and quantized (QLoRA) heads; a head it cannot transpose (a bias) takes mx.vjp.
    With the exponentials kept (the CPU's way) no gradient flows through the entropy, a
    metric the update only reports."""
    monkeypatch.setattr(head_mod, "KEEP_EXP", keep)
    mx.random.seed(3)
    vocab, width = 37, 64  # a quantized layer's width is a multiple of its group size
    tied = kind.endswith("tied-embedding")
    layer = nn.Embedding(vocab, width) if tied else nn.Linear(width, vocab, bias=kind == "linear-with-bias")
    if kind.startswith("quantized"):
        layer = layer.to_quantized(group_size=32, bits=4)
        assert type(layer) in (nn.QuantizedLinear, nn.QuantizedEmbedding)
    head = layer.as_linear if tied else layer
    assert (head_mod.transpose_of(head) is None) == (kind == "linear-with-bias")
    h = mx.random.normal((2, 5, width))
    tokens = mx.random.randint(0, vocab, (2, 5))
    w_lp, w_ent = mx.random.normal((2, 5)), mx.random.normal((2, 5))
    inv_temp = 1 / 0.7

    def plain(x):  # the textbook formula, differentiated by MLX
        z = head(x).astype(mx.float32) * inv_temp
        lse = mx.logsumexp(z, axis=-1)
        lp = mx.take_along_axis(z, tokens[..., None], axis=-1)[..., 0] - lse
        ent = lse - (mx.softmax(z, axis=-1) * z).sum(axis=-1)
        return lp, mx.stop_gradient(ent) if keep else ent

    def objective(fn):
        def f(x):
            lp, ent = fn(x)
            return (lp * w_lp).sum() + ((ent * w_ent).sum() if with_entropy else 0.0)

        return f

    ours = lambda x: head_mod.chunk_logprobs(head, x, tokens, inv_temp, with_entropy)  # noqa: E731
    (lp_a, ent_a), (lp_b, ent_b) = ours(h), plain(h)
    np.testing.assert_allclose(np.array(lp_a), np.array(lp_b), atol=1e-5)
    if with_entropy:
        np.testing.assert_allclose(np.array(ent_a), np.array(ent_b), atol=1e-5)
    else:
        assert float(mx.abs(ent_a).max()) == 0.0
    g_a, g_b = mx.grad(objective(ours))(h), mx.grad(objective(plain))(h)
    assert float(mx.abs(g_b).max()) > 1e-3
    np.testing.assert_allclose(np.array(g_a), np.array(g_b), atol=1e-5)


def test_frozen_blocks_is_the_first_adapted_block(lora_model):
    model, _ = lora_model
    assert logprobs.frozen_blocks(model) == len(model.model.layers) - LORA["num_layers"]
    model.args.model_type = "gemma"  # a backbone it does not know
    assert logprobs.frozen_blocks(model) == 0
    model.args.model_type = "llama"
    model.model.layers[0].unfreeze()  # the bottom block trains: nothing to keep
    assert logprobs.frozen_blocks(model) == 0


@pytest.mark.parametrize("share", [True, False])
def test_scoring_from_kept_states_gives_the_full_forwards_logprobs_and_gradients(lora_model, share):
    """A batch that carries the states entering the first adapted block runs only the top
    blocks: the log-probs, entropies and LoRA gradients of the full forward, to rounding."""
    model, tok = lora_model
    _perturb(model)
    split = logprobs.frozen_blocks(model)
    context, tokens, mask = _group(tok)
    n, length = tokens.shape
    inputs = mx.array([context + row for row in tokens.tolist()])
    fresh = logprobs.lower_states(model.model, inputs, None, split)  # [3, len(context) + L, H]
    states = logprobs.BatchStates(split, [fresh[i, : len(context)] for i in range(n)], fresh[:, len(context) :])
    full = logprobs.make_batch([context] * n, tokens, mask, share)
    kept = logprobs.make_batch([context] * n, tokens, mask, share, states)

    def loss(m, batch):
        lp, ent = logprobs.token_logprobs(m, batch, 0.7, chunk=2, with_entropy=True)
        return (lp * mx.arange(1, length + 1)[None, :]).sum() + ent.sum(), (lp, ent)

    grad = nn.value_and_grad(model, loss)
    (va, (lp_a, ent_a)), ga = grad(model, kept)
    (vb, (lp_b, ent_b)), gb = grad(model, full)
    np.testing.assert_allclose(np.array(lp_a), np.array(lp_b), atol=1e-4)
    np.testing.assert_allclose(np.array(ent_a), np.array(ent_b), atol=1e-4)
    flat_a, flat_b = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert any(float(mx.abs(v).max()) > 0 for v in flat_b.values())
    for k in flat_b:
        scale = float(mx.abs(flat_b[k]).max()) + 1e-8
        np.testing.assert_allclose(np.array(flat_a[k]) / scale, np.array(flat_b[k]) / scale, atol=1e-4, err_msg=k)
    # states that are not this batch's are refused
    short = logprobs.BatchStates(split, states.contexts, states.tokens[:, :-1])
    with pytest.raises(ValueError, match="states: they do not match"):
        logprobs.make_batch([context] * n, tokens, mask, share, short)

"""Loss value and LoRA gradients on the real embedded model: MLX vs the PyTorch reference.

Same dequantized weights (bit-identical, see test_models), same LoRA tensors, same tokens;
MLX goes through `logprobs.token_logprobs` (chunked, checkpointed) and `loss.policy_loss`,
PyTorch through transformers' forward, `reference.gather_logprobs` and
`reference.policy_loss` written independently from the spec.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx.algorithm import estimators, loss, teacher
from cast_mlx.engine import logprobs, models

torch = pytest.importorskip("torch")
try:
    from reference import torch_cast as ref
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.reference import torch_cast as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LORA = dict(
    rank=4, alpha=8.0, dropout=0.0, num_layers=2, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
)
TEMPERATURE = 0.8


PROMPTS = ["What is 7 * 6? Give the answer after ####.", "Is 17 prime?"]
ANSWERS = [["7 * 6 = 42 #### 42", "It is 48. #### 48"], ["Yes, 17 is prime.", "No"]]


def _contexts(tok):
    return [tok.encode(p) for p, group in zip(PROMPTS, ANSWERS) for _ in group]


def _rows(tok):
    contexts = _contexts(tok)
    completions = [tok.encode(" " + a) for group in ANSWERS for a in group]
    length = max(map(len, completions))
    tokens = mx.array([c + [0] * (length - len(c)) for c in completions])
    mask = mx.array([[1.0] * len(c) + [0.0] * (length - len(c)) for c in completions])
    return logprobs.make_batch(contexts, tokens, mask)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_loss_and_lora_grad_match_pytorch(fresh_smol, hf, loss_agg):
    model, tok = fresh_smol
    models.attach_lora(model, seed=0, **LORA)
    t = teacher.Teacher.create(model)  # the initial adapter = base model
    state = models.lora_state(model)  # give lora_b non-zero values so every grad is non-trivial
    keys = mx.random.split(mx.random.key(7), len(state))
    model.update(
        tree_unflatten(
            [
                (k, v + 0.02 * mx.random.normal(v.shape, key=key)) if k.endswith("lora_b") else (k, v)
                for key, (k, v) in zip(keys, sorted(state.items()))
            ]
        )
    )

    batch = _rows(tok)
    lp_now = logprobs.token_logprobs(model, batch, TEMPERATURE)
    # an "old" policy a little off the current one, so ratios move and some clip
    old = lp_now + 0.3 * mx.random.normal(lp_now.shape, key=mx.random.key(1)) * batch.mask
    gaps = (t.score(model, batch, TEMPERATURE) - old) * batch.mask
    rewards = mx.array([1.0, 0.0, 1.0, 1.0])
    adv, _ = estimators.compute_advantages("cast", rewards, gaps, batch.mask, group_size=2)
    truncated = mx.array([0, 0, 0, 1])

    def loss_fn(m):
        lp = logprobs.token_logprobs(m, batch, TEMPERATURE, chunk=4)
        value, _ = loss.policy_loss(lp, old, adv, batch.mask, loss_agg=loss_agg, truncated=truncated)
        return value

    value, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))

    # ---- PyTorch: the same LoRA as forward hooks on transformers' modules
    hf_model, _ = hf
    params, handles = torch_lora(hf_model, model)
    try:
        lp_t = torch_logprobs(hf_model, batch)
        value_t = ref.policy_loss(
            lp_t, np.array(old), np.array(adv), np.array(batch.mask), loss_agg=loss_agg, truncated=np.array(truncated)
        )
        value_t.backward()
    finally:
        for h in handles:
            h.remove()
    assert abs(value.item() - value_t.item()) <= 1e-4 * abs(value_t.item()), (value.item(), value_t.item())
    for name, p in params.items():
        g_mlx, g_t = np.array(grads[name]), p.grad.detach().cpu().numpy()
        assert np.abs(g_t).max() > 0, name
        rel = np.abs(g_mlx - g_t).max() / np.abs(g_t).max()
        assert rel <= 1e-4, (name, rel)


def torch_lora(hf_model, model):
    """The MLX model's LoRA tensors as torch leaves, applied to transformers' modules by
    forward hooks; returns (params by name, hook handles)."""
    hf_model.to(DEVICE)
    modules = dict(hf_model.named_modules())
    scale = LORA["alpha"] / LORA["rank"]
    params, handles = {}, []
    for name, v in models.lora_state(model).items():
        params[name] = torch.tensor(np.array(v), device=DEVICE, requires_grad=True)
    for name in {k.rsplit(".", 1)[0] for k in params}:
        a, b = params[f"{name}.lora_a"], params[f"{name}.lora_b"]
        handles.append(
            modules[name].register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scale * ((inp[0] @ a) @ b))
        )
    return params, handles


def torch_logprobs(hf_model, batch):
    ids = torch.tensor(np.array(batch.inputs), dtype=torch.long, device=DEVICE)
    logits = hf_model(ids).logits
    pos = torch.tensor(np.array(batch.positions), dtype=torch.long, device=DEVICE)
    picked = torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    return ref.gather_logprobs(picked, np.array(batch.tokens), TEMPERATURE)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_two_clipped_updates_match_pytorch(fresh_smol, hf, level):
    """`loss.num_iterations=2` through `update.update` (SGD, gradient-norm clip) against two
    hand-written PyTorch steps: the second update's `old` log-probs are the first pass's, so
    its ratios move and the clip acts."""
    import mlx.optimizers as optim

    from cast_mlx import config as cfg
    from cast_mlx.algorithm.compiled import CompiledPolicyLoss
    from cast_mlx.engine.distributed import World
    from cast_mlx.training.update import update

    # A random-weight model (CAST_MLX_HF_FROM_FOLDER, scripts/random_embedded.py) needs a larger
    # step than the trained one for the second update's ratios to move (asserted below).
    lr, max_norm = (100.0 if os.environ.get("CAST_MLX_HF_FROM_FOLDER") else 20.0), 0.5
    model, tok = fresh_smol
    models.attach_lora(model, seed=0, **LORA)
    batch = _rows(tok)
    contexts = _contexts(tok)
    rewards = mx.array([1.0, 0.0, 1.0, 0.0])
    adv, _ = estimators.compute_advantages("grpo", rewards, mx.zeros(batch.mask.shape), batch.mask, group_size=2)
    truncated = mx.zeros((4,))
    sets = [
        "loss.num_iterations=2",
        f"loss.importance_level={level}",
        f"sampling.temperature={TEMPERATURE}",
        f"optimizer.max_grad_norm={max_norm}",
        "optimizer.micro_batch_size=2",
        "system.share_prefix=false",
    ]
    recipe = cfg.load_recipe("recipes/smoke.yaml", sets)
    hf_model, _ = hf
    params, handles = torch_lora(hf_model, model)  # the start, before MLX moves
    start = {k: np.array(v) for k, v in models.lora_state(model).items()}
    loss_fn = CompiledPolicyLoss(mask_truncated=True, importance_level=level)
    result = update(
        model, optim.SGD(learning_rate=lr), loss_fn, recipe, World(),
        contexts=contexts, tokens=batch.tokens, mask=batch.mask, adv=adv, truncated=truncated,
    )  # fmt: skip
    assert result.aux["updates_applied"] == 2
    assert result.aux["ratio_mean/iter1"] == pytest.approx(1.0, abs=1e-6)
    assert abs(result.aux["ratio_mean/iter2"] - 1.0) > 0.02
    try:
        old = None
        for _ in range(2):
            lp_t = torch_logprobs(hf_model, batch)
            old = lp_t.detach().cpu().numpy() if old is None else old  # the first pass: the behaviour policy
            value = ref.policy_loss(lp_t, old, np.array(adv), np.array(batch.mask), importance_level=level)
            grads = torch.autograd.grad(value, list(params.values()))
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            factor = min(1.0, max_norm / (float(norm) + 1e-6))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p -= lr * factor * g
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for name, p in params.items():  # each tensor's step, MLX against PyTorch
        mine = np.array(models.lora_state(model)[name]) - start[name]
        theirs = p.detach().cpu().numpy() - start[name]
        assert np.abs(theirs).max() > 0, name
        rel = np.abs(mine - theirs).max() / np.abs(theirs).max()
        worst = max(worst, rel)
    # float32 forwards differ by ~1e-5; two steps of lr 20 carry it to ~5e-4 of a step (a
    # second update with a fresh `old`, ratio 1, is off by 4.3 steps)
    assert worst <= 1e-3, worst

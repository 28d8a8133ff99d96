"""PyTorch reference of the CAST math, written from `docs/cast-spec.md` (sections 2, 4, 5).

It is deliberately *not* a port of `cast_mlx`: groups are handled one by one in Python,
the token rule is the section-4 table spelled out case by case, and the loss walks the
completions one by one. Everything is float64 so that it can judge the float32 MLX code.
Conventions the spec leaves open are the ones documented in `cast_mlx/algorithm/advantages.py`
and `cast_mlx/algorithm/loss.py` (a zero-variance group is all-correct when its reward is > 0; "batch"
std is over all rewards; rows without loss-bearing tokens count as absent).

Torch is imported only under `tests/`.
"""

from __future__ import annotations

import math

import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.float64


def tensor(x, dtype=DTYPE) -> torch.Tensor:
    """Anything array-like (numpy, list) as a float64 tensor on the reference device."""
    return torch.as_tensor(x, dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- section 2


def base_advantages(rewards, group_size, *, algorithm, scale_rewards, eps=1e-4, zero_var_base=1.0, reward_std="sample"):
    """`[N]` base advantages, one group at a time. The std divided out is Bessel's plus
    `eps`, or (`reward_std="population"`, the veRL port's) ddof 0 clamped at 1e-6."""

    def std(values):
        if reward_std == "population":
            return torch.clamp(torch.std(values, unbiased=False), min=1e-6)
        return torch.std(values, unbiased=True) + eps

    r = tensor(rewards)
    out = torch.zeros_like(r)
    batch_std = std(r) if r.numel() > 1 else None
    for start in range(0, r.numel(), group_size):
        group = r[start : start + group_size]
        if bool(torch.all(group == group[0])):
            if algorithm in ("cast", "cast-verl"):
                value = zero_var_base if group[0] > 0 else -zero_var_base
            else:  # grpo, rlsd
                value = 0.0
            out[start : start + group_size] = value
            continue
        centered = group - group.mean()
        if scale_rewards == "none":
            out[start : start + group_size] = centered
        elif scale_rewards == "group":
            out[start : start + group_size] = centered / std(group)
        elif scale_rewards == "batch":
            out[start : start + group_size] = centered / batch_std
        else:
            raise ValueError(scale_rewards)
    return out


# --------------------------------------------------------------------------- section 4


def cast_token_advantages(
    base,
    gaps,
    mask,
    *,
    lam=1.0,
    correct_box=(0.8, 1.05),
    wrong_box=(0.95, 1.2),
    a_max=1.2,
    flip="both",
    flip_deadband=0.0,
):
    """`[N, L]` token advantages: the section-4 table, one row of the table at a time."""
    g = tensor(gaps)
    B = tensor(base)[:, None].expand_as(g)
    on = tensor(mask) != 0
    cl, ch = correct_box
    wl, wh = wrong_box
    zero = torch.zeros_like(g)

    outside_deadband = g.abs() > flip_deadband
    # Row 1: B > 0 and g < 0 -> down-flip (allowed for flip both/down).
    is_down = (B > 0) & (g < 0) & outside_deadband & (flip in ("both", "down"))
    down = -B.abs() * torch.clamp(1 + lam * (torch.clamp(torch.exp(-g), 1.0, wh) - 1), min=0.0)
    # Row 2: B < 0 and g > 0 -> up-flip (allowed for flip both).
    is_up = (B < 0) & (g > 0) & outside_deadband & (flip == "both")
    up = B.abs() * torch.clamp(1 + lam * (torch.clamp(torch.exp(g), 1.0, ch) - 1), min=0.0)
    # Row 3: otherwise, w from the trajectory's own box.
    s = torch.sign(B)
    w_correct = torch.clamp(torch.exp(s * g), cl, ch)
    w_wrong = torch.clamp(torch.exp(s * g), wl, wh)
    w = torch.where(B > 0, w_correct, w_wrong)
    otherwise = B * torch.clamp(1 + lam * (w - 1), min=0.0)

    A = torch.where(is_down, down, torch.where(is_up, up, otherwise))
    A = torch.where(B == 0, zero, A)  # Row 4.
    A = torch.clamp(A, -a_max, a_max)
    return torch.where(on, A, zero)


def rlsd_token_advantages(base, gaps, mask, *, step, eps_w=0.2, lambda_start=0.5, lambda_steps=50):
    """`[N, L]` RLSD advantages, one completion at a time."""
    g = tensor(gaps)
    on = tensor(mask) != 0
    b = tensor(base)
    lam_t = lambda_start * max(0.0, 1.0 - step / lambda_steps)
    out = torch.zeros_like(g)
    for i in range(g.shape[0]):
        if b[i] == 0:
            continue
        w = torch.clamp(torch.exp(torch.sign(b[i]) * g[i]), 1 - eps_w, 1 + eps_w)
        out[i] = torch.where(on[i], b[i] * ((1 - lam_t) + lam_t * w), torch.zeros_like(w))
    return out


def center_gaps(gaps, mask, special):
    """Spec 4b gap centring, row by row: g minus the mean of g over the row's content tokens
    (real and not special); a row without content tokens is left as it is."""
    g = tensor(gaps).clone()
    content = (tensor(mask) != 0) & (tensor(special) == 0)
    for i in range(g.shape[0]):
        if bool(content[i].any()):
            g[i] = g[i] - g[i][content[i]].mean()
    return g


def verifier_special_tokens(token, base, rewards, mask, special, group_size):
    """Spec 4b: a special token of a real position gets its row's GRPO advantage (the base in
    a mixed group, 0 in a zero-variance group)."""
    token = token.clone()
    r, on, sp = tensor(rewards), tensor(mask) != 0, tensor(special) != 0
    for i in range(token.shape[0]):
        group = r[(i // group_size) * group_size : (i // group_size + 1) * group_size]
        value = 0.0 if bool(torch.all(group == group[0])) else float(base[i])
        for t in range(token.shape[1]):
            if on[i, t] and sp[i, t]:
                token[i, t] = value
    return token


def advantages(algorithm, rewards, gaps, mask, *, group_size, step=0, special=None, **p):
    """`(token [N, L], base [N])` for "grpo", "cast", "cast-verl" or "rlsd"; `p` as in cast_mlx, including
    the spec-4b switches `gap_centering` and `special_tokens` (which need `special`)."""
    if p.get("gap_centering"):
        gaps = center_gaps(gaps, mask, special)
    if algorithm == "cast-verl":
        # The veRL port: no flips, no final clip, g = 0 inside the probability-ratio dead-band.
        lo, hi = p.get("ratio_band", (1.0, 1.0))
        if (lo, hi) != (1.0, 1.0):
            g = tensor(gaps)
            gaps = torch.where((torch.exp(g) >= lo) & (torch.exp(g) <= hi), torch.zeros_like(g), g)
        p = {**p, "flip": "none", "a_max": math.inf}
    default_scale = "none" if algorithm == "cast" else "group"
    scale = p.get("scale_rewards") or default_scale
    base = base_advantages(
        rewards,
        group_size,
        algorithm=algorithm,
        scale_rewards=scale,
        eps=p.get("eps", 1e-4),
        zero_var_base=p.get("zero_var_base", 1.0),
        reward_std=p.get("reward_std", "sample"),
    )
    on = tensor(mask) != 0
    if algorithm == "grpo":
        token = torch.where(on, base[:, None].expand(on.shape), torch.zeros(on.shape, dtype=DTYPE, device=DEVICE))
    elif algorithm in ("cast", "cast-verl"):
        lam = p.get("cast_lambda", 1.0)
        if p.get("lambda_schedule", "constant") == "linear_decay":
            lam = lam * max(0.0, 1.0 - step / p.get("lambda_decay_steps", 300))
        token = cast_token_advantages(
            base,
            gaps,
            mask,
            lam=lam,
            correct_box=p.get("correct_box", (0.8, 1.05)),
            wrong_box=p.get("wrong_box", (0.95, 1.2)),
            a_max=p.get("a_max", 1.2),
            flip=p.get("flip", "both"),
            flip_deadband=p.get("flip_deadband", 0.0),
        )
    elif algorithm == "rlsd":
        token = rlsd_token_advantages(
            base,
            gaps,
            mask,
            step=step,
            eps_w=p.get("rlsd_eps_w", 0.2),
            lambda_start=p.get("rlsd_lambda_start", 0.5),
            lambda_steps=p.get("rlsd_lambda_steps", 50),
        )
    else:
        raise ValueError(algorithm)
    if p.get("special_tokens", "teacher") == "verifier":
        token = verifier_special_tokens(token, base, rewards, mask, special, group_size)
        if algorithm == "cast":  # the paper's rule clips every token, the special ones too (spec 4b)
            a_max = p.get("a_max", 1.2)
            token = torch.clamp(token, -a_max, a_max)
    return token, base


# --------------------------------------------------------------------------- section 5


def policy_loss(
    logp,
    old_logp,
    adv,
    mask,
    *,
    eps_low=0.2,
    eps_high=0.28,
    loss_agg="seq-mean-token-mean",
    truncated=None,
    mask_truncated=True,
    beta=0.0,
    ref_logp=None,
    num_tokens=None,
    num_seqs=None,
    max_len=None,
    importance_level="token",
):
    """Scalar loss. `logp` may be a tensor that requires grad (autograd reference).

    `importance_level="sequence"` (GSPO-token, as in verl's gspo loss): each token's ratio
    has the value of its completion's `exp(mean(logp - old))` and the gradient of
    `logp_t` times that value.

    `num_tokens`, `num_seqs`, `max_len` override the batch's own normalisers (gradient
    accumulation); by default they are those of the completions that carry loss.
    """
    logp = logp if isinstance(logp, torch.Tensor) else tensor(logp)
    old = tensor(old_logp)
    A = tensor(adv)
    m = tensor(mask) != 0
    n = m.shape[0]
    dropped = [bool(mask_truncated and truncated is not None and truncated[i]) for i in range(n)]

    # Per-completion lists of the per-token losses of its real tokens.
    rows = []
    for i in range(n):
        if dropped[i] or not bool(m[i].any()):
            continue
        idx = m[i]
        ratio = torch.exp(logp[i][idx] - old[i][idx])
        if importance_level == "sequence":
            lp = logp[i][idx]
            seq = (lp - old[i][idx]).mean().detach()
            ratio = torch.exp(lp - lp.detach() + seq)
        a = A[i][idx]
        surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
        per_token = -surrogate
        if beta > 0:
            d = tensor(ref_logp)[i][idx] - logp[i][idx]
            per_token = per_token + beta * (torch.exp(d) - d - 1)
        rows.append(per_token)

    tokens = num_tokens if num_tokens is not None else sum(r.numel() for r in rows)
    seqs = num_seqs if num_seqs is not None else len(rows)
    longest = max_len if max_len is not None else max((r.numel() for r in rows), default=0)
    if not rows:
        return logp.sum() * 0.0
    if loss_agg == "seq-mean-token-mean":
        return sum(r.mean() for r in rows) / max(seqs, 1)
    if loss_agg == "token-mean":
        return sum(r.sum() for r in rows) / max(tokens, 1)
    if loss_agg == "seq-mean-token-sum-norm":
        return sum(r.sum() for r in rows) / (max(seqs, 1) * max(longest, 1))
    raise ValueError(loss_agg)


# --------------------------------------------------------------------------- scoring


def gather_logprobs(logits, ids, temperature: float = 1.0):
    """`[..., L]` float32 log-softmax of `logits / temperature` at the token ids `ids`."""
    logits = torch.as_tensor(logits).to(torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return torch.gather(logprobs, -1, ids.unsqueeze(-1)).squeeze(-1)

"""`mx.compile`d advantages and loss: the length axis padded to buckets of 32 so a run compiles
once per bucket, changing values passed as scalars, and `compile_count()` of the traces
(docs/design.md, "Compiling")."""

from __future__ import annotations

import functools

import mlx.core as mx

from cast_mlx.algorithm import estimators
from cast_mlx.algorithm.advantages import check_inputs
from cast_mlx.algorithm.loss import LossNorm, check_loss_options, loss_norm, policy_loss

_TRACES = 0  # total traces over all wrappers


def compile_count() -> int:
    """How many times any wrapper of this module has traced (compiled) its function."""
    return _TRACES


def bucket_length(length: int, multiple: int = 32) -> int:
    """`length` rounded up to a multiple of `multiple` (at least `multiple`)."""
    if multiple <= 0:
        raise ValueError(f"multiple: must be > 0, got {multiple}")
    return max(multiple, -(-int(length) // multiple) * multiple)


def pad_length(x: mx.array, target: int) -> mx.array:
    """Zero-pad the last axis of `x` up to `target`."""
    extra = target - x.shape[-1]
    if extra < 0:
        raise ValueError(f"pad_length: length {x.shape[-1]} exceeds target {target}")
    if extra == 0:
        return x
    return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to a power of two: micro-batches of any row count (cut by cost,
    `logprobs.split_by_cost`) then meet a handful of compiled shapes."""
    return 1 << max(int(rows) - 1, 0).bit_length()


def pad_rows(x: mx.array, target: int) -> mx.array:
    """Zero-pad the first axis of `x` up to `target` (zero mask: no loss, no gradient)."""
    extra = target - x.shape[0]
    return x if extra == 0 else mx.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


class CountingCompiled:
    """`mx.compile(fn)` that records each new input signature (shapes and dtypes): MLX
    retraces exactly when it sees a new one, so `len(self.signatures)` is this wrapper's
    compile count. Arguments must be arrays."""

    def __init__(self, fn, label: str):
        self.label = label
        self.signatures: set = set()
        self._compiled = mx.compile(fn)

    @property
    def compile_count(self) -> int:
        return len(self.signatures)

    def __call__(self, *arrays: mx.array):
        signature = tuple((a.shape, a.dtype) for a in arrays)
        if signature not in self.signatures:
            global _TRACES
            self.signatures.add(signature)
            _TRACES += 1
        return self._compiled(*arrays)


# --------------------------------------------------------------------------- advantages


class CompiledAdvantages:
    """The registered estimator `name` with its parameters fixed, compiled: call it with
    `(rewards, gaps, mask, step=0, special=None)`; returns `(token_adv [N, L], base [N])`
    like `compute_advantages` (same values; the length padding is removed again)."""

    def __init__(self, name: str, *, group_size: int, multiple: int = 32, **params):
        self.estimator = estimators.get_estimator(name)
        self.params = self.estimator.resolve(params)  # validated here, not inside a trace
        self.name, self.group_size, self.multiple = name, group_size, multiple
        self.needs_special = estimators.needs_special(self.params)
        keys = self.estimator.kernel_params + estimators.SHAPING_PARAMS
        static = tuple(sorted((k, _hashable(self.params[k])) for k in keys))
        self._fn = _advantage_kernel(name, group_size, static)

    @property
    def compile_count(self) -> int:
        return self._fn.compile_count

    def __call__(self, rewards, gaps, mask, step: int = 0, special=None):
        check_inputs(rewards, gaps, mask, self.group_size)
        length = mask.shape[1]
        target = bucket_length(length, self.multiple)
        arrays = [
            rewards.astype(mx.float32),
            pad_length(gaps.astype(mx.float32), target),
            pad_length((mask != 0).astype(mx.float32), target),
            mx.array(self.estimator.lam(step, self.params), dtype=mx.float32),
        ]
        if self.needs_special:
            estimators.require_special(self.params, special)
            arrays.append(pad_length((special != 0).astype(mx.float32), target))
        token, base = self._fn(*arrays)
        return token[:, :length], base


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=None)
def _advantage_kernel(name: str, group_size: int, static: tuple) -> CountingCompiled:
    """One compiled `run_estimator` per (estimator, group size, static parameters)."""
    est, p = estimators.get_estimator(name), dict(static)

    def bound(rewards, gaps, mask, lam, special=None):
        return estimators.run_estimator(est, p, rewards, gaps, mask, lam, special, group_size)

    return CountingCompiled(bound, f"advantages/{name}")


# --------------------------------------------------------------------------- loss


class CompiledPolicyLoss:
    """`policy_loss` with its static options fixed: call it with `(logp, old_logp,
    advantages, mask, truncated=None, ref_logp=None, norm=None)`; returns `(loss,
    metrics)` like the eager function. Differentiable (use it inside `mx.grad`)."""

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        loss_agg: str = "seq-mean-token-mean",
        mask_truncated: bool = True,
        beta: float = 0.0,
        importance_level: str = "token",
        multiple: int = 32,
    ):
        check_loss_options(
            eps_low=eps_low, eps_high=eps_high, loss_agg=loss_agg, beta=beta, importance_level=importance_level
        )
        self.static = (float(eps_low), float(eps_high), loss_agg, bool(mask_truncated), float(beta), importance_level)
        self.multiple = multiple
        self._fns: dict[bool, CountingCompiled] = {}

    @classmethod
    def of(cls, loss) -> "CompiledPolicyLoss":
        """The loss of a recipe's `loss` section (`config.LossConfig`)."""
        return cls(
            eps_low=loss.eps_low,
            eps_high=loss.eps_high,
            loss_agg=loss.loss_agg,
            mask_truncated=loss.mask_truncated,
            beta=loss.beta,
            importance_level=loss.importance_level,
        )

    @property
    def compile_count(self) -> int:
        return sum(fn.compile_count for fn in self._fns.values())

    def __call__(self, logp, old_logp, advantages, mask, truncated=None, ref_logp=None, norm: LossNorm | None = None):
        beta = self.static[4]
        if beta > 0 and ref_logp is None:
            raise ValueError("ref_logp: required when beta > 0 (k3 KL to the reference model)")
        mask_truncated = self.static[3]
        if norm is None:
            norm = loss_norm(mask, truncated, mask_truncated=mask_truncated)
        if truncated is None:
            truncated = mx.zeros((mask.shape[0],), dtype=mx.float32)
        with_ref = ref_logp is not None
        fn = self._fns.get(with_ref)
        if fn is None:
            fn = self._fns[with_ref] = _loss_kernel(self.static, with_ref)

        target, rows = bucket_length(mask.shape[1], self.multiple), bucket_rows(mask.shape[0])
        per_token = [logp, old_logp, advantages, (mask != 0)] + ([ref_logp] if with_ref else [])
        padded = [pad_rows(pad_length(x.astype(mx.float32), target), rows) for x in per_token]
        scalars = [mx.array(v, dtype=mx.float32) for v in (norm.num_tokens, norm.num_seqs, norm.max_len)]
        return fn(*padded[:4], pad_rows(truncated.astype(mx.float32), rows), *padded[4:], *scalars)


@functools.lru_cache(maxsize=None)
def _loss_kernel(static: tuple, with_ref: bool) -> CountingCompiled:
    eps_low, eps_high, loss_agg, mask_truncated, beta, importance_level = static

    def kernel(logp, old_logp, advantages, mask, truncated, *rest):
        ref_logp = rest[0] if with_ref else None
        num_tokens, num_seqs, max_len = rest[-3:]
        return policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            eps_low=eps_low,
            eps_high=eps_high,
            loss_agg=loss_agg,
            truncated=truncated,
            mask_truncated=mask_truncated,
            beta=beta,
            ref_logp=ref_logp,
            norm=LossNorm(num_tokens, num_seqs, max_len),
            importance_level=importance_level,
        )

    return CountingCompiled(kernel, "policy_loss")

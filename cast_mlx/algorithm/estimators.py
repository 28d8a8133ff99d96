"""The registry of advantage estimators (after verl's `core_algos.register_adv_est`): GRPO,
CAST (the paper's and its veRL port's) and RLSD, registered by name, and the eager entry point.
Their math (spec sections 2, 4 and 4b, the inputs, outputs and conventions) is in
`cast_mlx.algorithm.advantages`.

An estimator is its declared facts (`cast_mlx.algorithm.facts.AlgorithmFacts`: does it read
a teacher, flip signs, clip at a_max, keep the teacher answer-free, give zero-variance
groups a base; its default reward scaling and teacher context) and two pure parts,
registered once with `@register_estimator`:

- a *kernel* `(rewards, gaps, mask, lam, *, group_size, <its static parameters>) ->
  (token_adv, base)`: MLX ops only, so `cast_mlx.algorithm.compiled` can `mx.compile` it as it is.
  Its keyword-only parameters are the recipe fields (`AlgorithmConfig`) it reads.
- a host-side *schedule* `(step, *, <its schedule parameters>) -> lam`: the lambda at a
  step, a Python float (passed to the kernel as a scalar, so a decaying lambda does not
  retrace a compiled kernel).

Parameter defaults live in one place, `config.AlgorithmConfig` (the two that differ by
algorithm, `scale_rewards` and `teacher.context`, in the facts); `compute_advantages` is the
eager entry point:

    token_adv, base = compute_advantages("cast", rewards, gaps, mask, group_size=8, step=t)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from cast_mlx import config
from cast_mlx.algorithm.advantages import (
    _check_choice,
    base_advantages,
    cast_token_advantages,
    center_gaps,
    check_base_params,
    check_cast_params,
    check_inputs,
    check_ratio_band,
    check_rlsd_params,
    dead_band,
    rlsd_token_advantages,
    scheduled_lambda,
    verifier_special_tokens,
)
from cast_mlx.algorithm.facts import ALGORITHMS, AlgorithmFacts, declare, facts_of

SPECIAL_TOKEN_RULES = ("teacher", "verifier")
SHAPING_PARAMS = ("special_tokens", "gap_centering")  # switches around every kernel (run_estimator)

# The default of every parameter an estimator may read, by name: the recipe's defaults.
DEFAULT_PARAMS = {f.name: f.default for f in dataclasses.fields(config.AlgorithmConfig) if f.name != "name"}


def default_scale_rewards(name: str) -> str:
    """The reward scaling an algorithm uses unless told otherwise (spec section 2): its
    declared `AlgorithmFacts.scale_rewards`."""
    return facts_of(name).scale_rewards


# --------------------------------------------------------------------------- the registry


def _keyword_params(fn: Callable, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY and n not in skip)


def _constant_zero(step: int) -> float:
    return 0.0


# How each part is called (`run_estimator`, `Estimator.lam`, `Estimator.resolve`): its number
# of positional parameters, the keyword-only ones it must have, and the shape an error shows.
_SIGNATURES = {
    "kernel": (4, ("group_size",), "(rewards, gaps, mask, lam, *, group_size, <recipe fields>)"),
    "schedule": (1, (), "(step, *, <recipe fields>)"),
    "check": (0, (), "(*, <recipe fields>)"),
}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

# A declared fact and the recipe field that its kernel must read to have it.
_FACT_PARAMS = {"clips_at_a_max": "a_max", "zero_var_base": "zero_var_base"}


def _check_part(name: str, role: str, fn) -> None:
    """Raise a ValueError unless `fn` can be called as the estimator's `role` is."""
    positional, required, shape = _SIGNATURES[role]
    if not callable(fn):
        raise ValueError(f"estimator {name!r}: its {role} must be a function {shape}, got {fn!r}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ValueError(f"estimator {name!r}: the signature of its {role} cannot be read") from None
    n_positional = sum(p.kind in _POSITIONAL for p in params)
    keyword = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    if n_positional != positional or any(p.kind in _VARIADIC for p in params) or not keyword >= set(required):
        raise ValueError(f"estimator {name!r}: its {role} must take {shape}, got {inspect.signature(fn)}")


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator (see the module docstring)."""

    name: str
    kernel: Callable
    schedule: Callable[..., float]
    check: Callable[..., object] | None  # validates static parameters; raises ValueError
    facts: AlgorithmFacts  # what it is (`algorithm.facts`): teacher, flips, clip, defaults

    @property
    def uses_teacher(self) -> bool:
        """Does the kernel read the gaps (so the trainer scores a teacher)?"""
        return self.facts.uses_teacher

    @property
    def kernel_params(self) -> tuple[str, ...]:
        return _keyword_params(self.kernel, skip=("group_size",))

    @property
    def schedule_params(self) -> tuple[str, ...]:
        return _keyword_params(self.schedule)

    @property
    def params(self) -> tuple[str, ...]:
        """Every parameter it reads; the other `DEFAULT_PARAMS` are accepted and ignored."""
        return self.kernel_params + self.schedule_params + SHAPING_PARAMS

    def resolve(self, params: dict) -> dict:
        """Its parameters from `params` (any of `DEFAULT_PARAMS`), defaults filled in and
        validated; an unknown name or a bad value raises a ValueError naming the field."""
        unknown = sorted(set(params) - set(DEFAULT_PARAMS))
        if unknown:
            raise ValueError(f"advantage parameters: unknown name(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}")
        p = {k: params.get(k, DEFAULT_PARAMS[k]) for k in self.params}
        p["scale_rewards"] = p["scale_rewards"] or self.facts.scale_rewards
        check_base_params(scale_rewards=p["scale_rewards"], eps=p["eps"], reward_std=p.get("reward_std", "sample"))
        _check_choice("special_tokens", p["special_tokens"], SPECIAL_TOKEN_RULES)
        if self.check is not None:
            self.check(**{k: p[k] for k in _keyword_params(self.check)})
        self.lam(0, p)
        return p

    def lam(self, step: int, p: dict) -> float:
        """The scheduled lambda at `step` under resolved parameters `p`."""
        return self.schedule(step, **{k: p[k] for k in self.schedule_params})

    def static(self, p: dict) -> dict:
        """The kernel's keyword arguments from resolved parameters `p`."""
        return {k: p[k] for k in self.kernel_params}


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(declared: str | AlgorithmFacts, *, schedule: Callable[..., float] = _constant_zero, check=None):
    """Register `kernel` (decorator); see the module docstring.

    `declared` is the name of an algorithm declared in `algorithm.facts` (the built-in ones,
    whose facts a recipe reads without loading MLX), or the `AlgorithmFacts` of a new one,
    which is declared together with its kernel. Everything is checked before either table
    changes: the name is new (and declared), the kernel, schedule and check take the
    parameters they are called with, each of their parameters is a recipe field, and the
    kernel reads the fields its facts need (`a_max` to clip at it, `zero_var_base` to give
    that base); a ValueError leaves both tables as they were."""

    def decorate(kernel: Callable) -> Callable:
        if isinstance(declared, AlgorithmFacts):
            facts: AlgorithmFacts | None = declared
            name = declared.name
        elif isinstance(declared, str):
            facts, name = ALGORITHMS.get(declared), declared
        else:
            raise ValueError(f"estimator: expected a declared name or AlgorithmFacts, got {declared!r}")
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        if facts is None:
            raise ValueError(
                f"estimator {name!r}: declare it in cast_mlx/algorithm/facts.py first, or register its AlgorithmFacts"
            )
        for role, fn in (("kernel", kernel), ("schedule", schedule), ("check", check)):
            if fn is not None or role != "check":
                _check_part(name, role, fn)
        est = Estimator(name, kernel, schedule, check, facts)
        checked = est.params + (_keyword_params(check) if check else ())
        unknown = sorted(set(checked) - set(DEFAULT_PARAMS))
        if unknown:
            raise ValueError(f"estimator {name!r}: parameters {unknown} are not fields of AlgorithmConfig")
        for fact, param in _FACT_PARAMS.items():
            if getattr(facts, fact) and param not in est.kernel_params:
                raise ValueError(f"estimator {name!r}: its facts say {fact}, but its kernel does not read {param}")
        if facts is declared:
            declare(facts)  # checks every field; the last step that may raise
        ESTIMATORS[name] = est
        return kernel

    return decorate


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm: {name!r} is declared but no estimator is registered for it")
        raise ValueError(f"algorithm: unknown name {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def needs_special(p: dict) -> bool:
    """Whether resolved parameters `p` read the special-token mask."""
    return p["special_tokens"] == "verifier" or bool(p["gap_centering"])


def require_special(p: dict, special) -> None:
    if special is None and needs_special(p):
        raise ValueError("special: the special-token mask is needed by special_tokens=verifier and gap_centering")


def run_estimator(est: Estimator, p: dict, rewards, gaps, mask, lam, special, group_size: int):
    """The kernel with the shaping switches around it (gap centring before, the special-token
    rule after): the one body that both the eager and the compiled path run."""
    if p["gap_centering"]:
        gaps = center_gaps(gaps.astype(mx.float32), (mask != 0) * (special == 0))
    token, base = est.kernel(rewards, gaps, mask, lam, group_size=group_size, **est.static(p))
    if p["special_tokens"] == "verifier":
        token = verifier_special_tokens(token, base, rewards, special, group_size)
        if est.facts.clips_at_a_max:  # spec 4b: the special tokens take the same final clip
            token = mx.clip(token, -p["a_max"], p["a_max"])
        token = mx.where(mask != 0, token, 0.0)
    return token, base


def compute_advantages(name: str, rewards, gaps, mask, *, group_size: int, step: int = 0, special=None, **params):
    """Token advantages `[N, L]` and base advantages `[N]` for algorithm `name`, eagerly.

    `params` may hold any of `DEFAULT_PARAMS` (missing ones take their defaults; those
    another algorithm uses are ignored). `special` `[N, L]` marks EOS and other special
    tokens (needed by `special_tokens="verifier"` and `gap_centering`)."""
    est = get_estimator(name)
    p = est.resolve(params)
    check_inputs(rewards, gaps, mask, group_size)
    require_special(p, special)
    return run_estimator(est, p, rewards, gaps, mask, est.lam(step, p), special, group_size)


# --------------------------------------------------------------------------- algorithms


@register_estimator("grpo")
def grpo_kernel(rewards, gaps, mask, lam, *, group_size, scale_rewards, eps, reward_std):
    """GRPO: every token of completion `i` gets `B_i`; zero-variance groups give 0."""
    base = base_advantages(
        rewards, group_size=group_size, scale_rewards=scale_rewards, zero_var_value=0.0, eps=eps, reward_std=reward_std
    )
    return mx.where(mask != 0, base[:, None], 0.0), base


def cast_lambda_at(step: int, *, cast_lambda, lambda_schedule, lambda_decay_steps) -> float:
    return scheduled_lambda(step, cast_lambda, lambda_schedule, lambda_decay_steps)


@register_estimator("cast", schedule=cast_lambda_at, check=check_cast_params)
def cast_kernel(
    rewards,
    gaps,
    mask,
    lam,
    *,
    group_size,
    scale_rewards,
    eps,
    reward_std,
    zero_var_base,
    correct_box,
    wrong_box,
    a_max,
    flip,
    flip_deadband,
):
    """CAST: base advantages with `±zero_var_base` for zero-variance groups, then the
    section-4 token rule with the scheduled lambda."""
    base = base_advantages(
        rewards,
        group_size=group_size,
        scale_rewards=scale_rewards,
        zero_var_value=float(zero_var_base),
        eps=eps,
        reward_std=reward_std,
    )
    token = cast_token_advantages(
        base,
        gaps,
        mask,
        lam,
        correct_box=correct_box,
        wrong_box=wrong_box,
        a_max=a_max,
        flip=flip,
        flip_deadband=flip_deadband,
    )
    return token, base


def check_cast_verl_params(*, correct_box, wrong_box, ratio_band) -> None:
    check_cast_params(correct_box=correct_box, wrong_box=wrong_box, a_max=math.inf, flip="none", flip_deadband=0.0)
    check_ratio_band(ratio_band=ratio_band)


@register_estimator("cast-verl", schedule=cast_lambda_at, check=check_cast_verl_params)
def cast_verl_kernel(
    rewards,
    gaps,
    mask,
    lam,
    *,
    group_size,
    scale_rewards,
    eps,
    reward_std,
    zero_var_base,
    correct_box,
    wrong_box,
    ratio_band,
):
    """The authors' later port of CAST (spec 4b, veRL): no flips, so `sign(A) = sign(B)` and
    the teacher sets only the magnitude (`B * max(0, 1 + lam*(clip(e^{s*g}, box) - 1))`), no
    final clip, and an optional dead-band on the probability ratio. `scale_rewards`
    defaults to `group` (the std is divided out); zero-variance groups keep CAST's
    `±zero_var_base`."""
    base = base_advantages(
        rewards,
        group_size=group_size,
        scale_rewards=scale_rewards,
        zero_var_value=float(zero_var_base),
        eps=eps,
        reward_std=reward_std,
    )
    token = cast_token_advantages(
        base,
        dead_band(gaps.astype(mx.float32), ratio_band),
        mask,
        lam,
        correct_box=correct_box,
        wrong_box=wrong_box,
        a_max=math.inf,
        flip="none",
    )
    return token, base


def rlsd_lambda_at(step: int, *, rlsd_lambda_start, rlsd_lambda_steps) -> float:
    """RLSD's lambda decays linearly from `rlsd_lambda_start` to 0 over `rlsd_lambda_steps`."""
    return scheduled_lambda(
        step, rlsd_lambda_start, "linear_decay", rlsd_lambda_steps, "rlsd_lambda_start", "rlsd_lambda_steps"
    )


@register_estimator("rlsd", schedule=rlsd_lambda_at, check=check_rlsd_params)
def rlsd_kernel(rewards, gaps, mask, lam, *, group_size, scale_rewards, eps, reward_std, rlsd_eps_w):
    """RLSD: GRPO base advantages reweighted per token with the scheduled lambda."""
    base = base_advantages(
        rewards, group_size=group_size, scale_rewards=scale_rewards, zero_var_value=0.0, eps=eps, reward_std=reward_std
    )
    return rlsd_token_advantages(base, gaps, mask, lam, eps_w=rlsd_eps_w), base

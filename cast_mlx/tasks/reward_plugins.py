"""User reward plug-ins: importing them (here at parse time, in the verifier pool's workers at
score time) and calling them, with their return values checked, so that a worker only ever
sends back floats, None or a one-line error. The rewards stage that runs them: `rewards`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import reprlib
import sys
from collections.abc import Callable
from typing import Any

from cast_mlx.errors import TrainingError


class RewardError(TrainingError):
    """A reward function failed in training: it raised, hung, or returned bad values."""


# ---- loading (in this process at parse time, in the workers at score time) --------------


def is_file_target(location: str) -> bool:
    return location.endswith(".py") or "/" in location or os.sep in location


def load_plugin(target: str) -> Callable[..., Any]:
    """The function of a target ("module:function" or "/path/file.py:function"), imported now."""
    location, attr = target.rsplit(":", 1)
    module = _load_file(location) if is_file_target(location) else importlib.import_module(location)
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"{location} has no function {attr!r}")
    if not callable(fn):
        raise TypeError(f"{location}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(path: str) -> Any:
    """Import a .py file as a module of its own (named after its path, so two never clash)."""
    name = "cast_mlx_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_PLUGINS: dict[str, Callable[..., Any]] = {}  # in a worker: the loaded plug-ins by target


def _cached_plugin(target: str, search_path: tuple[str, ...]) -> Callable[..., Any]:
    fn = _PLUGINS.get(target)
    if fn is None:
        if sys.path != list(search_path):  # import the module the main process checked
            sys.path[:] = search_path
            importlib.invalidate_caches()
        fn = _PLUGINS[target] = load_plugin(target)
    return fn


def worker_load(targets: tuple[str, ...], search_path: tuple[str, ...]) -> tuple:
    """Worker job: import the plug-ins, under `LOAD_TIMEOUT` rather than a call's limit."""
    for target in targets:
        try:
            _cached_plugin(target, search_path)
        except BaseException as e:  # user code: report it, rather than lose the worker (SystemExit)
            return ("error", target, describe(e))
    return ("ok",)


def worker_call(label: str, target: str, search_path: tuple[str, ...], completions: list[str], kwargs: dict) -> tuple:
    """Worker job: one plug-in call. Its values are checked here, so only floats and None go
    back (an unpicklable return value would kill the worker), and a failure is a message."""
    try:
        values = _cached_plugin(target, search_path)(completions, **kwargs)
    except BaseException as e:  # user code: report it, rather than lose the worker (SystemExit)
        return ("error", f"reward function {label!r} raised {describe(e)}")
    try:
        return ("ok", check_values(label, values, len(completions)))
    except RewardError as e:
        return ("error", str(e))


# ---- values and messages -------------------------------------------------------------


def check_values(label: str, values: Any, n: int) -> list[float | None]:
    """A function's return value as floats and None, or a `RewardError` naming it and the row."""
    if hasattr(values, "tolist"):  # NumPy / MLX arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward function {label!r} returned a {type(values).__name__}; expected a list of {n} numbers or None"
        )
    if len(values) != n:
        raise RewardError(f"reward function {label!r} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {label!r} returned a {type(v).__name__} at row {i} ({short_repr(v)}); "
                "rewards are numbers or None"
            )
        x = float(v)
        if not math.isfinite(x):
            raise RewardError(
                f"reward function {label!r} returned {x} at row {i}; rewards must be finite (None: cannot judge)"
            )
        out.append(x)
    return out


def describe(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def short_repr(value: Any) -> str:
    return reprlib.repr(value).replace("\n", "\\n")

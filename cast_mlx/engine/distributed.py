"""Data parallelism over `mx.distributed`: the world, the shard rule and the collectives
the trainer needs. MLX is the engine (ring over TCP/Thunderbolt, MPI, ...) and `mlx.launch`
starts the processes; this module only decides what is exchanged.

How one step is split over `N` processes (ranks):

- Every rank advances the same global data cursor by `sampling.prompts_per_step` (`P`)
  and keeps its own contiguous slice of the step's problems: rank `r` gets problems
  `[r*P/N, (r+1)*P/N)` (`shard`). `P` must be a multiple of `N` (`per_rank`).
- Rank `r` samples the global streams of its slice (the rollout's per-stream random
  numbers are cut from the table of the whole step), so every completion gets the same
  tokens as in a single-process run with the same seed.
- Rewards, teacher scores and advantages are computed where the rows are: a group lives
  on one rank, so group statistics never cross ranks.
- The loss normaliser (`LossNorm`) is reduced over ranks (`global_norm`), so each rank's
  micro-batch losses are partial sums of the *global* loss; gradients are then summed
  (`sum_tree`, a sum and not a mean) into exactly the single-process accumulated
  gradient, and every rank clips and takes the same AdamW step.
- Metrics: the per-row arrays are gathered (`gather_rows`) and the global line is
  computed from them; phase times and memory are the slowest rank's (`max_values`).

A world of size 1 (the program was not launched by `mlx.launch`) skips every collective:
a single-process run does exactly what it did before this module existed.

Failures. A rank that dies closes its sockets: the ring backend then fails the pending
collective on the other ranks at once ("connection to a peer was lost"), raised here as
`PeerLost`. A rank that hangs, or whose host vanishes without closing its connections,
is caught by a watchdog: a rank that waits longer than `World.timeout` seconds in one
collective prints an error and exits with `EXIT_TIMEOUT` (`os._exit`: the waiting thread is
blocked inside MLX and cannot be interrupted). The timeout comes from the environment
variable `CAST_MLX_DIST_TIMEOUT` (seconds), else the recipe's `system.dist_timeout`
(default 900, the same as `DEFAULT_TIMEOUT`, which applies while connecting at start-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence, cast

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx.config import ConfigError
from cast_mlx.errors import EXIT_TIMEOUT

TIMEOUT_ENV = "CAST_MLX_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 900.0  # seconds one collective may wait for the other ranks


class PeerLost(RuntimeError):
    """Another rank died or became unreachable; the message says during what."""


@dataclass
class World:
    """This process's place in the run. `group` is the `mx.distributed.Group` (None for a
    single process); `comm_seconds`, `comm_bytes` and `comm_calls` accumulate the time spent
    inside collectives (waiting for slower ranks included), the bytes this rank handed to
    them (payload: a ring all-sum sends about `2 (N-1)/N` times its payload per rank) and
    their number."""

    rank: int = 0
    size: int = 1
    group: object = None
    timeout: float = DEFAULT_TIMEOUT
    comm_seconds: float = 0.0
    comm_bytes: int = 0
    comm_calls: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes metrics and checkpoints."""
        return self.rank == 0

    def comm_counters(self) -> tuple[float, int, int]:
        return (self.comm_seconds, self.comm_bytes, self.comm_calls)

    def comm_since(self, start: tuple[float, int, int]) -> dict:
        """The `time/comm`, `comm/bytes` and `comm/calls` metrics since `comm_counters()` was `start`."""
        return {
            "time/comm": self.comm_seconds - start[0],
            "comm/bytes": self.comm_bytes - start[1],
            "comm/calls": self.comm_calls - start[2],
        }


def timeout_from_env(default: float = DEFAULT_TIMEOUT) -> float:
    """`CAST_MLX_DIST_TIMEOUT` in seconds (a positive number), else `default`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}: expected a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}: must be > 0, got {raw!r}")
    return value


def recipe_timeout(recipe) -> float:
    """The collective timeout for a run: `CAST_MLX_DIST_TIMEOUT` when set, else the recipe's
    `system.dist_timeout`."""
    return timeout_from_env(float(recipe.system.dist_timeout))


def init_world(timeout: float | None = None) -> World:
    """Join the processes started by `mlx.launch` (any backend MLX finds), or a world of
    one when not launched. Connecting waits for every rank, under the watchdog."""
    world = World(timeout=timeout_from_env() if timeout is None else timeout)
    with _watched(world, "start-up (connecting to the other ranks)"):
        try:
            group = mx.distributed.init()
        except RuntimeError as exc:
            raise PeerLost(f"could not connect to the other ranks: {exc}") from exc
    if group.size() > 1:
        world.rank, world.size, world.group = group.rank(), group.size(), group
    return world


# --------------------------------------------------------------------------- the shard rule


def per_rank(prompts_per_step: int, size: int) -> int:
    """Prompts each rank samples per step: the recipe's global `prompts_per_step` split
    evenly over `size` ranks; a ConfigError when it does not divide."""
    if prompts_per_step % size:
        raise ConfigError(
            f"sampling.prompts_per_step: {prompts_per_step} prompts per step cannot be split evenly "
            f"over {size} processes; use a multiple of {size} (each process samples prompts_per_step / N)"
        )
    return prompts_per_step // size


def shard(items: Sequence, rank: int, size: int) -> list:
    """Rank `rank`'s contiguous slice of `items` (whose length is a multiple of `size`)."""
    if len(items) % size:
        raise ValueError(f"shard: {len(items)} items do not split evenly over {size} ranks")
    n = len(items) // size
    return list(items[rank * n : (rank + 1) * n])


def shard_uneven(items: Sequence, rank: int, size: int) -> list:
    """Rank `rank`'s contiguous slice of `items` when the length need not divide: the
    first `len % size` ranks get one item more (like `numpy.array_split`)."""
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


def check_recipe(recipe, size: int) -> None:
    """ConfigErrors for recipes that cannot be split over `size` ranks."""
    if size == 1:
        return
    per_rank(recipe.sampling.prompts_per_step, size)
    if recipe.sampling.dynamic:
        raise ConfigError(
            f"sampling.dynamic: its rounds are not split over {size} processes yet; "
            "set sampling.dynamic=false or train in one process"
        )
    if recipe.algorithm.scale_rewards == "batch":
        raise ConfigError(
            "algorithm.scale_rewards: 'batch' divides by the std of the whole batch, which is split "
            f"over {size} processes; use 'group' or 'none', or train in one process"
        )


# --------------------------------------------------------------------------- collectives


def _give_up(world: World, what: str) -> None:
    print(
        f"error: rank {world.rank} waited more than {world.timeout:g} s for the other ranks during "
        f"{what}: a rank died or hangs. Exiting; the last checkpoint is intact (resume with the same "
        f"number of processes). Raise system.dist_timeout (or set {TIMEOUT_ENV}) to wait longer.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_TIMEOUT)


@contextmanager
def _watched(world: World, what: str):
    """Exit the process if the block takes longer than `world.timeout` seconds."""
    timer = threading.Timer(world.timeout, _give_up, (world, what))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _collective(world: World, what: str, op, x: mx.array) -> mx.array:
    """Run one collective `op(x, group=...)` now: `x` is evaluated first (local work is
    neither timed as communication nor mistaken for a lost peer), then the collective,
    under the watchdog; a backend error becomes `PeerLost`."""
    mx.eval(x)
    start = time.perf_counter()
    try:
        with _watched(world, what):
            out = op(x, group=world.group)
            mx.eval(out)
    except RuntimeError as exc:
        raise PeerLost(
            f"rank {world.rank} lost contact with another rank during {what} ({exc}); it died or its "
            "host became unreachable. The last checkpoint is intact: resume with the same number of processes"
        ) from exc
    finally:
        world.comm_seconds += time.perf_counter() - start
        world.comm_bytes += x.nbytes
        world.comm_calls += 1
    return out


def barrier(world: World, what: str = "a barrier") -> None:
    """Wait until every rank gets here."""
    if world.size > 1:
        _collective(world, what, mx.distributed.all_sum, mx.array([1.0]))


def max_int(world: World, value: int, what: str = "agreeing on a value") -> int:
    """The largest `value` over ranks (e.g. an agreed stop code: 0 = go on)."""
    if world.size == 1:
        return int(value)
    return int(
        cast(int, _collective(world, what, mx.distributed.all_max, mx.array([int(value)], dtype=mx.int32)).item())
    )


def max_int_vector(world: World, values: list[int], what: str = "agreeing on sizes") -> list[int]:
    """Element-wise maxima over ranks of a list of integers."""
    if world.size == 1:
        return [int(v) for v in values]
    return cast(
        "list[int]", _collective(world, what, mx.distributed.all_max, mx.array(values, dtype=mx.int32)).tolist()
    )


def same_everywhere(world: World, text: str, what: str = "comparing recipes") -> bool:
    """Whether every rank passed the same `text` (compared by a 128-bit hash)."""
    if world.size == 1:
        return True
    digest = hashlib.sha256(text.encode()).digest()[:16]
    words = mx.array(
        [int.from_bytes(digest[i : i + 4], "little", signed=True) for i in range(0, 16, 4)], dtype=mx.int32
    )
    high = _collective(world, what, mx.distributed.all_max, words)
    low = _collective(world, what, mx.distributed.all_min, words)
    return bool(mx.array_equal(high, low).item())


def _as_float(v) -> float:
    return float(cast(float, v.item())) if isinstance(v, mx.array) else float(v)


def _reduce_values(world: World, values: dict, op, what: str) -> dict[str, float]:
    """`{name: op over ranks}` of scalar values (floats or scalar arrays), as floats, in one
    collective. Every rank must pass the same names in the same order."""
    if world.size == 1:
        return {k: _as_float(v) for k, v in values.items()}
    vec = mx.stack([mx.array(v, dtype=mx.float32).reshape(()) for v in values.values()])
    out = cast("list[float]", _collective(world, what, op, vec).tolist())
    return dict(zip(values, out))


def sum_values(world: World, values: dict, what: str = "summing statistics") -> dict[str, float]:
    """`{name: sum over ranks}` of scalar values, as floats (same names on every rank)."""
    return _reduce_values(world, values, mx.distributed.all_sum, what)


def max_values(world: World, values: dict, what: str = "comparing timings") -> dict[str, float]:
    """`{name: max over ranks}` of scalar values, as floats (same names on every rank)."""
    return _reduce_values(world, values, mx.distributed.all_max, what)


def global_norm(world: World, norm):
    """The loss normaliser (`algorithm.loss.LossNorm`) of the whole batch from each rank's:
    token and sequence counts are summed, `max_len` is the largest."""
    if world.size == 1:
        return norm
    counts = mx.stack([mx.array(norm.num_tokens, dtype=mx.float32), mx.array(norm.num_seqs, dtype=mx.float32)])
    counts = _collective(world, "reducing the loss normaliser", mx.distributed.all_sum, counts)
    longest = _collective(
        world,
        "reducing the loss normaliser",
        mx.distributed.all_max,
        mx.array(norm.max_len, dtype=mx.float32).reshape((1,)),
    )
    return dataclasses.replace(norm, num_tokens=counts[0], num_seqs=counts[1], max_len=longest[0])


def sum_tree(world: World, tree, what: str = "summing gradients"):
    """The element-wise sum over ranks of a tree of arrays (e.g. gradients), in one
    collective: the leaves are flattened into one float32 buffer, summed, and split back."""
    if world.size == 1:
        return tree
    leaves = cast("list[tuple[str, mx.array]]", tree_flatten(tree))
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    total = _collective(world, what, mx.distributed.all_sum, flat)
    out, start = [], 0
    for name, v in leaves:
        out.append((name, total[start : start + v.size].reshape(v.shape).astype(v.dtype)))
        start += v.size
    return tree_unflatten(out)


def gather_rows(world: World, columns: dict[str, mx.array], what: str = "gathering metrics") -> dict[str, mx.array]:
    """Concatenate per-row arrays over ranks, in rank order.

    `columns` maps names to `[n]` or `[n, L]` arrays sharing the row count `n` (which may
    differ between ranks, and may be 0). `[n, L]` columns are zero-padded to the largest
    `L` over ranks. Values travel as float32, so integers and flags must be small
    (< 2**24) to come back exact; each column comes back in its own dtype.
    """
    if world.size == 1:
        return dict(columns)
    names = list(columns)
    n = columns[names[0]].shape[0]
    flat = [columns[k].ndim == 1 for k in names]
    sizes = max_int_vector(world, [n] + [0 if f else columns[k].shape[1] for k, f in zip(names, flat)], what)
    rows = sizes[0]
    spans = [1 if f else w for f, w in zip(flat, sizes[1:])]
    parts = [mx.pad(mx.ones((n, 1)), [(0, rows - n), (0, 0)])]  # the "this row is real" column
    for k, f, span in zip(names, flat, spans):
        x = columns[k].astype(mx.float32)
        x = x.reshape(n, 1) if f else x
        parts.append(mx.pad(x, [(0, rows - n), (0, span - x.shape[1])]))
    packed = _collective(world, what, mx.distributed.all_gather, mx.concatenate(parts, axis=1))
    real = [i for i, v in enumerate(cast("list[float]", packed[:, 0].tolist())) if v > 0]
    packed = packed[mx.array(real, dtype=mx.int32)] if real else packed[:0]
    out, col = {}, 1
    for k, f, span in zip(names, flat, spans):
        x = packed[:, col : col + span]
        out[k] = (x[:, 0] if f else x).astype(columns[k].dtype)
        col += span
    return out

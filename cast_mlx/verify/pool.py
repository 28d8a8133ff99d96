"""Batch verification with a memo and a hard per-comparison timeout.

`TimeoutPool` runs module-level functions in spawned worker processes and kills any call
that runs past its wall-clock limit; `Verifier` uses it for the sympy rung of the ladder
and memoises decisions by (gold, extracted answer).
"""

from __future__ import annotations

import multiprocessing
import time
from collections import OrderedDict, deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_connections
from typing import Callable, Sequence, cast

from cast_mlx.verify.equivalence import ParsedAnswer, equivalent, is_equivalent, parse_gold, quick_equivalent
from cast_mlx.verify.verdict import Verdict, plan


def _worker_main(conn) -> None:
    """Worker process loop: receive (function, args), send back the function's result."""
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        function, args = job
        try:
            result = function(*args)
        except Exception:  # e.g. a sympy internal error: the caller gets the default
            result = None
        conn.send(result)


class _Worker:
    """One spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.kill()


class TimeoutPool:
    """Run module-level functions in worker processes with a hard wall-clock limit each.

    A call that runs past `timeout` seconds has its worker killed (SIGKILL) and replaced,
    and yields `default`. Workers use the "spawn" start method (no fork of a process that
    may hold MLX threads) and are started, and imported, before any deadline counts; as
    with any spawned process, the main script must be importable (a `__main__` guard).
    """

    def __init__(self, workers: int = 2, timeout: float = 2.0):
        if workers < 1 or timeout <= 0:
            raise ValueError("a TimeoutPool needs workers >= 1 and timeout > 0")
        self.size = workers
        self.timeout = timeout
        self.timeouts = 0  # calls killed for running too long
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers

    def _start_missing(self) -> None:
        started: list[_Worker] = []
        for slot, worker in enumerate(self._workers):
            if worker is None:
                new = _Worker(self._ctx)
                self._workers[slot] = new
                started.append(new)
        for worker in started:
            try:
                ready = worker.conn.poll(120) and worker.conn.recv() == "ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                raise RuntimeError(
                    "a verifier worker process failed to start (spawned workers re-import "
                    "the main script: guard it with `if __name__ == '__main__':`)"
                )

    def _busy(self, slot: int) -> _Worker:
        """The worker of a slot that has one (every slot after `_start_missing`, until `_retire`)."""
        worker = self._workers[slot]
        if worker is None:  # never: a call is only sent to, or awaited from, a started worker
            raise RuntimeError(f"verifier pool: slot {slot} has no worker")
        return worker

    def _retire(self, slot: int) -> None:
        self._busy(slot).kill()
        self._workers[slot] = None

    def run(self, calls: Sequence[tuple], default=None) -> list:
        """Results of `function(*args)` for each (function, args), in order."""
        results = [default] * len(calls)
        pending = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, deadline)
        while pending or busy:
            if pending and len(busy) < self.size:
                self._start_missing()
                for slot in range(self.size):
                    if slot not in busy and pending:
                        index = pending.popleft()
                        self._busy(slot).conn.send(calls[index])
                        busy[slot] = (index, time.monotonic() + self.timeout)
            conns = {self._busy(slot).conn: slot for slot in busy}
            next_deadline = min(deadline for _, deadline in busy.values())
            # only Connections are waited on, so only Connections come back
            ready = cast("list[Connection]", _wait_connections(list(conns), max(0.0, next_deadline - time.monotonic())))
            for conn in ready:
                slot = conns[conn]
                index, _ = busy.pop(slot)
                try:
                    result = conn.recv()
                except (EOFError, OSError):  # the worker died: replace it
                    self._retire(slot)
                    continue
                if result is not None:
                    results[index] = result
            now = time.monotonic()
            for slot, (_index, deadline) in list(busy.items()):
                if now >= deadline:
                    self.timeouts += 1
                    self._retire(slot)
                    del busy[slot]
        return results

    def close(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[slot] = None


def _plan_gold(gold: str) -> ParsedAnswer:
    """The parsed gold of a `Plan`'s pair: `plan` parsed it already, and `parse_gold` is pure."""
    parsed = parse_gold(gold)
    assert parsed is not None, "only golds that a Plan could parse reach the verifier's pairs"
    return parsed


def _equivalence_job(pred: str, gold: str) -> bool:
    """What a worker computes: the full ladder for one (answer, gold) pair."""
    return bool(is_equivalent(pred, gold))


class Verifier:
    """Verify many completions: memoised, parallel, and with a hard time limit.

    Extraction and the cheap rungs (same string, exact numbers) run in this process;
    comparisons that need sympy run in a `TimeoutPool` of `workers` processes, where one
    that takes longer than `timeout` seconds is killed and counts as wrong. Results are
    memoised by (gold, extracted answer). With `workers=0` everything runs in this process
    (no hard timeout; the parser's size limits still bound the work).
    """

    def __init__(self, workers: int = 2, timeout: float = 2.0, memo_size: int = 200_000):
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.memo_size = memo_size
        self._memo: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._pool = TimeoutPool(workers, timeout) if workers > 0 else None

    @property
    def timeouts(self) -> int:
        """How many comparisons hit the time limit so far (worth logging as a metric)."""
        return self._pool.timeouts if self._pool else 0

    def verify(self, completion: str, gold: str, answer_format: str = "hash") -> Verdict | None:
        return self.verify_batch([(completion, gold, answer_format)])[0]

    def verify_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict | None]:
        """Verdicts for (completion, gold, answer_format) triples, in order."""
        plans = [plan(completion, gold, answer_format) for completion, gold, answer_format in items]
        pairs: dict[tuple[str, str], None] = {}  # ordered set of (gold, answer)
        for p in plans:
            if p is not None:
                for answer in p.answers():
                    pairs[(p.gold, answer)] = None
        decided = self._decide(list(pairs))

        def decide_for(gold: str) -> Callable[[str], bool]:
            return lambda answer: decided[(gold, answer)]

        verdicts: list[Verdict | None] = []
        for p in plans:
            if p is None:
                verdicts.append(None)
            else:
                verdicts.append(p.verdict(decide_for(p.gold)))
        return verdicts

    def close(self) -> None:
        """Stop the worker processes (they are daemons and also die with this process)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decide(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        decided: dict[tuple[str, str], bool] = {}
        slow = []
        for key in pairs:
            if key in self._memo:
                decided[key] = self._memo[key]
                continue
            gold, answer = key
            quick = quick_equivalent(answer, _plan_gold(gold))
            if quick is None:
                slow.append(key)
            else:
                decided[key] = quick
        if slow:
            if self._pool is None:
                for gold, answer in slow:
                    decided[(gold, answer)] = bool(equivalent(answer, _plan_gold(gold)))
            else:
                calls = [(_equivalence_job, (answer, gold)) for gold, answer in slow]
                for key, result in zip(slow, self._pool.run(calls, default=False)):
                    decided[key] = bool(result)
        for key, value in decided.items():
            self._memo[key] = value
            self._memo.move_to_end(key)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return decided

"""Batch verification: `TimeoutPool` (spawned workers that ignore SIGINT/SIGTERM, killed when a
call runs past its limit, replaced when they die) and `Verifier` (memoised by gold and
extracted answer). Details: docs/design.md, "The verifier"."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict, deque
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_connections
from multiprocessing.util import Finalize
from typing import Callable, Sequence, cast

from cast_mlx.tasks.verify.equivalence import ParsedAnswer, equivalent, is_equivalent, parse_gold, quick_equivalent
from cast_mlx.tasks.verify.verdict import Verdict, plan

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# POSIX only: without it (Windows) there are no process-group signals to shield workers from
_HAVE_SIGMASK = hasattr(signal, "pthread_sigmask")


def _exit_with_parent(parent: int) -> None:
    """Watchdog thread: leave when the parent dies mid-call (EOF is only seen between calls)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(conn) -> None:
    """Worker process loop: receive (function, args), send back the function's result."""
    # `_Worker` spawned us with these signals blocked, so one sent during start-up is still
    # pending; ignoring it discards it, and only then is it safe to unblock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _HAVE_SIGMASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        conn.send("ready")
        while True:
            job = conn.recv()
            if job is None:
                return
            function, args = job
            try:
                result = function(*args)
            except Exception:  # e.g. a sympy internal error: the caller gets the default
                result = None
            conn.send(result)
    except (EOFError, OSError):  # the parent closed the pipe or died: nobody is listening
        return


class _Worker:
    """One spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        if _HAVE_SIGMASK:
            # The child inherits this thread's signal mask through fork and exec: with the
            # stop signals blocked, a Ctrl-C during its start-up (interpreter, imports) waits
            # until `_worker_main` ignores it instead of killing it. The resource tracker is
            # started first because starting it unblocks these signals (it does the same dance).
            resource_tracker.ensure_running()
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                self.process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        else:
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


def _stop_workers(workers: list[_Worker | None]) -> None:
    """Stop and forget every started worker (`TimeoutPool.close`, and its finalizer)."""
    for slot, worker in enumerate(workers):
        if worker is not None:
            worker.stop()
            workers[slot] = None


class TimeoutPool:
    """Run module-level functions in worker processes with a hard wall-clock limit each.

    A call that runs past `timeout` seconds has its worker killed (SIGKILL) and replaced,
    and yields `default`. A worker found dead (killed by a signal, crashed) is replaced
    too: a call that never reached it is sent to the new one, and a call it died under is
    retried once, then given up on like a timeout. Workers use the "spawn" start method (no
    fork of a process that may hold MLX threads) and are started, and imported, before any
    deadline counts; as with any spawned process, the main script must be importable (a
    `__main__` guard).
    """

    def __init__(self, workers: int = 2, timeout: float = 2.0):
        if workers < 1 or timeout <= 0:
            raise ValueError("a TimeoutPool needs workers >= 1 and timeout > 0")
        self.size = workers
        self.timeout = timeout
        self.timeouts = 0  # calls given up on: killed for running too long, or their worker died twice
        self.deaths = 0  # workers found dead (not killed by us) and replaced
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers
        # Workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join, every
        # child) would wait forever on them: stop them first, at exit or when the pool is
        # collected unclosed (exit priority >= 0 runs before that hook's terminate).
        Finalize(self, _stop_workers, args=(self._workers,), exitpriority=10)

    def start(self) -> None:
        """Start the workers now rather than at the first call that needs one."""
        self._start_missing()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the started workers (none before the first call, or after `close`)."""
        return [cast(int, worker.process.pid) for worker in self._workers if worker is not None]

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

    def run(self, calls: Sequence[tuple], default=None, timeout: float | None = None) -> list:
        """Results of `function(*args)` for each (function, args), in order.

        `timeout` replaces the pool's limit for this run's calls (e.g. reward plug-ins,
        which get longer than a sympy comparison)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"a TimeoutPool run needs timeout > 0, got {timeout!r}")
        limit = self.timeout if timeout is None else timeout
        results = [default] * len(calls)
        pending = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, deadline)
        retried: set[int] = set()  # calls whose worker died under them once already
        try:
            while pending or busy:
                if pending and len(busy) < self.size:
                    self._start_missing()
                    for slot in range(self.size):
                        if slot in busy or not pending:
                            continue
                        index = pending.popleft()
                        try:
                            self._busy(slot).conn.send(calls[index])
                        except OSError:  # e.g. BrokenPipeError: it died while idle; the call never reached it
                            pending.appendleft(index)
                            self._retire(slot)
                            self.deaths += 1
                            continue
                        busy[slot] = (index, time.monotonic() + limit)
                if not busy:  # every send found a dead worker: start fresh ones
                    continue
                conns = {self._busy(slot).conn: slot for slot in busy}
                next_deadline = min(deadline for _, deadline in busy.values())
                # only Connections are waited on, so only Connections come back
                timeout = max(0.0, next_deadline - time.monotonic())
                ready = cast("list[Connection]", _wait_connections(list(conns), timeout))
                for conn in ready:
                    slot = conns[conn]
                    index, _ = busy.pop(slot)
                    try:
                        result = conn.recv()
                    except (EOFError, OSError):
                        # The worker died under this call (a signal, or a crash the call may
                        # have caused): retry it once on a fresh worker, then give up on it as
                        # on a timeout, so that a crash is never a silent `default`.
                        self._retire(slot)
                        self.deaths += 1
                        if index in retried:
                            self.timeouts += 1
                        else:
                            retried.add(index)
                            pending.appendleft(index)
                        continue
                    if result is not None:
                        results[index] = result
                now = time.monotonic()
                for slot, (_index, deadline) in list(busy.items()):
                    if now >= deadline:
                        self.timeouts += 1
                        self._retire(slot)
                        del busy[slot]
        except BaseException:
            # A run stopped midway (e.g. KeyboardInterrupt) may leave calls in flight or a pipe
            # mid-message: start afresh, rather than read a late result as the next run's answer.
            self._kill_all()
            raise
        return results

    def _kill_all(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.kill()
                self._workers[slot] = None

    def close(self) -> None:
        _stop_workers(self._workers)


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
    that takes longer than `timeout` seconds is killed and counts as wrong (so does one
    whose worker dies under it twice; a worker killed by a signal is replaced). Results are
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
        """How many comparisons were given up on so far, counted as wrong: past the time
        limit, or their worker died under them twice (worth logging as a metric)."""
        return self._pool.timeouts if self._pool else 0

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes (none before the first pool call)."""
        return self._pool.worker_pids if self._pool else []

    @property
    def pool(self) -> TimeoutPool | None:
        """The worker pool (None with `workers=0`): other module-level jobs, such as reward
        plug-ins, share its processes instead of starting their own."""
        return self._pool

    def start(self) -> "Verifier":
        """Start the worker processes now (the trainer does, so that they are up, and their
        start-up paid, before the first step)."""
        if self._pool is not None:
            self._pool.start()
        return self

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
        """Stop the worker processes (they also stop when this process exits or dies)."""
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

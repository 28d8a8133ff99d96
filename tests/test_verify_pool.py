"""The verifier's worker pool under signals: real processes, real signals (issue #15).

A Ctrl-C in a terminal, or `kill -- -PGID` from a batch scheduler, reaches every process of
the group, the verifier's workers too. The trainer stops cleanly after the step, so its next
`verify_batch` must still work: workers ignore SIGINT and SIGTERM, a worker that dies anyway
is replaced, and workers still exit when their parent dies.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cast_mlx.tasks.verify import TimeoutPool, Verifier, parse_gold, quick_equivalent

ROOT = Path(__file__).resolve().parents[1]
_fresh = itertools.count(2)  # each batch its own golds, so the memo never answers for the workers


def batch() -> tuple[list[tuple[str, str, str]], list[tuple[bool, bool]]]:
    """(completion, gold, format) items and their (strict, lenient) verdicts: two decided in
    this process (exact numbers), two that only a worker decides (sympy)."""
    k = next(_fresh)
    gold = f"\\sqrt{{{k}}}"
    right, wrong = f"\\sqrt{{{4 * k}}}/2", f"\\sqrt{{{k + 1}}}"
    assert quick_equivalent(right, parse_gold(gold)) is None  # not decided without a worker
    assert quick_equivalent(wrong, parse_gold(gold)) is None
    items = [("#### 4", "4", "hash"), ("#### 5", "4", "hash"), (f"\\boxed{{{right}}}", gold, "boxed")]
    items.append((f"\\boxed{{{wrong}}}", gold, "boxed"))
    return items, [(True, True), (False, False), (True, True), (False, False)]


def verdicts_of(verifier: Verifier, items) -> list[tuple[bool, bool]]:
    return [(v.strict, v.lenient) for v in verifier.verify_batch(items)]


def started(verifier: Verifier) -> list[int]:
    """Run one batch (so the workers are started) and return the worker pids."""
    items, expected = batch()
    assert verdicts_of(verifier, items) == expected
    return verifier.worker_pids


def wait_exited(pid: int) -> None:
    """Block until our child `pid` has exited, without reaping it (multiprocessing does that)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: whoever adopted it may reap it late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


# Calls run in the workers (module-level, so they pickle by name).


def mark_and_sleep(path: str, value: int) -> int:
    """Long the first time (the test kills the worker meanwhile), quick on the retry."""
    if os.path.exists(path):
        return value
    Path(path).touch()
    time.sleep(60)
    return -1


def die(value: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return value


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signals_sent_to_every_worker_are_ignored(signum):
    with Verifier(workers=2, timeout=10.0) as verifier:
        pids = started(verifier)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signum)
        time.sleep(0.3)  # time to die, were the signal not ignored
        assert not any(gone(pid) for pid in pids)
        items, expected = batch()
        assert verdicts_of(verifier, items) == expected
        assert verifier.worker_pids == pids  # the same workers: none died and was replaced
        assert verifier.timeouts == 0


def test_a_worker_killed_while_idle_is_replaced_at_the_next_send():
    with Verifier(workers=2, timeout=10.0) as verifier:
        pids = started(verifier)
        os.kill(pids[0], signal.SIGKILL)
        wait_exited(pids[0])  # its pipe is closed now: the next send to it fails
        items, expected = batch()
        assert verdicts_of(verifier, items) == expected
        assert verifier.timeouts == 0
        now = verifier.worker_pids
        assert len(now) == 2 and pids[0] not in now and pids[1] in now


def test_a_call_whose_worker_is_killed_midway_is_retried_on_a_fresh_worker(tmp_path):
    marker = tmp_path / "started"
    pool = TimeoutPool(workers=1, timeout=30.0)
    try:
        assert pool.run([(abs, (-2,))]) == [2]  # start the worker
        (pid,) = pool.worker_pids

        def kill_when_started() -> None:  # the call has reached the worker and is sleeping
            while not marker.exists():
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_started, daemon=True)
        killer.start()
        results = pool.run([(mark_and_sleep, (str(marker), 7)), (abs, (-3,))], default="lost")
        killer.join(5)
        assert results == [7, 3]
        assert (pool.deaths, pool.timeouts) == (1, 0)
        assert pool.worker_pids != [pid]
    finally:
        pool.close()


def test_a_call_that_kills_its_worker_twice_is_given_up_like_a_timeout():
    pool = TimeoutPool(workers=1, timeout=30.0)
    try:
        results = pool.run([(die, (1,)), (abs, (-3,))], default="lost")
        assert results == ["lost", 3]  # the default, as for a timeout, and counted as one
        assert (pool.deaths, pool.timeouts) == (2, 1)
        assert pool.run([(abs, (-4,))]) == [4]
    finally:
        pool.close()


# A child Python process that owns the pool, so that it can be signalled (or killed) as a
# whole process group without touching pytest.

CHILD = textwrap.dedent(
    """
    import json, signal, sys, time
    from cast_mlx.tasks.verify import TimeoutPool, Verifier

    KEEP = []

    def busy(path):
        open(path, "w").close()
        time.sleep(120)

    def main(mode, batches):
        (items0, _), (items1, _) = batches
        if mode == "busy":
            pool = TimeoutPool(workers=1, timeout=300.0)
            pool.run([(abs, (-1,))])
            print(json.dumps(pool.worker_pids), flush=True)
            pool.run([(busy, (sys.argv[3],))])
            sys.exit(3)
        verifier = Verifier(workers=2, timeout=10.0)
        verifier.verify_batch(items0)  # starts the workers
        if mode == "unclosed":  # exit without close(), the pool still referenced: no hang
            KEEP.append(verifier)
            print(json.dumps(verifier.worker_pids), flush=True)
            return
        if mode == "idle":
            print(json.dumps(verifier.worker_pids), flush=True)
            time.sleep(120)
            sys.exit(3)
        # both raise KeyboardInterrupt, SIGINT too when it came in ignored (a background test run)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            print(json.dumps(verifier.worker_pids), flush=True)
            time.sleep(120)
            sys.exit(3)
        except KeyboardInterrupt:
            pass
        verdicts = verifier.verify_batch(items1)
        print(json.dumps({"pids": verifier.worker_pids, "verdicts": [[v.strict, v.lenient] for v in verdicts]}))
        verifier.close()

    if __name__ == "__main__":
        main(sys.argv[1], json.loads(sys.argv[2]))
    """
)


def start_child(tmp_path: Path, mode: str, *extra: str):
    """The child, in its own session (and process group), and its first line: the worker pids."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    batches = [batch(), batch()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, json.dumps(batches), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if readable else ""
    if not line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the child printed no worker pids:\n{err}")
    return proc, json.loads(line), batches


def end_child(proc: subprocess.Popen, pids: list[int]) -> None:
    """Clean up after a failed test: the child, and any of its workers still running."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_leaves_the_verifier_working(tmp_path, signum):
    proc, pids, batches = start_child(tmp_path, "signal")
    try:
        assert len(pids) == 2
        assert all(os.getpgid(pid) == proc.pid for pid in pids)  # the signal reaches them too
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        last = json.loads(out.splitlines()[-1])
        assert [tuple(v) for v in last["verdicts"]] == batches[1][1]
        assert last["pids"] == pids  # the same workers: they ignored the signal
    finally:
        end_child(proc, pids)


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, mode):
    marker = tmp_path / "busy"
    proc, pids, _ = start_child(tmp_path, mode, str(marker))
    try:
        if mode == "busy":  # wait until the worker is inside the call, not reading its pipe
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert marker.exists()
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids), [pid for pid in pids if not gone(pid)]
    finally:
        end_child(proc, pids)


def test_a_parent_that_exits_without_closing_does_not_hang(tmp_path):
    proc, pids, _ = start_child(tmp_path, "unclosed")
    try:
        _, err = proc.communicate(timeout=20)  # multiprocessing's exit hook joins every child
        assert proc.returncode == 0, err
        assert wait_gone(pids)
    finally:
        end_child(proc, pids)

"""One run per folder: the lock that keeps a second process out of a run folder while a run
writes there (`RunLock`, taken by the train CLI on rank 0 before anything is written)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from cast_mlx import config as cfg

LOCK = ".lock"  # in the run folder while a run writes there: {"pid", "host", "started"}
_HELD: set[str] = set()  # the run folders this process holds (POSIX locks do not exclude their own process)


def holds(run_dir: Path) -> bool:
    """Whether this process holds `run_dir`'s lock (then it is the folder's only writer)."""
    return str((Path(run_dir) / LOCK).resolve()) in _HELD


class RunInUse(cfg.ConfigError):
    """Another live process holds the run folder's lock (an input error: exit 2)."""


class RunLock:
    """The lock that keeps two runs out of one run folder: `RUN_DIR/.lock`, locked with
    `fcntl.lockf` (a POSIX record lock) and holding the holder's pid, host and start time.

    The kernel releases the lock when its process ends, however it ends (SIGKILL, a crash,
    the OOM killer), so a leftover file is never mistaken for a live run: a lock file that
    nobody holds is stale and is taken over with a warning naming the pid it held. The lock
    is not inherited by forked children and works on NFS (lockd / NFSv4), unlike flock on
    some systems. `release` removes the file while still holding the lock, then unlocks;
    `acquire` checks that the file it locked is still the one at the path (else it was
    released in between and it tries again). Folders `acquire` created are removed again
    on release while empty, so a start-up that fails leaves nothing behind."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> "RunLock":  # `with RunLock(d):` or `with RunLock(d).acquire(warn):`
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, warn: Callable[[str], None] | None = None) -> "RunLock":
        key = str(self.path.resolve())
        if key in _HELD:
            raise self._in_use({"pid": os.getpid(), "host": socket.gethostname()})
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        for _ in range(20):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder was removed in between: make it again
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):  # this file system has no locks
                    os.close(fd)
                    if warn is not None:
                        warn(f"warning: {self.path}: no file locks here ({exc.strerror}); two runs are not kept apart")
                    return self
                holder = _lock_holder(fd, wait=True)
                os.close(fd)
                self._remove_created()
                raise self._in_use(holder) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and removed) it between our open and lock
                os.close(fd)
                continue
            stale = _lock_holder(fd, wait=False)
            mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            self.fd = fd
            _HELD.add(key)
            if stale and warn is not None:
                warn(
                    f"warning: {self.path}: took over the stale lock of pid {stale.get('pid', '?')} on "
                    f"{stale.get('host', '?')} (that run ended without releasing it)"
                )
            return self
        raise RunInUse(f"logging.out_dir: {self.run_dir}: its lock keeps changing hands; try again")

    def _in_use(self, holder: dict) -> RunInUse:
        where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
        since = f", started {holder['started']}" if holder.get("started") else ""
        return RunInUse(
            f"logging.out_dir: {self.run_dir} is in use by another run (pid {holder.get('pid', '?')}{where}){since}; "
            "wait for it to end or set another logging.out_dir"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while locked: whoever opens the path next makes a new file
        except FileNotFoundError:
            pass
        os.close(self.fd)  # unlocks
        self.fd = None
        _HELD.discard(str(self.path.resolve()))
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # deepest first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _lock_holder(fd: int, wait: bool) -> dict:
    """What a lock file says about its holder ({} when it says nothing readable). With
    `wait`, a file that is still empty (its holder is about to write it) is read again."""
    for _ in range(40 if wait else 1):
        raw = os.pread(fd, 4096, 0)
        if raw:
            try:
                holder = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                return {}
            return holder if isinstance(holder, dict) else {}
        if wait:
            time.sleep(0.025)
    return {}

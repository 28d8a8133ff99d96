"""The errors a run can end with and the exit codes of every command, in one table."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

EXIT_ERROR = 1  # a training error, a model or checkpoint that cannot be used
EXIT_USAGE = 2  # bad command-line or recipe input
EXIT_TIMEOUT = 3  # a data-parallel rank whose collective timed out
EXIT_DRIFT = 4  # system.stop_on_drift stopped the run
EXIT_DISK_FULL = 5  # a write found its disk (or quota) full; the last checkpoint is intact
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # stopped by a signal: 128 + its number


class ConfigError(ValueError):
    """A recipe problem; the message is one line naming the field."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite steps, a failing reward function, ...)."""


class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status `EXIT_USAGE`."""


# --------------------------------------------------------------------------- a full disk

_MLX_WRITE = re.compile(r"Unable to write (\d+) bytes")  # MLX's own writes raise RuntimeError, without errno
MLX_SLACK = 1 << 20  # an MLX write that failed with less than its size + this free is taken for a full disk


class DiskFullError(TrainingError):
    """A write failed because its disk (or the user's quota) is full: one line naming what
    and where, the free space there and, where known, what the write needed. Whoever
    raises it has removed what the write left half-done."""

    def __init__(self, path, what: str = "", needed: int | None = None, quota: bool = False, hint: str = ""):
        self.path, self.what, self.needed, self.quota = Path(path), what, needed, quota
        self.free = free_space(self.path)
        sizes = [] if self.free is None else [f"{size_text(self.free)} free there"]
        if needed is not None:
            sizes.append(f"about {size_text(needed)} needed")
        reason = "disk quota exceeded" if quota else "disk full"
        where = f"{what} {self.path}" if what else str(self.path)
        detail = f" ({', '.join(sizes)})" if sizes else ""
        super().__init__(f"{reason}: cannot write {where}{detail}" + (f"; {hint}" if hint else ""))


def free_space(path) -> int | None:
    """The bytes free to this user on the file system of `path` (or of its nearest existing
    folder), or None when that cannot be asked."""
    for p in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def no_space(exc: BaseException, path) -> str | None:
    """Whether `exc`, raised by a write under `path`, means that its disk has no room left:
    "full" or "quota" for an OSError ENOSPC / EDQUOT, "full" for MLX's RuntimeError
    `[write] Unable to write N bytes` (no errno) when the disk of `path` has less than N
    bytes + `MLX_SLACK` free (ask before removing what the write left), else None."""
    if isinstance(exc, OSError):
        return {errno.ENOSPC: "full", errno.EDQUOT: "quota"}.get(exc.errno or 0)
    if isinstance(exc, RuntimeError) and not isinstance(exc, DiskFullError):
        m = _MLX_WRITE.search(str(exc))
        free = free_space(path) if m else None
        if m and free is not None and free < int(m.group(1)) + MLX_SLACK:
            return "full"
    return None


def disk_full(exc: BaseException, path, what: str = "", needed: int | None = None, hint: str = ""):
    """The `DiskFullError` that `exc` (raised while writing `path`) stands for, or None when it
    is another error (see `no_space`). `exc` itself when it already is one."""
    if isinstance(exc, DiskFullError):
        return exc
    kind = no_space(exc, path)
    if kind is None:
        return None
    return DiskFullError(path, what, needed, quota=kind == "quota", hint=hint)


def size_text(n: int) -> str:
    """`n` bytes for a person: 431 B, 12.0 KiB, 1.5 MiB, 2.3 GiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"

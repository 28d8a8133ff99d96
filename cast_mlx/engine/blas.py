"""Load a fast BLAS (MKL, else a system OpenBLAS) for MLX's CPU backend on Linux, before
`mlx.core` is imported; `CAST_MLX_BLAS` overrides the search and `active_blas()` says what
is in use. Nothing is done on macOS. Why and in which order: docs/design.md, "Fast BLAS on Linux"."""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
import sysconfig
import warnings

_ACTIVE: str | None = None  # what `active_blas()` reports, set once by `load()`
_LOADED = False

_OPENBLAS_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas*.so*",
    "/usr/lib/x86_64-linux-gnu/openblas*/libblas.so*",
    "/usr/lib/aarch64-linux-gnu/libopenblas*.so*",
    "/usr/lib/aarch64-linux-gnu/openblas*/libblas.so*",
    "/usr/lib64/libopenblas*.so*",
    "/usr/lib/libopenblas*.so*",
)


def _mkl_candidates() -> list[str]:
    """`libmkl_rt.so*` in the lib/ folders of this interpreter's prefixes (venv and base)."""
    dirs = {os.path.join(p, "lib") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    dirs.add(sysconfig.get_config_var("LIBDIR") or "")
    found = []
    for d in sorted(x for x in dirs if x):
        found += sorted(glob.glob(os.path.join(d, "libmkl_rt.so*")))
    return found


def _openblas_candidates() -> list[str]:
    found = []
    for pattern in _OPENBLAS_GLOBS:
        found += sorted(glob.glob(pattern))
    return found


def _describe(path: str) -> str:
    name = os.path.basename(path)
    if "mkl" in name:
        return f"MKL ({path})"
    if "openblas" in path:
        return f"OpenBLAS ({path})"
    return f"custom ({path})"


def load() -> str:
    """Load the best BLAS available (once) and return a description of the active one."""
    global _ACTIVE, _LOADED
    if _LOADED:
        return _ACTIVE or "unknown"
    _LOADED = True
    # After a parallel region MKL's OpenMP threads spin for KMP_BLOCKTIME ms before they
    # sleep, so the many small matmuls of attention and decoding do not each pay a wake-up.
    # Passive waiting (OMP_WAIT_POLICY=PASSIVE) made a step far slower (docs/speed.md); 20 ms
    # bounds the spinning while the host works between steps. A user's own setting wins.
    os.environ.setdefault("KMP_BLOCKTIME", "20")
    if not sys.platform.startswith("linux"):
        _ACTIVE = "Accelerate (macOS)" if sys.platform == "darwin" else "MLX default"
        return _ACTIVE
    if "mlx.core" in sys.modules:
        warnings.warn(
            "cast_mlx.engine.blas: mlx.core was imported before cast_mlx; the fast BLAS cannot be "
            "loaded now. Import cast_mlx first (or set CAST_MLX_BLAS=none to silence this).",
            RuntimeWarning,
            stacklevel=2,
        )
        _ACTIVE = "stock (mlx.core imported before cast_mlx)"
        return _ACTIVE
    choice = os.environ.get("CAST_MLX_BLAS", "").strip()
    if choice.lower() == "none":
        _ACTIVE = "stock (CAST_MLX_BLAS=none)"
        return _ACTIVE
    if choice:
        candidates = [choice]  # explicit: try only this one and fail loudly
    else:
        candidates = _mkl_candidates() + _openblas_candidates()
    for path in candidates:
        if "openblas" in path and platform.machine() == "x86_64":
            os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            if choice:
                raise RuntimeError(f"CAST_MLX_BLAS={choice}: cannot load it: {exc}") from exc
            continue
        _ACTIVE = _describe(path)
        return _ACTIVE
    _ACTIVE = "stock (no MKL/OpenBLAS found; pip install 'cast-mlx[mkl]')"
    return _ACTIVE


THREAD_SETTINGS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_settings() -> dict[str, str]:
    """The environment settings that govern the BLAS's threads, those set (for benchmarks)."""
    return {k: os.environ[k] for k in THREAD_SETTINGS if k in os.environ}


def active_blas() -> str:
    """A one-line description of the BLAS MLX uses in this process (for the dashboard)."""
    return load()

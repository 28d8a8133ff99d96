"""The BLAS loader: off with CAST_MLX_BLAS=none, MKL when installed, same numbers either way."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cast_mlx.engine import blas

from helpers import run_cli

CHILD = """
import sys, numpy as np
import cast_mlx
from cast_mlx.engine.blas import active_blas
import mlx.core as mx
a = mx.random.normal((256, 192), key=mx.random.key(3))
b = mx.random.normal((192, 128), key=mx.random.key(4))
np.save(sys.argv[1], np.array(a @ b))
print(active_blas())
"""


def _run(tmp_path, name, env):
    out = tmp_path / f"{name}.npy"
    proc = run_cli("-c", CHILD, str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1], np.load(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_none_disables_and_mkl_is_loaded(tmp_path):
    stock_name, stock = _run(tmp_path, "stock", {"CAST_MLX_BLAS": "none"})
    assert stock_name == "stock (CAST_MLX_BLAS=none)"
    if not blas._mkl_candidates():
        pytest.skip("the mkl package is not installed (pip install '.[mkl]')")
    mkl_name, fast = _run(tmp_path, "mkl", {"CAST_MLX_BLAS": ""})
    assert mkl_name.startswith("MKL (") and "libmkl_rt.so" in mkl_name
    np.testing.assert_allclose(fast, stock, rtol=1e-5, atol=1e-5)
    explicit_name, _ = _run(tmp_path, "explicit", {"CAST_MLX_BLAS": blas._mkl_candidates()[0]})
    assert explicit_name == mkl_name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_explicit_missing_library_fails_loudly():
    proc = run_cli("-c", "import cast_mlx", env={"CAST_MLX_BLAS": "/nonexistent/libblas.so"})
    assert proc.returncode != 0
    assert "CAST_MLX_BLAS=/nonexistent/libblas.so: cannot load it" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_warns_once_when_mlx_came_first():
    code = (
        "import warnings, mlx.core\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import cast_mlx\n"
        "    from cast_mlx.engine.blas import active_blas, load\n"
        "    load(); active_blas()\n"
        "print(len([x for x in w if 'imported before cast_mlx' in str(x.message)]))\n"
        "print(active_blas())\n"
    )
    proc = run_cli("-c", code, env={"CAST_MLX_BLAS": ""})
    assert proc.returncode == 0, proc.stderr
    count, name = proc.stdout.strip().splitlines()
    assert count == "1"
    assert name.startswith("stock (mlx.core imported before cast_mlx)")


def test_threads_spin_briefly_unless_the_user_says_otherwise():
    code = "import os, cast_mlx; print(os.environ.get('KMP_BLOCKTIME'), os.environ.get('OMP_WAIT_POLICY'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("KMP_BLOCKTIME", "OMP_WAIT_POLICY")}

    def child(**env):
        proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()[-2:]

    assert child() == ["20", "None"]  # MKL's threads spin 20 ms; passive waiting is not forced
    assert child(KMP_BLOCKTIME="0", OMP_WAIT_POLICY="PASSIVE") == ["0", "PASSIVE"]
    assert blas.thread_settings()["KMP_BLOCKTIME"] == os.environ["KMP_BLOCKTIME"]

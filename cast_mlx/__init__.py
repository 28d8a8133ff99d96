"""cast-mlx: GRPO and CAST reinforcement learning for small language models on MLX.

Importing the package loads a fast BLAS on Linux before `mlx.core` is imported (see
`cast_mlx.engine.blas`); import `cast_mlx` (or any submodule) before `mlx` in your own scripts.
"""

from cast_mlx.engine import blas as _blas

_blas.load()

__version__ = "0.1.0"

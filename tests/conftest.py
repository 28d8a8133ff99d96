"""Shared fixtures. `import cast_mlx` comes first so the fast BLAS is loaded before MLX."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cast_mlx  # noqa: F401  (loads the BLAS before mlx.core)
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The converted embedded model folder (fetched on first use)."""
    from cast_mlx import models

    return models.fetch(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_gguf(smol_dir) -> Path:
    from cast_mlx import models

    return models.gguf_path(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol(smol_dir):
    """`(model, tokenizer)`: the embedded SmolLM2 dequantized to float32, loaded once."""
    from cast_mlx import models

    return models.load(models.DEFAULT_MODEL, dtype="float32")


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def hf(smol_gguf: Path):
    """`(model, tokenizer)` from PyTorch transformers loading the same GGUF (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    kw = dict(gguf_file=smol_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_gguf.parent), dtype=torch.float32, **kw
    )
    model.eval()
    return model, tok

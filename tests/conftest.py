"""Shared fixtures. `import cast_mlx` comes first so the fast BLAS is loaded before MLX."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

import cast_mlx  # noqa: F401  (loads the BLAS before mlx.core)

# Tests that use these fixtures load the embedded model (and, for `hf`, PyTorch); they are
# marked so that `pytest -m "not model and not torch"` is the seconds-long tier.
MODEL_FIXTURES = {"smol_dir", "smol_gguf", "smol", "fresh_smol", "hf"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if "hf" in used:
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The converted embedded model folder (fetched on first use)."""
    from cast_mlx.engine import models

    return models.fetch(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_gguf(smol_dir) -> Path:
    from cast_mlx.engine import models

    return models.gguf_path(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol(smol_dir):
    """`(model, tokenizer)`: the embedded SmolLM2 dequantized to float32, loaded once."""
    from cast_mlx.engine import models

    return models.load(models.DEFAULT_MODEL, dtype="float32")


@pytest.fixture()
def fresh_smol(smol):
    """`(model, tokenizer)`: a copy of the session's float32 model that a test may change
    (attach LoRA, set weights) without loading it again; the tokenizer is shared."""
    model, tokenizer = smol
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def hf(smol_dir: Path):
    """`(model, tokenizer)` from PyTorch transformers loading the same GGUF (float32).

    With `CAST_MLX_HF_FROM_FOLDER=1` transformers loads the converted folder itself (a float32
    safetensors in the HF layout) instead: how `scripts/gpu_check.sh` runs the parity tests on
    a machine that has no route to the GGUF, with a random-weight model of the same shape."""
    from cast_mlx.engine import models

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if os.environ.get("CAST_MLX_HF_FROM_FOLDER"):
        folder, kw = smol_dir, {}
    else:
        pytest.importorskip("gguf")
        gguf = models.gguf_path(models.DEFAULT_MODEL)
        folder, kw = gguf.parent, dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight llama as an mlx-lm folder (`helpers.write_tiny_model`); no
    download, no embedded model, so tests that use it stay in the fast tier."""
    from helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")

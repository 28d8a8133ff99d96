"""Write a random-weight model of the embedded model's shape where the embedded model goes.

For a machine that cannot fetch the embedded model (the GPU machine of `gpu_check.sh` has no
network and carries at most 64 MiB): `$CAST_MLX_HOME/models/smollm2-135m-instruct` gets
SmolLM2-135M's published config, float32 random weights in the HF layout (so transformers
loads the same folder: `CAST_MLX_HF_FROM_FOLDER=1` in tests/conftest.py) and the tokenizer
files of `--tokenizer`. Loading, rollouts, parity and benchmarks then run unchanged; only
what depends on the trained weights (accuracies, the GGUF checks) means nothing there.

    python scripts/random_embedded.py --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from cast_mlx.engine import models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_models as sm  # noqa: E402

EMBED_SCALE = 0.3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write(tokenizer: Path, seed: int = 0) -> Path:
    if models.is_fetched(models.DEFAULT_MODEL):
        raise SystemExit(f"{models.embedded_dir(models.DEFAULT_MODEL)} holds a model already: refusing to replace it")
    folder = models.embedded_dir(models.DEFAULT_MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    model = sm.build("smollm2-135m", "float32", seed=seed)
    weights = dict(tree_flatten(model.parameters()))
    # mlx-lm draws the embedding from N(0, 1); with the tied head most softmaxes are then
    # one-hot and many gradients exactly zero. A smaller spread keeps them alive.
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * EMBED_SCALE
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    cfg = sm.config("smollm2-135m") | {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, folder / name)
    gguf = models.gguf_path(models.DEFAULT_MODEL)  # `is_fetched` wants it; nothing reads it here
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"")
    (folder / models.COMPLETE_MARKER).write_text("random weights (scripts/random_embedded.py)\n")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with the embedded tokenizer's files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write(args.tokenizer, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

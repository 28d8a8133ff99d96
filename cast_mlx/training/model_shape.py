"""A model's shape for the memory plan, read from its config.json without loading (or
fetching) its weights: an embedded model's, a local folder's, or a hub id's from the local
Hugging Face cache; and its tokenizer from the same folder (small files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cast_mlx.engine import models
from cast_mlx.training import memory_laws as laws

KNOWN_TYPES = ("llama", "qwen2", "qwen3")  # the architectures the plan's constants were measured on


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model's config.json."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True
    bias: bool = False  # q/k/v biases (qwen2)
    quant: dict | None = None  # config.json's `quantization`: bits, group_size, per-module overrides
    float_bytes: int = 2  # the checkpoint's float dtype (torch_dtype), bytes

    def linears(self) -> dict[str, tuple[int, int]]:
        """A block's linear layers (the LoRA keys) -> (in, out)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }


def shape_of(config: dict) -> Shape | None:
    """The Shape of an mlx-lm config (None: a model type the plan was not measured on)."""
    kind = config.get("model_type")
    if kind not in KNOWN_TYPES:
        return None
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return Shape(
        model_type=kind,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        intermediate=int(config["intermediate_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", True)),
        bias=kind == "qwen2" or bool(config.get("attention_bias")),
        quant=config.get("quantization"),
        float_bytes=4 if dtype == "float32" else 2,
    )


def model_config(spec: str) -> tuple[dict | None, Path | None, str | None]:
    """`(config, folder, note)` of a model spec without loading (or fetching) it: an embedded
    model's converted config (its built-in copy before the first fetch), a local folder's
    config.json, a hub id's config.json when it is in the local Hugging Face cache. No config:
    `(None, None, why)`."""
    if spec in models.EMBEDDED:
        folder = models.embedded_dir(spec)
        if (folder / "config.json").is_file():
            return _read_config(folder)
        builtin = laws.BUILTIN_CONFIGS.get(spec)
        return builtin, None, None if builtin else f"{spec}: no config known"
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_config(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # noqa: BLE001 - a cache it cannot read: no plan, not an error
            cached = None
        if isinstance(cached, str):
            return _read_config(Path(cached).parent)
        return None, None, f"{spec}'s config.json is not in the local Hugging Face cache"
    return None, None, f"{spec}: no such folder"


def _read_config(folder: Path) -> tuple[dict | None, Path | None, str | None]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return None, None, f"{folder / 'config.json'} is unreadable ({type(exc).__name__})"
    if not isinstance(config, dict):
        return None, None, f"{folder / 'config.json'} is not a JSON object"
    return config, folder, None


def load_tokenizer(folder: Path | None):
    """The model's tokenizer from its folder (small files; no weights), or None."""
    if folder is None or not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    try:
        from mlx_lm.utils import load_tokenizer as mlx_lm_tokenizer

        return mlx_lm_tokenizer(folder)
    except Exception:  # noqa: BLE001 - no tokenizer: the prompts' lengths are estimated
        return None

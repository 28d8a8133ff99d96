"""The embedded model's GGUF file as an mlx-lm model folder (config, weights, tokenizer):
what `models.fetch` runs once, apart from loading because nothing else reads a GGUF.

GGUF layout notes (what `convert_gguf` undoes):
- `mx.load(gguf)` returns Q4_1 / Q8 blocks as MLX affine-quantized tensors (group 32) with
  float16 scales/biases; they are kept as they are (the token embedding is 8-bit, the rest 4-bit).
- llama.cpp permutes the rows of q/k for its interleaved RoPE; the rows are permuted back to
  the Hugging Face layout, so the config keeps `rope_traditional: false`.
- The tokenizer (byte-level BPE: tokens, merges, control tokens, chat template) is rebuilt as a
  `tokenizer.json` from the GGUF metadata (`gguf_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import mlx.core as mx


class GGUFError(ValueError):
    """A GGUF file this conversion does not handle (`models.fetch` reports it as a
    `ModelLoadError`; this module imports nothing of `models`, which imports it)."""


def _meta_value(v):
    """GGUF metadata comes back as 0-d mx arrays, lists and strings; give plain Python."""
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE -> Hugging Face half-split).

    llama.cpp writes, per head, rows `[r0, r_{d/2}, r1, r_{d/2+1}, ...]`; this restores
    `[r0, r1, ..., r_{d/2-1}, r_{d/2}, ...]`. Works on packed quantized weights, scales and
    biases alike because quantization groups run along the input (column) dimension.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(rows, *w.shape[1:])


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str) -> str:
    module, param = gguf_name.rsplit(".", 1)
    if module == "token_embd":
        return f"model.embed_tokens.{param}"
    if module == "output_norm":
        return f"model.norm.{param}"
    if module == "output":
        return f"lm_head.{param}"
    blk, idx, part = module.split(".")
    if blk != "blk" or part not in _LAYER_NAMES:
        raise GGUFError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{idx}.{_LAYER_NAMES[part]}.{param}"


def _bits_of(weights: dict, module: str, in_features: int) -> int:
    packed_cols = weights[f"{module}.weight"].shape[1]
    return packed_cols * 32 // in_features


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a llama-architecture GGUF as an mlx-lm model folder (config, weights, tokenizer)."""
    loaded = mx.load(str(gguf_path), return_metadata=True)
    weights, meta = cast("tuple[dict[str, mx.array], dict[str, Any]]", loaded)
    meta = {k: _meta_value(v) for k, v in meta.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{gguf_path}: only llama-architecture GGUFs are supported, not {arch!r}")
    n_heads = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]

    out = {}
    for name, w in weights.items():
        if name.startswith("blk.") and (".attn_q." in name or ".attn_k." in name):
            w = unpermute_rope_rows(w, n_heads if ".attn_q." in name else n_kv)
        out[_hf_name(name)] = w

    group_size = 32
    quant = {"group_size": group_size, "bits": 4, "mode": "affine"}
    modules = sorted({k.rsplit(".", 1)[0] for k in out if k.endswith(".scales")})
    for module in modules:
        scales_cols = out[f"{module}.scales"].shape[1]
        bits = _bits_of(out, module, scales_cols * group_size)
        if bits != quant["bits"]:
            quant[module] = {"group_size": group_size, "bits": bits, "mode": "affine"}

    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": meta.get("llama.rope.dimension_count", hidden // n_heads),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "rope_traditional": False,
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(tokens)),
        "tie_word_embeddings": "lm_head.weight" not in out,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "quantization": quant,
        "quantization_config": quant,
        "source_gguf": {
            "file": Path(gguf_path).name,
            "name": meta.get("general.name"),
            "license": meta.get("general.license"),
        },
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from cast_mlx.engine.gguf_tokenizer import write_tokenizer

    write_tokenizer(meta, out_dir)
    return out_dir

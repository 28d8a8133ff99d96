"""Rebuild a Hugging Face `tokenizer.json` from the byte-level BPE tokenizer stored in a GGUF's
metadata, pre-tokenising as llama.cpp's `tokenizer.ggml.pre` says (docs/design.md, "The
embedded model")."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>
DIGIT_SPLIT_PRE = {"smollm", "starcoder"}


def build_tokenizer(meta: dict) -> Tokenizer:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}: only byte-level BPE "
            "('gpt2') GGUF tokenizers are supported"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def _token(meta: dict, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    return None if idx is None else meta["tokenizer.ggml.tokens"][idx]


def tokenizer_config(meta: dict) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": meta.get("llama.context_length", 2048),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        if (value := _token(meta, key)) is not None:
            cfg[name] = value
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def write_tokenizer(meta: dict, out_dir: str | Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`."""
    out_dir = Path(out_dir)
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    cfg = tokenizer_config(meta)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    specials = {k: v for k, v in cfg.items() if k.endswith("_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

"""The embedded model: conversion, mlx-lm compatibility, parity with transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx.cli import models as models_cli
from cast_mlx.engine import gguf_weights, models

from helpers import run_cli

CHAT = [{"role": "user", "content": "What is 12 + 35? Answer briefly."}]
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nCompute 7 * 8.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]
TOKENIZER_STRINGS = [
    "Hello world",
    " 12345 + 678 = 13023",
    "3.14159 and 1,000,000.50 $18",
    "naïve café — 日本語 🙂 Ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x  y\n\n\tz   ",
    "\\boxed{\\frac{1}{2}} #### 42",
]


def test_converted_folder_layout(smol_dir: Path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", models.COMPLETE_MARKER):
        assert (smol_dir / name).is_file(), name
    config = json.loads((smol_dir / "config.json").read_text())
    assert config["rope_traditional"] is False  # q/k were un-permuted to the HF layout
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.embed_tokens"]["bits"] == 8
    assert config["tie_word_embeddings"] is True
    tok_cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, head_dim, cols = 3, 8, 5
    w = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's convert script: reshape(n_head, 2, dim/n_head/2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(np.array(gguf_weights.unpermute_rope_rows(mx.array(permuted), n_heads)), w)


def test_mlx_lm_loads_folder_unchanged(smol_dir: Path):
    import mlx_lm

    model, tok = mlx_lm.load(str(smol_dir))
    assert models.is_quantized(model)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    text = mlx_lm.generate(model, tok, prompt, max_tokens=12)
    assert "47" in text or "12" in text, text  # it reads the question


def test_load_dtypes(smol):
    model, _ = smol
    assert not models.is_quantized(model)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32}
    assert models.resolve_dtype("auto") == ("float32" if mx.default_device() == mx.cpu else "quantized")
    with pytest.raises(models.ModelLoadError, match="dtype 'int3'"):
        models.resolve_dtype("int3")


def test_bad_specs():
    with pytest.raises(models.ModelLoadError, match="no such folder"):
        models.load("./does/not/exist")
    with pytest.raises(models.ModelLoadError, match="unknown embedded model"):
        models.fetch("gpt-5")


def test_hub_id_offline_says_so():
    code = (
        "from cast_mlx.engine.models import load, ModelLoadError\n"
        "try:\n    load('mlx-community/Qwen2.5-0.5B-Instruct-4bit')\n"
        "except ModelLoadError as e:\n    print(e)\n"
    )
    proc = run_cli("-c", code, env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "could not be reached" in proc.stdout and "pass its folder path" in proc.stdout


def test_fetch_is_atomic(tmp_path, monkeypatch, smol_gguf: Path):
    """A conversion that dies half-way leaves no folder that looks complete, and no debris."""
    import shutil

    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path))

    def fake_download(spec, workdir):
        target = workdir / spec.member
        target.parent.mkdir(parents=True)
        shutil.copy(smol_gguf, target)
        return target

    def dying_convert(gguf, out):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_download_gguf", fake_download)
    monkeypatch.setattr(gguf_weights, "convert_gguf", dying_convert)
    with pytest.raises(KeyboardInterrupt):
        models.fetch("smollm2-135m-instruct")
    assert not models.embedded_dir("smollm2-135m-instruct").exists()
    assert list((tmp_path / "models").iterdir()) == []
    assert not models.is_fetched("smollm2-135m-instruct")


def test_fetch_rejects_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path))

    def fake_download(spec, workdir):
        target = workdir / "x.gguf"
        workdir.mkdir(parents=True)
        target.write_bytes(b"not a gguf")
        return target

    monkeypatch.setattr(models, "_download_gguf", fake_download)
    with pytest.raises(models.ModelLoadError, match="sha256 .* does not match"):
        models.fetch("smollm2-135m-instruct")
    assert not models.embedded_dir("smollm2-135m-instruct").exists()


# ---------------------------------------------------------------- parity with transformers


def test_tokenizer_matches_transformers(smol, hf):
    _, ours = smol
    _, theirs = hf
    for text in TOKENIZER_STRINGS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == text == theirs.decode(ids)
    ours_chat = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours_chat == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.encode(ours_chat) == theirs.encode(ours_chat)
    assert ours.eos_token_id == theirs.eos_token_id == 2


def test_weights_equal_transformers_dequantization(smol, hf):
    """Dequantized in float32 (scales cast first) and un-permuted: bit-identical weights."""
    model, _ = smol
    hf_model, _ = hf
    hf_state = hf_model.state_dict()
    params = dict(tree_flatten(model.parameters()))
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.5.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ):
        np.testing.assert_array_equal(np.array(params[name]), hf_state[name].numpy(), err_msg=name)


def _mlx_logprobs(model, ids):
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_logprobs_and_greedy_match_transformers(smol, hf):
    import torch

    model, tok = smol
    hf_model, _ = hf
    worst = 0.0
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            theirs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1).numpy()
        worst = max(worst, float(np.abs(_mlx_logprobs(model, ids) - theirs).max()))
    assert worst < 1e-3, worst

    chat = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    prompt_ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    ours = list(prompt_ids)
    for _ in range(20):  # plain greedy loop over full forwards: no cache subtleties
        ours.append(int(np.argmax(_mlx_logprobs(model, ours)[-1])))
    x = torch.tensor([prompt_ids])
    with torch.no_grad():  # explicit mask: the prompt itself contains the pad id (<|im_end|>)
        theirs = hf_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=20, min_new_tokens=20, do_sample=False
        )[0].tolist()
    assert 2 not in ours[len(prompt_ids) :]  # 20 real tokens, not an early stop
    assert ours[len(prompt_ids) :] == theirs[len(prompt_ids) :]


# ---------------------------------------------------------------- cache problems (issue #15)


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_unusable_home_is_a_one_line_error(tmp_path, monkeypatch, where):
    import os

    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        home = tmp_path / "file" / "home"
        reason = "Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only folder")
        home = tmp_path / "ro"
        home.mkdir(mode=0o555)
        reason = "Permission denied"
    monkeypatch.setenv("CAST_MLX_HOME", str(home))
    monkeypatch.setattr(models, "_download_gguf", lambda *a: pytest.fail("must not download"))
    with pytest.raises(models.ModelCacheError) as err:
        models.load(models.DEFAULT_MODEL)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model cache {home / 'models'}: cannot create or write it ({reason})")
    assert "set CAST_MLX_HOME to a writable folder" in message


def test_cached_model_without_tokenizer_says_how_to_rebuild(tmp_path, monkeypatch, smol_dir: Path, smol_gguf: Path):
    """A copy of the fetched folder without its tokenizer: not mlx-lm's advice to install
    sentencepiece, but the fetch command and the folder."""
    folder = tmp_path / "models" / models.DEFAULT_MODEL
    folder.mkdir(parents=True)
    for f in smol_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (folder / f.name).symlink_to(f)  # the big files are only looked at
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / smol_gguf.name).symlink_to(smol_gguf)
    monkeypatch.setenv("CAST_MLX_HOME", str(tmp_path))
    assert models.is_fetched(models.DEFAULT_MODEL)
    with pytest.raises(models.ModelCacheError) as err:
        models.load(models.DEFAULT_MODEL)
    assert str(err.value) == (
        f"{folder}: the cached model is incomplete (tokenizer.json, tokenizer_config.json missing); "
        f"rebuild it with `python -m cast_mlx.models fetch {models.DEFAULT_MODEL} --force`"
    )
    assert "sentencepiece" not in str(err.value)
    # the advised command is the CLI's (its parser accepts it)
    monkeypatch.setattr(models, "fetch", lambda name, force: (name, force))
    assert models_cli.main(["fetch", models.DEFAULT_MODEL, "--force"]) == 0


def _tiny_lora_llama(hidden: int = 64, dropout: float = 0.0):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=40, num_key_value_heads=2, rope_theta=10000.0,
    )  # fmt: skip
    mx.random.seed(5)
    model = llama.Model(args)
    models.attach_lora(
        model, rank=4, alpha=8.0, dropout=dropout, num_layers=2, keys=["self_attn.q_proj", "mlp.down_proj"]
    )
    lora = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten([(k, v + 0.1 if k.endswith("lora_b") else v) for k, v in lora.items()]))
    mx.eval(model.parameters())
    return model


def test_merged_lora_decodes_the_adapted_model_and_puts_the_adapters_back():
    from mlx_lm.tuner.lora import LoRALinear

    model = _tiny_lora_llama()
    model.eval()
    ids = mx.array([[3, 1, 4, 1, 5, 9]])
    adapted, before = model(ids), dict(tree_flatten(model.trainable_parameters()))
    layers = model.model.layers
    originals = [layers[i].self_attn.q_proj for i in (1, 2)]
    rng = mx.random.state[0]
    with models.merged_lora(model):
        assert mx.array_equal(mx.random.state[0], rng)  # the global RNG (LoRA dropout's) is not drawn from
        assert [type(layers[i].self_attn.q_proj) for i in range(3)] == [nn.Linear] * 3
        assert type(layers[2].mlp.down_proj) is nn.Linear
        np.testing.assert_allclose(model(ids), adapted, rtol=1e-5, atol=1e-5)
    assert [layers[i].self_attn.q_proj for i in (1, 2)] == originals  # the same layers, untouched
    assert type(layers[2].mlp.down_proj) is LoRALinear
    after = dict(tree_flatten(model.trainable_parameters()))
    assert after.keys() == before.keys() and all(mx.array_equal(after[k], before[k]) for k in before)
    assert mx.array_equal(model(ids), adapted)


def test_merged_lora_keeps_training_mode_and_quantized_adapters():
    model = _tiny_lora_llama(dropout=0.5)
    model.train()  # dropout active: merging would change what the layer computes
    with models.merged_lora(model):
        assert type(model.model.layers[2].self_attn.q_proj).__name__ == "LoRALinear"
    quantized = _tiny_lora_llama()
    nn.quantize(quantized.model.layers[2], group_size=32, bits=4, class_predicate=lambda _, m: type(m) is nn.Linear)
    quantized.eval()
    with pytest.raises(RuntimeError, match="inside"):
        with models.merged_lora(quantized):
            assert type(quantized.model.layers[2].self_attn.q_proj).__name__ == "LoRALinear"
            raise RuntimeError("inside")
    assert type(quantized.model.layers[1].self_attn.q_proj).__name__ == "LoRALinear"  # restored after the error

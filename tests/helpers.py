"""Helpers shared by the tests and the benchmarks in scripts/ (not part of the library)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def torch_reference():
    """`tests/reference/torch_cast.py`, imported when a test asks for it, so that importing
    a test module never imports torch and the fast tier (`-m "not model and not torch"`)
    runs without it. Tests that call this carry the `torch` marker."""
    from reference import torch_cast  # tests/ is on sys.path (pytest's rootdir insertion)

    return torch_cast


def smoke_args(out: Path, *extra: str) -> list[str]:
    """`python` arguments that train `recipes/smoke.yaml` into `out`, quietly, plain output."""
    return ["-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet", "--no-dashboard",
            "--set", f"logging.out_dir={out}", *extra]  # fmt: skip


def run_cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_ports(n: int = 2) -> int:
    """A port p such that p .. p + n - 1 are free on 127.0.0.1 (the ring listens on one
    port per rank; mlx.launch's --starting-port takes the first)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def launch_loopback(args: list[str], n: int = 2, timeout: float = 900, cwd=None) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring` on loopback (free ports, one MKL thread per rank)
    running `python ARGS`; returns its exit code and captured output.

    The launcher gets a stdin that stays open and empty: with an exhausted stdin
    (/dev/null, or a closed pipe) its loop that forwards stdin to the ranks spins on a
    CPU core (mlx 0.32.4), which on a 2-core machine slows the ranks down a lot. Note that
    mlx.launch exits 0 even when a rank fails; it prints `Node with rank R exited ...`."""
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    cmd = [
        launcher,
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(n)),
        "--env",
        "MKL_NUM_THREADS=1",
        "--",
        sys.executable,
        *args,
    ]
    quiet_stdin, keep_open = os.pipe()
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=quiet_stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        os.close(quiet_stdin)
        os.close(keep_open)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def tiny_model(n: int = 3):
    """A stand-in for a LoRA model: two trainable tensors, `lora_a` (n, 2) and `lora_b` (2, n)."""
    import mlx.core as mx
    import mlx.nn as nn

    model = nn.Module()
    model.lora_a = mx.ones((n, 2))
    model.lora_b = mx.zeros((2, n))
    return model


def tiny_checkpoint(run_dir: Path, step: int, run_id: str, keep: int = 2, n: int = 3) -> Path:
    """A real checkpoint (every file, readable) of a two-tensor model, written by
    `checkpoint.save_checkpoint`."""
    import mlx.optimizers as optim

    from cast_mlx import config as cfg
    from cast_mlx.training import checkpoint

    model = tiny_model(n)
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    recipe = cfg.from_dict({"checkpoint": {"keep": keep}})
    state = checkpoint.TrainState(step=step, run_id=run_id)
    return checkpoint.save_checkpoint(
        run_dir, state, model=model, adapter_config={}, optimizer=opt, teacher=None, recipe=recipe
    )


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-block llama with random weights and a character-level tokenizer with a chat
    template, as an mlx-lm model folder (as mlx-lm's own tests build theirs): the loop's
    invariants run on it in seconds, without the embedded model."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as token_models

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token a character
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": " ",
        "chat_template": template,
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
    }
    (folder / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


# The overrides that make a recipes/smoke.yaml run on the tiny model fast: 4 completions of
# up to 8 tokens, LoRA on the top block, truncated completions keep their loss, no eval.
TINY_SETS = [
    "sampling.group_size=4",
    "sampling.max_new_tokens=8",
    "lora.num_layers=1",
    "loss.mask_truncated=false",
    "logging.eval_every=0",
]


def tiny_recipe(tmp_path: Path, model_dir: Path, *overrides: str):
    """recipes/smoke.yaml on the tiny model: 2 prompts x 4 completions of up to 8 tokens
    (truncated ones keep their loss), LoRA on the top block, no eval, everything written
    under `tmp_path`."""
    from cast_mlx import config as cfg

    sets = [
        f"model.name={model_dir}",
        "sampling.group_size=4",
        "sampling.max_new_tokens=8",
        "lora.num_layers=1",
        "loss.mask_truncated=false",  # a random model rarely ends a completion: keep their loss
        "logging.eval_every=0",
        f"logging.out_dir={tmp_path / 'run'}",
        *overrides,
    ]
    return cfg.load_recipe(ROOT / "recipes/smoke.yaml", sets)


# A run folder of a 4-step cast-verl run (tests/test_model_card.py, tests/test_publish.py).
RUN_ADAPTER_CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
}
# step 0 (the base model), then steps 2 and 4 of 4 problems each; step 2 is the best
EVALS = {0: [1, 0, 0, 0], 2: [1, 1, 1, 0], 4: [1, 1, 0, 0]}
CI = {0: (0.0, 0.75), 2: (0.25, 1.0), 4: (0.0, 1.0)}


def write_run(run_dir: Path, *sets: str) -> Path:
    """A run folder as the loop leaves it: checkpoints 2 and 4 of a 4-step run (2 the best,
    4 the latest) with mlx-lm adapter configs and the recipe, metrics.jsonl with evals at
    steps 0, 2, 4 (and a torn line), and eval.jsonl's per-problem results."""
    import json

    from cast_mlx import config as cfg
    from cast_mlx.engine import models
    from cast_mlx.training import checkpoint

    recipe = cfg.load_recipe(None, ["name=arith-demo", "algorithm.name=cast-verl", "schedule.steps=4", *sets])
    for step in (2, 4):
        ckpt = tiny_checkpoint(run_dir, step, "r", keep=5)
        (ckpt / models.ADAPTER_CONFIG).write_text(json.dumps(RUN_ADAPTER_CONFIG))
        (ckpt / "recipe.yaml").write_text(cfg.to_yaml(recipe))
    checkpoint.mark_best(run_dir, run_dir / "checkpoints" / "step_000002")
    lines = []
    for step in range(5):
        line: dict = {"step": step, "reward": step / 4}
        if step in EVALS:
            acc = sum(EVALS[step]) / 4
            lo, hi = CI[step]
            line |= {"eval/accuracy": acc, "eval/accuracy_ci_low": lo, "eval/accuracy_ci_high": hi}
            line |= {"eval/accuracy_strict": acc / 2, "eval/n": 4}
        lines.append(json.dumps(line))
    lines.insert(2, '{"step": 1, "rew')  # a torn write
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    evals = [json.dumps({"step": s, "lenient": v, "strict": v}) for s, v in EVALS.items()]
    (run_dir / "eval.jsonl").write_text("\n".join(evals) + "\n")
    return run_dir

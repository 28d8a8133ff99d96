"""The model shapes `bench_scale.py` measures (published configs as data, random weights), and
the table and plot of its results.

Each entry is the architecture part of the model's published `config.json` on the Hugging Face
Hub (no download here; the values were copied from those files and checked against other
public copies of them):

- `smollm2-135m`: HuggingFaceTB/SmolLM2-135M-Instruct (llama; also the embedded model's
  converted config, `models.fetch`);
- `qwen2.5-0.5b`, `qwen2.5-1.5b`: Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen2.5-1.5B-Instruct (qwen2:
  q/k/v biases, head_dim = hidden / heads);
- `qwen3-1.7b`: Qwen/Qwen3-1.7B (qwen3: explicit head_dim 128, q/k RMS norms, no biases).

All four tie the output head to the token embedding (`tie_word_embeddings: true`; the untied
Qwen models start at Qwen2.5-7B / Qwen3-8B); the field is kept so that an untied shape is one
entry away. `published` holds the model cards' parameter counts, which `param_count`
reproduces (`tests/test_bench_scale.py`). `tiny` is no real model: a 10-block llama of width 64
with SmolLM2's vocabulary, for the smoke test.

`build` makes the mlx-lm model of a config (mlx-lm's own `Model` class for its `model_type`)
with mlx-lm's random initialisation from a seed, as `models.load` would hand it to the
trainer: float32, or `4bit`: the checkpoint dtype (bfloat16) quantized with group size 64 and
4 bits, what `mlx_lm.convert -q` writes and a Mac trains with QLoRA. Parameters stay lazy until
evaluated, so a model can be built to count its parameters without allocating them.

`write_table` and `write_plot` turn bench_scale's JSON lines into a markdown table (one row per
tool run) and a log-log plot.
"""

from __future__ import annotations

from pathlib import Path

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from cast_mlx.training.memory_laws import BUILTIN_CONFIGS

DTYPES = ("float32", "4bit")
QUANT = {"group_size": 64, "bits": 4}  # mlx_lm.convert's defaults

MODELS: dict[str, dict] = {
    "smollm2-135m": {  # the embedded model's shape (as the memory plan knows it), unquantized
        **{k: v for k, v in BUILTIN_CONFIGS["smollm2-135m-instruct"].items() if k != "quantization"},
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "published": {"params": 135e6},
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "published": {"params": 0.49e9, "non_embedding": 0.36e9},
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "published": {"params": 1.54e9, "non_embedding": 1.31e9},
    },
    "qwen3-1.7b": {
        "model_type": "qwen3",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "published": {"params": 1.7e9, "non_embedding": 1.4e9},
    },
    "tiny": {  # not a real model: the smoke test's (10 blocks: LoRA on 8 leaves 2 frozen)
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 10,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
}
REAL = [name for name in MODELS if name != "tiny"]


def config(name: str) -> dict:
    """The model's config.json fields (without the `published` counts)."""
    return {k: v for k, v in MODELS[name].items() if k != "published"}


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def param_count(cfg: dict) -> dict:
    """Parameters counted from the config alone: `total`, `embedding` (the token embedding, and
    an untied head), `non_embedding` (blocks and final norm), `per_block`."""
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h
    if cfg["model_type"] == "qwen2" or cfg.get("attention_bias"):
        attention += q + 2 * kv  # q/k/v biases
    if cfg["model_type"] == "qwen3":
        attention += 2 * d  # q_norm, k_norm
    per_block = attention + 3 * h * inter + 2 * h  # + the two RMS norms
    embedding = cfg["vocab_size"] * h * (1 if cfg["tie_word_embeddings"] else 2)
    non_embedding = cfg["num_hidden_layers"] * per_block + h
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "per_block": per_block,
    }


def model_classes(cfg: dict):
    from mlx_lm.utils import _get_classes  # mlx-lm's own lookup: model_type -> (Model, ModelArgs)

    return _get_classes(cfg)


def built_params(model: nn.Module) -> int:
    """Parameters of a built float model (before quantization), from their shapes: nothing
    needs to be evaluated."""
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def build(name_or_cfg, dtype: str = "float32", seed: int = 0, materialise: bool = True) -> nn.Module:
    """The mlx-lm model of a config with random weights (mlx-lm's initialisation, from `seed`),
    in `dtype` (`DTYPES`), prepared as `models.load` prepares a loaded one (the fast SwiGLU on
    the CPU, eval mode). `materialise=False` leaves the parameters lazy (nothing allocated)."""
    from cast_mlx.engine import fastmath, models

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = config(name_or_cfg) if isinstance(name_or_cfg, str) else dict(name_or_cfg)
    model_cls, args_cls = model_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    if dtype == "4bit":  # the checkpoint's dtype, then quantized (the non-linear params stay bfloat16)
        models.cast_floats(model, getattr(mx, cfg.get("torch_dtype", "bfloat16")))
        nn.quantize(
            model,
            group_size=QUANT["group_size"],
            bits=QUANT["bits"],
            class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % QUANT["group_size"] == 0,
        )
    if fastmath.on_cpu():
        fastmath.use_fast_swiglu(model)
        fastmath.use_fast_attention()
    if materialise:
        mx.eval(model.parameters())
    model.eval()
    return model


def kv_cache_bytes(cfg: dict, streams: int, positions: int, dtype: str) -> int:
    """The rollout's KV cache: `streams` rows of `positions` (prompt + completion) in every
    block; float32, or bfloat16 activations for a 4-bit model."""
    per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim(cfg)
    return per_position * streams * positions * (4 if dtype == "float32" else 2)


# --------------------------------------------------------------------------- results: the table and the plot


def rows_of(lines: list[dict]) -> list[dict]:
    """One row per tool run: our algorithms of each line, and each TRL line."""
    rows = []
    for line in lines:
        if "error" in line:
            continue
        base = {k: line.get(k) for k in ("model", "params", "dtype", "setting", "prompts", "group", "max_new")}
        if line.get("tool") == "trl":
            t = line["trl"]
            rest = {"update_s": t["rest_s"], "step_s": t["step_s"], "peak_gb": None, "rss_gb": t["rss_gb"]}
            rows.append(base | {"run": "TRL GRPO", "rollout_s": t["rollout_s"], "teacher_s": None} | rest)
            continue
        rollout = line.get("rollout") or {}
        for algorithm in ("grpo", "cast"):
            r = line.get(algorithm)
            if r:
                rows.append(
                    base
                    | {
                        "run": algorithm.upper(),
                        "rollout_s": rollout.get("s"),
                        "rollout_tokens": rollout.get("max_new"),
                        "teacher_s": r.get("teacher_s"),
                        "update_s": r.get("update_s"),
                        "step_s": r.get("step_s"),
                        "learn_s": r.get("learn_s"),
                        "peak_gb": r.get("peak_gb"),
                        "rss_gb": r.get("rss_gb"),
                    }
                )
    return sorted(rows, key=lambda r: (r["setting"], r["params"], r["dtype"], r["group"], r["max_new"], r["run"]))


def fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_table(lines: list[dict], path: Path, source: str) -> None:
    machines = sorted({f"{x.get('machine')} ({x.get('cores')} cores)" for x in lines if x.get("machine")})
    out = [
        "# How cost grows with the model",
        "",
        f"Written by `scripts/bench_scale.py` from `{source}` ({len(lines)} lines; "
        f"{', '.join(machines) or 'machine unknown'}).",
        "Random weights at each model's published shape. Ours: teacher and update on a synthetic batch of the",
        "full size, the rollout up to its token column's cap (a step's seconds only when that is the full cap);",
        "peak = MLX's peak memory (weights included). TRL: its whole step; its 'update' column is the rest",
        "of its step after the rollout; its memory is the process's peak RSS. 4-bit seconds on a CPU are not",
        "what a Mac takes (MLX's quantized matmuls are slow there); their memory is what counts.",
        "",
        "| setting | model | params | dtype | P x G x tokens | run | rollout s (tokens) | teacher s | update s "
        "| step s | peak GB | RSS GB |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows_of(lines):
        rollout = fmt(r["rollout_s"], 1)
        if r["rollout_s"] is not None and r.get("rollout_tokens"):
            rollout += f" ({r['rollout_tokens']})"
        out.append(
            f"| {r['setting']} | {r['model']} | {r['params'] / 1e9:.3f}B | {r['dtype']} | "
            f"{r['prompts']} x {r['group']} x {r['max_new']} | {r['run']} | {rollout} | {fmt(r['teacher_s'])} | "
            f"{fmt(r['update_s'])} | {fmt(r['step_s'])} | {fmt(r['peak_gb'])} | {fmt(r['rss_gb'])} |"
        )
    path.write_text("\n".join(out + cost_laws(lines)) + "\n")


def memory_gb(r: dict) -> float | None:
    """A row's peak memory: MLX's peak; TRL's peak RSS (it has no MLX peak)."""
    return r["peak_gb"] if r["peak_gb"] is not None else r["rss_gb"]


def exponent(points: list[tuple[float, float]]) -> float | None:
    """The power `a` of a law `y ~ x^a`: the least-squares slope of log y against log x (None
    with fewer than two distinct x)."""
    import numpy as np

    pts = [(x, y) for x, y in points if x and y]
    if len({x for x, _ in pts}) < 2:
        return None
    return float(np.polyfit(np.log([x for x, _ in pts]), np.log([y for _, y in pts]), 1)[0])


def cost_laws(lines: list[dict]) -> list[str]:
    """The table's second part: for each run measured at two sizes or more, the powers of its
    step seconds and peak memory (MLX's peak; TRL's peak RSS) in the parameters; for each run
    measured at two step sizes or more of one model, the powers of its teacher + update seconds
    and peak memory in the step's completion tokens (P x G x tokens)."""
    by_size: dict[tuple, list[dict]] = {}
    by_tokens: dict[tuple, list[dict]] = {}
    for r in rows_of(lines):
        shape = f"{r['prompts']} x {r['group']} x {r['max_new']}"
        by_size.setdefault((r["setting"], r["run"], r["dtype"], shape), []).append(r)
        by_tokens.setdefault((r["setting"], r["run"], r["dtype"], r["model"]), []).append(r)

    out = []
    for (setting, run, dtype, shape), rs in sorted(by_size.items()):
        step = exponent([(r["params"], r["step_s"]) for r in rs])
        if step is not None:
            peak = exponent([(r["params"], memory_gb(r)) for r in rs])
            models = ", ".join(r["model"] for r in sorted(rs, key=lambda r: r["params"]))
            out.append(
                f"| {setting} | {run} | {dtype} | parameters ({models}; {shape}) | step s | {step:.2f} | {fmt(peak)} |"
            )
    for (setting, run, dtype, model), rs in sorted(by_tokens.items()):
        tokens = [(r["prompts"] * r["group"] * r["max_new"], r) for r in rs]
        learn = exponent([(t, r.get("learn_s")) for t, r in tokens])
        if learn is not None:
            peak = exponent([(t, memory_gb(r)) for t, r in tokens])
            counts = ", ".join(str(t) for t in sorted({t for t, _ in tokens}))
            against = f"completion tokens ({model}; {counts})"
            out.append(f"| {setting} | {run} | {dtype} | {against} | teacher + update s | {learn:.2f} | {fmt(peak)} |")
    if not out:
        return []
    return [
        "",
        "## Cost laws",
        "",
        "The powers `a` of `cost ~ x^a` (least-squares slopes on log-log axes) over the rows above.",
        "",
        "| setting | run | dtype | against | time | power (time) | power (peak memory) |",
        "|---|---|---|---|---|---:|---:|",
        *out,
    ]


def write_plot(lines: list[dict], path: Path) -> None:
    """Log-log: step seconds and peak GB against parameters (a curve per run, dtype and shape
    measured at two sizes or more), and teacher + update seconds against a step's completion
    tokens (the group-size and token-cap sweeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(r, key):
        return memory_gb(r) if key == "peak_gb" else r.get(key)

    rows = rows_of(lines)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    curves: dict = {}
    sweeps: dict = {}
    for r in rows:
        curves.setdefault(f"{r['run']} {r['dtype']} {r['prompts']}x{r['group']}x{r['max_new']}", []).append(r)
        sweeps.setdefault(f"{r['run']} {r['dtype']} {r['model']} ({r['setting']})", []).append(r)
    for label, rs in sorted(curves.items()):
        for ax, key in ((axes[0], "step_s"), (axes[1], "peak_gb")):
            pts = sorted((r["params"], value(r, key)) for r in rs if value(r, key))
            if len(pts) > 1:
                ax.plot(*zip(*pts), "o-", label=label)
    for label, rs in sorted(sweeps.items()):
        pts = sorted((r["prompts"] * r["group"] * r["max_new"], r["learn_s"]) for r in rs if r.get("learn_s"))
        if len(pts) > 1:
            axes[2].plot(*zip(*pts), "o-", label=label)
    titles = ("step seconds", "peak GB (MLX peak; TRL: peak RSS)", "teacher + update seconds")
    for ax, title, xlabel in zip(axes, titles, ("parameters", "parameters", "completion tokens per step")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

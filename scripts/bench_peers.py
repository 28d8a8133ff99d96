"""Our GRPO and CAST steps against TRL's `GRPOTrainer` on the same workload, same CPU, one run.

The workload is `bench_step.py`'s (the speed issue's): the embedded SmolLM2-135M-Instruct in
float32, 2 prompts x 8 completions per step, <= 128 new tokens, T 1.0 / top-p 0.95 / top-k 20,
LoRA rank 8 (alpha 16) on all seven projections of the last 8 blocks, lr 1e-5, beta 0, one
update per batch, the same 64 prompts (chat-templated once, here, and given to TRL as text).
Each step of both tools samples the same prompts: TRL gets them in the order our run draws
them (`training_order`) with its shuffle off, and the script checks our run's samples file
against that order. Until session 18 TRL shuffled its own way, so the tools answered other
prompts each step (our completions ran 925 tokens a step against TRL's 678-693). Both tools
filter in the same order (`PEER_SAMPLING`): top-k, then top-p on what top-k kept,
renormalised, as transformers' `generate` does; until session 20 ours ran its default order
(`joint`: top-p over the full distribution), which keeps more tokens and drew 7-10% longer
completions on this workload.

Each tool runs `--steps` steps in its own process, one after the other (never side by side):

- ours: `python -m cast_mlx.train` with the workload's `--set` overrides; per-step times from
  its metrics.jsonl (model load and the step-0 eval excluded: eval is off);
- TRL 1.16 `GRPOTrainer` (torch 2.13 CPU, LoRA through PEFT, `loss_type="grpo"`, no
  gradient checkpointing, `use_vllm=False`), in its own venv that this script creates on
  first use (`--venv`, default ~/.cache/cast-mlx/bench/trl-venv; torch==2.13.0 is the CPU
  wheel on the package index here, other torch specs pull CUDA builds). Its step time comes
  from a `TrainerCallback`, its rollout time and tokens from a wrapper around `_generate`.
  It runs in float32 and, where the CPU has native bfloat16 (`native_bf16` in the line says
  what was detected: /proc/cpuinfo's avx512_bf16 / amx_bf16 / arm bf16 flags, or macOS's
  `hw.optional.arm.FEAT_BF16`), in bfloat16 too (bfloat16 weights and `bf16=True`'s autocast);
  `--trl-dtypes` picks them by hand, `trl_dtypes` says which ran.

Per tool: the median step, rollout and rest-of-step seconds over the steps, completion tokens
per step, rollout tokens/s, peak RSS (`trl` holds one result per dtype). Ratios against the
faster TRL run (`trl_fastest`): `cast_step_vs_trl`, `grpo_step_vs_trl` (issue #29's targets
0.5 and 0.35), `*_rollout_tok_s_vs_trl` (target 1.2); they are also printed to stderr. Our GRPO skips the
update when every group has zero variance; `grpo.update_steps` says how many of its steps had
one, and `grpo.step_s_with_update` is the median over those.

Not in CI (it installs TRL and takes ~10 minutes, ~15 with bfloat16). Prints ONE JSON line.
Usage: python scripts/bench_peers.py [--steps 3] [--venv DIR] [--skip-trl] [--only [cast] [grpo]]
[--trl-dtypes float32 bfloat16]  (`--only` with no name: TRL alone)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import (  # noqa: E402
    GROUP,
    MAX_NEW,
    PROMPTS,
    RECIPE,
    cpu_name,
    workload_overrides,
    workload_problems,
    write_workload,
)

from cast_mlx.engine.blas import active_blas, thread_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_PINS = [
    "torch==2.13.0",
    "trl==1.16.0",
    "peft==0.21.2",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "gguf==0.19.0",  # transformers reads the embedded model's GGUF file
]
DEFAULT_VENV = Path(os.environ.get("CAST_MLX_HOME", Path.home() / ".cache" / "cast-mlx")) / "bench" / "trl-venv"

TRL_CHILD = r"""
import json, re, resource, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

spec = json.load(open(sys.argv[1]))
dtype = getattr(torch, spec.get("dtype", "float32"))
torch.manual_seed(0)
if "config" in spec:  # random weights from a published config (bench_scale.py)
    from transformers import AutoConfig
    fields = dict(spec["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
else:
    kw = dict(gguf_file=spec["gguf_name"])
    tok = AutoTokenizer.from_pretrained(spec["gguf_dir"], **kw)
    loaded = AutoModelForCausalLM.from_pretrained(spec["gguf_dir"], dtype=torch.float32, **kw)
    # transformers marks a GGUF-loaded model as quantized and refuses to train it: the same
    # (dequantized) weights in a plain model of the run's dtype
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
n_layers = model.config.num_hidden_layers
rows = [json.loads(line) for line in open(spec["prompts"])]
dataset = Dataset.from_list(rows)

def last_number(text):
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return found[-1] if found else None

def correct(completions, answer, **_):  # lenient: the last number of the completion
    found = [last_number(c) for c in completions]
    return [float(x is not None and float(x) == float(a)) for x, a in zip(found, answer)]

steps, gen = [], []

class StepTimer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        steps.append({"step_s": time.perf_counter() - self.t, "rss_gb": rss})

rows_per_step = spec["prompts_per_step"] * spec["group"]
micro = spec.get("micro_batch") or rows_per_step  # one optimizer step: all rows, in micro-batches
args = GRPOConfig(
    output_dir=spec["out"], per_device_train_batch_size=micro,
    gradient_accumulation_steps=rows_per_step // micro, num_generations=spec["group"],
    max_completion_length=spec["max_new"], temperature=spec.get("temperature", 1.0), top_p=0.95, top_k=20,
    shuffle_dataset=False,  # the prompts come in our run's order (bench_peers.training_order)
    learning_rate=1e-5, beta=0.0, loss_type="grpo", num_iterations=1, gradient_checkpointing=False,
    use_vllm=False, max_steps=spec["steps"], logging_steps=1, report_to=[], save_strategy="no",
    bf16=dtype == torch.bfloat16, fp16=False, use_cpu=True, seed=0, dataloader_num_workers=0,
    warmup_steps=0, lr_scheduler_type="constant",
)
lora_layers = spec.get("lora_layers", 8)
lora = LoraConfig(
    r=spec.get("lora_rank", 8), lora_alpha=spec.get("lora_alpha", 16), lora_dropout=0.0, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=list(range(n_layers - lora_layers, n_layers)),
)
trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=dataset,
                      processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
inner = trainer._generate
def timed_generate(prompts):
    t = time.perf_counter()
    out = inner(prompts)
    seen = sorted(set(prompts))  # which prompts this step answered
    gen.append({"rollout_s": time.perf_counter() - t, "tokens": sum(len(ids) for ids in out[1]), "prompts": seen})
    return out
trainer._generate = timed_generate
trainer.train()
print("RESULT " + json.dumps({"steps": steps, "generate": gen, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "dtype": str(dtype).split(".")[-1]}))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"[bench_peers] creating {venv} ({' '.join(TRL_PINS)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return python


def versions(python: Path) -> dict:
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))" % (
        ["torch", "trl", "peft", "transformers", "accelerate"],
    )
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 / AMX; "bf16": arm64 Linux


def native_bf16(system: str, machine: str, cpuinfo: str = "", sysctl: str | None = None) -> tuple[bool, str]:
    """Whether the CPU has native bfloat16 arithmetic (which torch's CPU kernels use), and what
    was detected: on Linux the flags of /proc/cpuinfo (`cpuinfo`, its text), on macOS the
    value of `sysctl hw.optional.arm.FEAT_BF16` (`sysctl`; M2 and later: 1)."""
    if system == "Linux":
        flags = set()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
        found = [f for f in BF16_FLAGS if f in flags]
        if found:
            return True, f"/proc/cpuinfo flags: {' '.join(found)}"
        return False, f"/proc/cpuinfo flags: none of {', '.join(BF16_FLAGS)} ({machine})"
    if system == "Darwin":
        value = "unknown" if sysctl is None else sysctl.strip()
        said = f"sysctl hw.optional.arm.FEAT_BF16={value} ({machine}; TRL runs on the CPU)"
        return (sysctl or "").strip() == "1", said
    return False, f"{system} {machine}: bfloat16 support not detected on this system"


def detect_bf16() -> tuple[bool, str]:
    """`native_bf16` on this machine."""
    system, cpuinfo, value = platform.system(), "", None
    if system == "Linux":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            pass
    elif system == "Darwin":
        done = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        value = done.stdout.strip() if done.returncode == 0 else None
    return native_bf16(system, platform.machine(), cpuinfo, value)


def trl_dtypes(asked: list[str] | None, native: bool) -> list[str]:
    """The dtypes TRL runs in: as asked, else float32 and, with native bfloat16, bfloat16."""
    return list(asked) if asked else ["float32", "bfloat16"] if native else ["float32"]


def fastest(runs: dict[str, dict]) -> str | None:
    """The key of the run with the shortest median step (None if none was timed)."""
    timed = {k: r for k, r in runs.items() if r.get("step_s")}
    return min(timed, key=lambda k: timed[k]["step_s"]) if timed else None


def ratios_vs(ours: dict[str, dict], peer: dict) -> dict:
    """`{algorithm}_step_vs_trl` and `{algorithm}_rollout_tok_s_vs_trl` of each of our runs
    against one TRL run."""
    out = {}
    for algorithm, r in ours.items():
        out[f"{algorithm}_step_vs_trl"] = round(r["step_s"] / peer["step_s"], 3)
        out[f"{algorithm}_rollout_tok_s_vs_trl"] = round(r["rollout_tok_s"] / peer["rollout_tok_s"], 3)
    return out


def median(xs):
    return round(statistics.median(xs), 3) if xs else None


def training_order(data_dir: Path, steps: int) -> list[int]:
    """The workload's problems (indices) in the order our run draws them, whole epochs, enough
    for `steps` steps: its recipe's seed and shuffle, epoch after epoch (`sampling.epoch_order`)."""
    from cast_mlx import config
    from cast_mlx.training import sampling

    recipe = config.load_recipe(RECIPE, workload_overrides(data_dir, "grpo", steps))
    n, want = len(workload_problems()), steps * recipe.sampling.prompts_per_step
    order: list[int] = []
    for epoch in range(-(-want // n)):
        order += sampling.epoch_order(n, recipe.seed, epoch, recipe.data.shuffle)
    return order


def check_drawn(samples_file: Path, questions: list[str], per_step: int) -> None:
    """Raise unless each step of our run (its samples file) sampled `questions[(step - 1) *
    per_step : step * per_step]`: what TRL was given for that step."""
    for line in samples_file.read_text().splitlines():
        r = json.loads(line)
        step = r["step"]
        if r["problem"] not in questions[(step - 1) * per_step : step * per_step]:
            raise RuntimeError(f"ours: step {step} sampled {r['problem']!r}, not one of TRL's prompts for that step")


# TRL samples through transformers' `generate`: top-k, then top-p over what top-k kept
PEER_SAMPLING = ["sampling.filter_order=sequential"]


def run_ours(algorithm: str, data_dir: Path, out: Path, steps: int) -> dict:
    sets = workload_overrides(data_dir, algorithm, steps) + PEER_SAMPLING + [f"logging.out_dir={out}"]
    cmd = [sys.executable, "-m", "cast_mlx.train", "--recipe", str(RECIPE), "--no-dashboard"]
    cmd += [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ours ({algorithm}) exited {done.returncode}: {done.stderr[-2000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    if len(lines) != steps:  # judge the run by what it wrote
        raise RuntimeError(f"ours ({algorithm}): {len(lines)} metrics lines for {steps} steps")
    problems = workload_problems()
    check_drawn(out / "samples.jsonl", [problems[i]["question"] for i in training_order(data_dir, steps)], PROMPTS)
    tokens = [m["tokens_per_s/generate"] * m["time/sample"] for m in lines]
    result = {
        "step_s": median([m["time/step"] for m in lines]),
        "rollout_s": median([m["time/sample"] for m in lines]),
        "teacher_s": median([m["time/teacher"] for m in lines]),
        "update_s": median([m["time/update"] for m in lines]),
        "rest_s": median([m["time/step"] - m["time/sample"] for m in lines]),
        "tokens_per_step": median(tokens),
        "rollout_tok_s": median([m["tokens_per_s/generate"] for m in lines]),
        "rss_gb": round(max(m["memory/rss_gb"] for m in lines), 3),
        "update_steps": sum(bool(m["update_applied"]) for m in lines),
        "steps": [round(m["time/step"], 2) for m in lines],
    }
    with_update = [m["time/step"] for m in lines if m["update_applied"]]
    result["step_s_with_update"] = median(with_update)
    return result


def run_trl(
    python: Path, prompts_file: Path, out: Path, steps: int, dtype: str = "float32", shape: dict | None = None
) -> dict:
    """TRL's GRPO steps in its venv, in `dtype`. `shape` changes the workload (bench_scale.py):
    `config` and `tokenizer_dir` (random weights from a config instead of the embedded model),
    `prompts_per_step`, `group`, `max_new`, `lora_rank`, `lora_alpha`, `lora_layers`,
    `micro_batch`, `temperature`."""
    spec = {
        "prompts": str(prompts_file),
        "out": str(out),
        "steps": steps,
        "dtype": dtype,
        "prompts_per_step": PROMPTS,
        "group": GROUP,
        "max_new": MAX_NEW,
        **(shape or {}),
    }
    if "config" not in spec:
        from cast_mlx.engine import models

        gguf = models.gguf_path(models.DEFAULT_MODEL)
        spec |= {"gguf_dir": str(gguf.parent), "gguf_name": gguf.name}
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    (out / "child.py").write_text(TRL_CHILD)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")  # torch keeps its own thread defaults
    done = subprocess.run([str(python), str(out / "child.py"), str(out / "spec.json")], env=env,
                          capture_output=True, text=True)  # fmt: skip
    found = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"TRL exited {done.returncode}: {done.stderr[-3000:]}")
    raw = json.loads(found[-1][len("RESULT ") :])
    step_s = [s["step_s"] for s in raw["steps"]]
    rollout = [g["rollout_s"] for g in raw["generate"]][: len(step_s)]
    tokens = [g["tokens"] for g in raw["generate"]][: len(step_s)]
    if len(step_s) != steps:
        raise RuntimeError(f"TRL: {len(step_s)} steps timed for {steps}")
    given = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()]
    per_step = spec["prompts_per_step"]
    for k, g in enumerate(raw["generate"][:steps]):  # the prompts in the order given, per_step a step
        if g["prompts"] != sorted(set(given[k * per_step : (k + 1) * per_step])):
            first = k * per_step
            raise RuntimeError(f"TRL: step {k + 1} did not sample prompts {first}-{first + per_step - 1} of its file")
    return {
        "dtype": raw["dtype"],
        "step_s": median(step_s),
        "rollout_s": median(rollout),
        "rest_s": median([s - r for s, r in zip(step_s, rollout)]),
        "tokens_per_step": median(tokens),
        "rollout_tok_s": median([t / r for t, r in zip(tokens, rollout)]),
        "rss_gb": round(max(s["rss_gb"] for s in raw["steps"]), 3),
        "torch_threads": raw["threads"],
        "steps": [round(s, 2) for s in step_s],
    }


def templated_prompts(folder: Path, order: list[int] | None = None) -> Path:
    """The workload's prompts exactly as we feed them (chat template and answer instruction),
    as text for TRL, with their answers; in `order` (indices) if given, else as listed."""
    from mlx_lm.utils import load_tokenizer  # cast_mlx (the BLAS) came first, with bench_step

    from cast_mlx.engine import models
    from cast_mlx.tasks import data

    tokenizer = load_tokenizer(models.fetch(models.DEFAULT_MODEL))
    rows = []
    problems = workload_problems()
    for i in range(len(problems)) if order is None else order:
        r = problems[i]
        problem = data.Problem(id=str(i), question=r["question"], gold=r["answer"])
        rows.append({"prompt": data.build_prompt(tokenizer, problem, None, "hash"), "answer": r["answer"]})
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--only", nargs="*", default=["cast", "grpo"], choices=["cast", "grpo"])  # none: TRL only
    ap.add_argument("--trl-dtypes", nargs="+", choices=["float32", "bfloat16"], default=None)
    args = ap.parse_args(argv)
    line: dict = {"bench": "peers", "machine": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    native, detected = detect_bf16()
    line["native_bf16"] = {"native": native, "detected": detected}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_dir = write_workload(tmp_path / "workload")
        if not args.skip_trl:
            python = ensure_venv(args.venv)
            line["trl_versions"] = versions(python)
            line["trl_threads"] = thread_settings()  # its environment: ours, as inherited
            line["trl_dtypes"] = trl_dtypes(args.trl_dtypes, native)
            prompts = templated_prompts(tmp_path, training_order(data_dir, args.steps))
            line["trl"] = {
                d: run_trl(python, prompts, tmp_path / f"trl-{d}", args.steps, d) for d in line["trl_dtypes"]
            }
        import mlx.core as mx

        line["ours_versions"] = {"mlx": mx.__version__, "blas": active_blas(), "threads": thread_settings()}
        line["ours_sampling"] = PEER_SAMPLING
        for algorithm in args.only:
            line[algorithm] = run_ours(algorithm, data_dir, tmp_path / f"ours-{algorithm}", args.steps)
    best = fastest(line.get("trl", {}))
    if best:
        line["trl_fastest"] = best
        line.update(ratios_vs({a: line[a] for a in args.only}, line["trl"][best]))
        said = ", ".join(f"{k} {v}" for k, v in line.items() if k.endswith("_vs_trl"))
        print(f"[bench_peers] against TRL {best} (the faster of {', '.join(line['trl'])}): {said}", file=sys.stderr)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

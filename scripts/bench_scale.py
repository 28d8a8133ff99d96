"""How a step's cost grows with the model: GRPO and CAST at the shapes of real models, and TRL's.

Models (`--models`, `scale_models.py`): SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B and Qwen3-1.7B,
each the mlx-lm architecture of its published config.json (real vocabulary, tied head) with
random weights: nothing is downloaded. The prompts are tokenized with the embedded SmolLM2
tokenizer (its ids exist in every vocabulary; ids it lacks decode to nothing), so Qwen's own
chat template, a few tokens longer, is not used. `--dtype`: float32 (what the trainer uses on
a CPU), or `4bit`: bfloat16 quantized with group size 64, 4 bits, trained as QLoRA, as on a
Mac. MLX's quantized matmuls on a CPU are 35-300x slower than float32 ones (`CPU_4BIT`), so a
real model's 4-bit run there takes hours: run `--dtype 4bit` on Metal (or CUDA), where this
script runs unchanged; on a CPU its seconds would mean nothing anyway, only its memory.

Settings (`--settings`):
- `default`: bench_peers' workload (the default GRPO recipe with `bench_step.workload_overrides`):
  2 prompts x 8 completions, <= 128 new tokens, LoRA r8 on the last 8 blocks, micro-batch 8;
- `mac`: recipes/qwen0.5b.yaml's: 4 x 8, 320 tokens, LoRA r16 on 16 blocks, micro-batch 2 (4 until
  session 13, when the update measured 8.9 GB at 0.5B in 4-bit).
`--group-sizes` and `--token-caps` replace the setting's group size and token cap (every
combination is one configuration); `--micro-batch` its micro-batch.

Per configuration, in a process of its own (so that its RSS is its own):
- `rollout`: `trainer.sample` on the setting's prompts and groups, up to `--rollout-tokens`
  new tokens (default: the cap for `default`, 32 for `mac`, where a full rollout of a 1.5B
  model takes many minutes on 2 cores), after an untimed 2-token warm-up. A random-weight
  model almost never samples EOS, so every stream runs to that cap. `kv_cache_gb_at_cap` is
  what its KV cache holds at the full cap.
- `teacher` and `update`, on a synthetic batch of the configuration's full size (P x G rows
  of exactly `max_new` random tokens, each ending with EOS; the frozen blocks' states
  computed as the rollout keeps them; old log-probs -log V, what a random model's are close to:
  they enter only CAST's gap values, not any cost); rewards alternate 1 / 0 in each group,
  so that GRPO and CAST update every row. Each algorithm (`--algorithms`) runs
  `trainer.learn` `--warmup` + `--repeats` times on it; `score_teacher` and `guarded_update`
  are timed and their MLX peak memory read (`mx.reset_peak_memory` before each).
Seconds are medians over the repeats; `step_s` = rollout + teacher + update when the rollout
ran to the full cap. `resident_gb`: MLX memory after set-up (weights, adapters); `rss_gb`: the
process's peak resident set so far.

`--peer`: TRL's `GRPOTrainer` (bench_peers' venv and child) at the same shapes, random init
from the same config (`AutoConfig.for_model` + `from_config`), float32 and, where the CPU
has native bfloat16, bfloat16 (`--peer-dtypes`), `--peer-steps` steps, one process each.

One JSON line per configuration (and per TRL dtype), printed and appended to `--out`.
`--from RESULTS.jsonl --table docs/scale.md --plot docs/scale.png` writes the markdown table
and the log-log plot from such lines, measuring nothing. Not in CI beyond a tiny smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from cast_mlx.engine import fastmath

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_models as sm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {"recipe": "recipes/smollm2-135m-arith-grpo.yaml", "rollout_tokens": None, "trl_micro_batch": None},
    "mac": {"recipe": "recipes/qwen0.5b.yaml", "rollout_tokens": 32, "trl_micro_batch": 2},
}
PHASES = ("rollout", "teacher", "update")
GB = 2**30
# measured on the 2-core EPYC (loaded, MKL on one thread): [512, 1536] @ [1536, 8960]
CPU_4BIT = (
    "4-bit on the CPU backend: MLX's quantized matmul there is far slower than float32 "
    "([512, 1536] @ [1536, 8960]: 0.18 s float32, 6.3 s 4-bit with float32 activations, 53 s with the "
    "bfloat16 ones a 4-bit checkpoint has); a real model's 4-bit run takes hours. Measure 4-bit on Metal or CUDA."
)


def recipe_for(spec: dict, algorithm: str, data_dir: Path):
    """The setting's recipe for `algorithm` on the workload's prompts, with the spec's group
    size and token cap."""
    from bench_step import workload_overrides

    from cast_mlx import config as cfg

    setting = SETTINGS[spec["setting"]]
    if spec["setting"] == "default":
        sets = workload_overrides(data_dir, algorithm)
    else:
        sets = ["data.task=custom", f"data.path={data_dir}", "data.reward=lenient", f"algorithm.name={algorithm}"]
        sets += ["logging.eval_every=0"]
    if spec.get("group"):
        sets.append(f"sampling.group_size={spec['group']}")
    if spec.get("max_new"):
        sets.append(f"sampling.max_new_tokens={spec['max_new']}")
    if spec.get("micro_batch"):
        sets.append(f"optimizer.micro_batch_size={spec['micro_batch']}")
    return cfg.load_recipe(ROOT / setting["recipe"], sets)


def smol_tokenizer():
    from mlx_lm.utils import load_tokenizer

    from cast_mlx.engine import models

    return load_tokenizer(models.fetch(models.DEFAULT_MODEL))


@contextmanager
def random_model(name: str, dtype: str, tokenizer):
    """`trainer.setup` loads a fresh random-weight model (the same seed: the same weights)."""
    from cast_mlx.engine import models

    with mock.patch.object(models, "load", lambda *args, **kw: (sm.build(name, dtype), tokenizer)):
        yield


def peak_gb() -> float:
    return round(mx.get_peak_memory() / GB, 3)


def rss_gb() -> float:
    from bench_step import rss_gb as peak_rss

    return round(peak_rss(), 3)


def time_rollout(run, cap: int, cfg: dict, dtype: str) -> dict:
    from cast_mlx.training import trainer

    recipe = run.recipe
    problems = run.problems[: recipe.sampling.prompts_per_step]

    def sample(tokens: int):
        run.recipe = replace(recipe, sampling=replace(recipe.sampling, max_new_tokens=tokens))
        try:
            traj = trainer.sample(run, problems)
            mx.eval(traj.rollout.tokens, traj.rollout.logprobs)
            return traj
        finally:
            run.recipe = recipe

    sample(2)  # warm-up: compiles and first calls
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    out = sample(cap).rollout
    seconds = time.perf_counter() - start
    streams = int(out.tokens.shape[0])
    longest_prompt = max(len(p) for p in out.prompt_ids)
    kv = sm.kv_cache_bytes(cfg, streams, longest_prompt + recipe.sampling.max_new_tokens, dtype)
    return {
        "max_new": cap,
        "full_cap": cap == recipe.sampling.max_new_tokens,
        "streams": streams,
        "s": round(seconds, 3),
        "prefill_s": round(out.prefill_seconds, 3),
        "decode_tokens": out.decode_tokens,
        "tok_s": round(out.decode_tokens / seconds, 2),
        "peak_gb": peak_gb(),
        "rss_gb": rss_gb(),
        "kv_cache_gb_at_cap": round(kv / GB, 3),
    }


def frozen_states(run, prompts: list[list[int]], ids: np.ndarray, group: int):
    """The states entering the first trainable block, of every prompt and completion token,
    as the rollout keeps them (`Rollout.frozen`); None when the update runs every block."""
    from cast_mlx.engine.logprobs import FrozenStates, lower_states

    split, chunk = run.frozen_split, run.recipe.optimizer.micro_batch_size
    if not split:
        return None
    prompt_states, completions = [], []
    for p, prompt in enumerate(prompts):
        for first in range(0, group, chunk):
            rows = ids[p * group + first : p * group + min(group, first + chunk)]
            h = lower_states(run.model.model, mx.array([prompt + row.tolist() for row in rows]), None, split)
            if first == 0:
                prompt_states.append(h[0, : len(prompt)])
            completions.append(h[:, len(prompt) :])
            mx.eval(prompt_states[-1], completions[-1])
    return FrozenStates(split, prompt_states, mx.concatenate(completions), group)


def synthetic_batch(run, seed: int = 0):
    """A judged trajectory of the recipe's full size: P x G rows of `max_new` random tokens
    each (no special token but the final EOS), rewards 1 / 0 alternating in every group."""
    from cast_mlx.engine.rollout import Rollout
    from cast_mlx.tasks import data
    from cast_mlx.training.trajectory import Trajectory, judge

    r, tok = run.recipe, run.tokenizer
    n_prompts, group, width = r.sampling.prompts_per_step, r.sampling.group_size, r.sampling.max_new_tokens
    problems = run.problems[:n_prompts]
    prompts = [data.prompt_ids(tok, p, r.data.system_prompt, r.data.answer_format) for p in problems]
    rows, vocab = n_prompts * group, int(run.model.args.vocab_size)
    ids = np.random.default_rng(seed).integers(0, min(vocab, len(tok.vocab)), (rows, width))
    plain = next(i for i in range(1000, vocab) if i not in run.special_ids)
    ids[np.isin(ids, run.special_ids)] = plain
    ids[:, -1] = min(tok.eos_token_ids)
    out = Rollout(
        tokens=mx.array(ids.astype(np.int32)),
        mask=mx.ones((rows, width)),
        lengths=mx.full((rows,), width, dtype=mx.int32),
        finish_reasons=["eos"] * rows,
        prompt_ids=prompts,
        prompt_index=mx.arange(rows, dtype=mx.int32) // group,
        logprobs=mx.full((rows, width), -float(np.log(vocab))),
        prefill_tokens=sum(len(p) for p in prompts),
        decode_tokens=rows * width,
        seconds=0.0,
        frozen=frozen_states(run, prompts, ids, group),
    )
    traj = Trajectory(problems, prompts, out, group)
    start = time.perf_counter()
    judge(traj, tok, r, run.verifier, run.reward_fns, run.special_ids)
    verify_s = time.perf_counter() - start
    traj.rewards = mx.array([float(i % 2) for i in range(rows)])
    return traj, {
        "rows": rows,
        "completion_tokens": rows * width,
        "prompt_tokens": out.prefill_tokens,
        "verify_s": round(verify_s, 3),
    }


@contextmanager
def metered(calls: dict):
    """Time `score_teacher` and `guarded_update` inside `trainer.learn`, and read MLX's peak
    memory over each: `calls[phase]` gets one `(seconds, peak_gb)` per call."""
    from cast_mlx.training import trainer

    def wrap(phase, fn):
        def timed(*args, **kw):
            mx.reset_peak_memory()
            start = time.perf_counter()
            result = fn(*args, **kw)
            calls.setdefault(phase, []).append((time.perf_counter() - start, peak_gb()))
            return result

        return timed

    with (
        mock.patch.object(trainer, "score_teacher", wrap("teacher", trainer.score_teacher)),
        mock.patch.object(trainer, "guarded_update", wrap("update", trainer.guarded_update)),
    ):
        yield


def time_algorithm(run, traj, phases: list[str], warmup: int, repeats: int) -> dict:
    from cast_mlx.training import trainer

    calls: dict = {}
    with metered(calls):
        for _ in range(warmup + repeats):
            mx.clear_cache()
            if "update" in phases:
                metrics, _ = trainer.learn(run, traj)
            elif "teacher" in phases and run.teacher is not None:  # the teacher alone
                trainer.score_teacher(traj, run.model, run.tokenizer, run.recipe, run.teacher, run.ref_params)
    out: dict = {}
    for phase, timed in calls.items():
        kept = timed[warmup:] or timed
        out[f"{phase}_s"] = round(statistics.median(s for s, _ in kept), 3)
        out[f"{phase}_peak_gb"] = max(p for _, p in timed)
    if "update" in phases:
        out["rows_updated"] = traj.n_rows - int(metrics["rows_skipped"])
    out["rss_gb"] = rss_gb()
    return out


def measure(spec: dict) -> dict:
    """One configuration's line (the child process's work)."""
    from bench_step import cpu_name, write_workload

    from cast_mlx.engine.blas import active_blas, thread_settings
    from cast_mlx.training import trainer

    cfg, phases = sm.config(spec["model"]), spec["phases"]
    counts = sm.param_count(cfg)
    line: dict = {"bench": "scale", "tool": "cast-mlx", "model": spec["model"], "params": counts["total"]}
    line |= {"non_embedding": counts["non_embedding"], "dtype": spec["dtype"], "setting": spec["setting"]}
    tokenizer = smol_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_workload(Path(tmp) / "workload")
        traj = None
        for n, algorithm in enumerate(spec["algorithms"]):
            recipe = recipe_for(spec, algorithm, data_dir)
            start = time.perf_counter()
            with (
                random_model(spec["model"], spec["dtype"], tokenizer),
                trainer.setup(recipe, Path(tmp) / algorithm) as run,
            ):
                if n == 0:  # the shape, the rollout and the batch, with the first algorithm's run
                    line |= shape(run, time.perf_counter() - start)
                    if "rollout" in phases:
                        cap = spec.get("rollout_tokens") or SETTINGS[spec["setting"]]["rollout_tokens"] or 10**9
                        line["rollout"] = time_rollout(run, min(cap, line["max_new"]), cfg, spec["dtype"])
                    if "teacher" in phases or "update" in phases:
                        traj, line["batch"] = synthetic_batch(run)
                if traj is not None:
                    line[algorithm] = summed(
                        time_algorithm(run, traj, phases, spec["warmup"], spec["repeats"]), line.get("rollout")
                    )
            del run  # before the next algorithm's model is built: never two models at once
            gc.collect()
            mx.clear_cache()
    line |= {
        "repeats": spec["repeats"],
        "warmup": spec["warmup"],
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "blas": active_blas(),
        "threads": thread_settings(),
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    return line


def shape(run, setup_s: float) -> dict:
    r = run.recipe
    return {
        "prompts": r.sampling.prompts_per_step,
        "group": r.sampling.group_size,
        "max_new": r.sampling.max_new_tokens,
        "lora": {"rank": r.lora.rank, "layers": r.lora.num_layers},
        "micro_batch": r.optimizer.micro_batch_size,
        "frozen_blocks": run.frozen_split,
        "setup_s": round(setup_s, 2),
        "resident_gb": round(mx.get_active_memory() / GB, 3),
    }


def summed(result: dict, rollout: dict | None) -> dict:
    """`learn_s` (teacher + update), `step_s` (with the rollout, when it ran to the full cap)
    and `peak_gb` (the highest of the phases') of one algorithm's result."""
    learn_s = result.get("teacher_s", 0.0) + result.get("update_s", 0.0)
    result["learn_s"] = round(learn_s, 3)
    result["step_s"] = round(rollout["s"] + learn_s, 3) if rollout and rollout["full_cap"] else None
    peaks = [v for k, v in result.items() if k.endswith("_peak_gb")] + ([rollout["peak_gb"]] if rollout else [])
    result["peak_gb"] = max(peaks, default=None)
    return result


def peer(spec: dict, dtype: str, args) -> dict:
    """TRL's GRPO steps at the configuration's shapes, random init from the same config."""
    from bench_peers import ensure_venv, run_trl, templated_prompts, versions
    from bench_step import write_workload

    from cast_mlx.engine import models

    cfg = sm.config(spec["model"])
    line = {
        "bench": "scale",
        "tool": "trl",
        "model": spec["model"],
        "params": sm.param_count(cfg)["total"],
        "dtype": dtype,
        "setting": spec["setting"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(spec, "grpo", write_workload(Path(tmp) / "workload"))
        s, lo = recipe.sampling, recipe.lora
        shape = {
            "config": {k: v for k, v in cfg.items() if k != "torch_dtype"},
            "tokenizer_dir": str(models.fetch(models.DEFAULT_MODEL)),
            "prompts_per_step": s.prompts_per_step,
            "group": s.group_size,
            "max_new": s.max_new_tokens,
            "lora_rank": lo.rank,
            "lora_alpha": lo.alpha,
            "lora_layers": lo.num_layers,
            "micro_batch": spec.get("micro_batch") or SETTINGS[spec["setting"]]["trl_micro_batch"],
            "temperature": s.temperature,
        }
        python = ensure_venv(args.venv)
        line |= {"prompts": s.prompts_per_step, "group": s.group_size, "max_new": s.max_new_tokens}
        try:
            result = run_trl(python, templated_prompts(Path(tmp)), Path(tmp) / "trl", args.peer_steps, dtype, shape)
        except RuntimeError as exc:
            return line | {"error": str(exc)[-1500:]}
        after_first = result["steps"][1:]  # the first step warms up
        line |= {"trl": result, "step_s": result["step_s"], "rss_gb": result["rss_gb"], "versions": versions(python)}
        line["step_s_after_first"] = round(statistics.median(after_first), 3) if after_first else None
    return line


def configurations(args) -> list[dict]:
    combos = itertools.product(
        args.models, args.dtype, args.settings, args.group_sizes or [None], args.token_caps or [None]
    )
    return [
        {
            "model": m,
            "dtype": d,
            "setting": s,
            "group": g,
            "max_new": c,
            "algorithms": args.algorithms,
            "phases": args.phases,
            "rollout_tokens": args.rollout_tokens,
            "micro_batch": args.micro_batch,
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
        for m, d, s, g, c in combos
    ]


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        keep = {k: spec[k] for k in ("model", "dtype", "setting", "group", "max_new")}
        return {"bench": "scale", "tool": "cast-mlx", **keep, "error": done.stderr[-1500:]}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=sm.REAL, choices=list(sm.MODELS))
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=sm.DTYPES)
    ap.add_argument("--settings", nargs="+", default=["default"], choices=list(SETTINGS))
    ap.add_argument("--group-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--token-caps", nargs="+", type=int, default=None)
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "cast"], choices=["grpo", "cast"])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--rollout-tokens", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="replaces the setting's micro-batch")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--peer", action="store_true", help="also TRL's GRPO step at each configuration's shapes")
    ap.add_argument("--peer-dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--peer-steps", type=int, default=2)
    ap.add_argument("--skip-ours", action="store_true", help="with --peer: TRL's runs alone")
    ap.add_argument("--venv", type=Path, default=None, help="TRL's venv (default: bench_peers')")
    ap.add_argument("--out", type=Path, default=None, help="append each JSON line to this file")
    ap.add_argument(
        "--from", dest="source", type=Path, nargs="+", default=None, help="JSONL files of results: table/plot only"
    )
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    if args.source:
        lines = [json.loads(x) for path in args.source for x in path.read_text().splitlines() if x.strip()]
        if args.table:
            sm.write_table(lines, args.table, "`, `".join(path.as_posix() for path in args.source))
        if args.plot:
            sm.write_plot(lines, args.plot)
        return 0
    if "4bit" in args.dtype and fastmath.on_cpu() and set(args.models) - {"tiny"}:
        print(f"[bench_scale] {CPU_4BIT}", file=sys.stderr)
    if args.peer:
        from bench_peers import DEFAULT_VENV, detect_bf16, trl_dtypes

        args.venv = args.venv or DEFAULT_VENV
        native, detected = detect_bf16()
        peer_dtypes = trl_dtypes(args.peer_dtypes, native)
    lines = []
    for spec in configurations(args):
        said = " ".join(f"{k} {spec[k]}" for k in ("model", "dtype", "setting", "group", "max_new") if spec[k])
        print(f"[bench_scale] {said} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
        found = [] if args.peer and args.skip_ours else [run_child(spec)]
        if args.peer and spec["dtype"] == "float32":  # TRL has no 4-bit CPU path here
            found += [peer(spec, d, args) | {"native_bf16": detected} for d in peer_dtypes]
        for line in found:
            print(json.dumps(line), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")
        lines += found
    return 1 if any("error" in x for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())

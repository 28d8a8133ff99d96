"""One optimizer step without sampling, GRPO vs CAST, on one fixed batch, in one process.

The workload is the one of the speed issue (#16), shared with `scripts/bench_peers.py`: the
embedded SmolLM2-135M-Instruct in its default dtype (float32 on the CPU), 2 prompts x 8
completions, <= 128 new tokens, T 1.0 / top-p 0.95 / top-k 20, LoRA rank 8 (scale 2) on all
seven projections of the last 8 blocks, lr 1e-5, beta 0, one update per batch, the prompts
"What is a + b?" / "a - b" / "a * b" with 2-digit numbers (`workload_problems`).

The batch is sampled once (not timed): the first pair of workload prompts whose groups both
hold right and wrong answers. Then each variant runs `trainer.learn` on it
`--repeats` times (verify, teacher, advantages, loss, backward, AdamW: the trainer's own
code) and reports the median of each phase:

- `cast`: CAST as in the paper (the teacher forward included);
- `grpo`: GRPO, which skips the rows of zero-variance groups (they carry no loss);
- `grpo_same_rows`: GRPO made to update every row CAST updates (zero advantages replaced by
  1e-9), so that `cast_vs_grpo_same_rows` compares the same work: the paper's overhead.

It reruns one batch, so every shape after the warm-up rounds is one it has met: a cost that
a training run pays on each new shape does not show here (session 21: a packed update ran
faster here and slower in runs; docs/speed.md). Judge a change to the update by a run too.

`teacher_floor` bounds that overhead from below: the teacher's matmul FLOPs on this batch
(`forward_gflop`) at the best rate this process reaches on a block's largest matmul gives
`teacher_floor_s`, and `cast_vs_grpo_same_rows_floor` is the ratio if the teacher took only
that: what an exact teacher allows on this machine with the GRPO step as measured.

The variants' runs are all set up first, then take their steps in turn (two warm-up rounds,
then `--repeats` rounds of one step each). Run one variant after the other, as this script
did before, they met the machine at different times: this CPU's speed drifts within a
process (one batch's update took 3.9-5.0 s over eight steps), and the two orders of CAST and
GRPO gave CAST/GRPO 1.72 and 1.23 on the same code. Memory: `step_added_gb` is the most
MLX memory a variant's step added to what was resident before it (every variant's model
is); `rss_gb` the process's peak resident set at the end. `--micro-batch` sets
optimizer.micro_batch_size (default: the recipe's); `--share-prefix 0` scores each row with
its own full forward (the old path); `--reuse-frozen 0` runs the whole model in the update
instead of the top blocks from the rollout's kept states.

Prints ONE JSON line. Usage: python scripts/bench_step.py [--repeats 3] [--micro-batch N]
[--share-prefix 0|1] [--reuse-frozen 0|1] [--variants cast grpo grpo_same_rows]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cast_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from cast_mlx import config as cfg  # noqa: E402
from cast_mlx.algorithm.compiled import compile_count  # noqa: E402
from cast_mlx.engine.blas import active_blas, thread_settings  # noqa: E402
from cast_mlx.training import trainer  # noqa
from cast_mlx.training.trajectory import judge, teacher_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-arith-grpo.yaml"
PROMPTS, GROUP, MAX_NEW = 2, 8, 128


def workload_problems(n: int = 64, seed: int = 0) -> list[dict]:
    """`n` questions "What is a + b?" / "a - b" / "a * b" (2-digit numbers) with answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value)})
    return rows


def write_workload(folder: Path) -> Path:
    """The workload as a `task: custom` folder (train.jsonl, test.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in workload_problems())
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(lines)
    return folder


def workload_overrides(data_dir: Path, algorithm: str, steps: int = 3) -> list[str]:
    """`--set` overrides of the default recipe that give the workload (for `bench_peers`)."""
    return [
        "data.task=custom",
        f"data.path={data_dir}",
        "data.reward=lenient",
        f"sampling.prompts_per_step={PROMPTS}",
        f"sampling.group_size={GROUP}",
        f"sampling.max_new_tokens={MAX_NEW}",
        "sampling.temperature=1.0",
        "sampling.top_p=0.95",
        "sampling.top_k=20",
        "lora.rank=8",
        "lora.alpha=16",
        "lora.num_layers=8",
        "optimizer.lr=1e-5",
        "loss.beta=0",
        f"algorithm.name={algorithm}",
        f"schedule.steps={steps}",
        "schedule.warmup_ratio=0",
        "logging.eval_every=0",
    ]


def recipe_for(
    data_dir: Path,
    algorithm: str,
    micro_batch: int | None,
    share_prefix: bool,
    reuse_frozen: bool = True,
    teacher_context: str | None = None,
) -> cfg.Recipe:
    sets = workload_overrides(data_dir, algorithm) + [
        f"system.share_prefix={str(share_prefix).lower()}",
        f"system.reuse_frozen={str(reuse_frozen).lower()}",
    ]
    if teacher_context:
        sets.append(f"teacher.context={teacher_context}")
    if micro_batch:
        sets.append(f"optimizer.micro_batch_size={micro_batch}")
    return cfg.load_recipe(RECIPE, sets)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mixed_batch(run, tries: int = 8):
    """The first pair of workload prompts whose two groups both have right and wrong
    answers (so that GRPO updates every row too), sampled at step 0, and whether one was
    found (else the last pair tried)."""
    for i in range(tries):
        problems = run.problems[i * PROMPTS : (i + 1) * PROMPTS]
        traj = trainer.sample(run, problems)
        mx.eval(traj.rollout.tokens, traj.rollout.logprobs)
        judge(traj, run.tokenizer, run.recipe, run.verifier, run.reward_fns, run.special_ids)
        correct = traj.judged.lenient
        groups = [correct[g * GROUP : (g + 1) * GROUP] for g in range(PROMPTS)]
        if all(0 < sum(g) < GROUP for g in groups):
            return traj, True
    return traj, False


def same_rows(compiled):
    """`grpo_same_rows`' advantages: every row with tokens carries (a negligible) loss, as
    under CAST."""

    def all_rows(rewards, gaps, mask, step=0, special=None):
        adv, base = compiled(rewards, gaps, mask, step=step, special=special)
        return mx.where((adv == 0) & (mask > 0), 1e-9, adv), base

    return all_rows


WARMUP_ROUNDS = 2  # CAST's first step with a `same` teacher scores none: it still holds the policy's weights


def time_variants(runs: dict, traj, repeats: int) -> dict:
    """`trainer.learn` on `traj` for every variant's run, in rounds that run each variant once
    in turn (`WARMUP_ROUNDS`, then `repeats` timed ones), so that each variant meets the
    machine at the same times: this CPU's speed drifts within a process. Each variant's
    medians, rows updated, the MLX memory its steps added to what was resident before them
    (every variant's model is), and the traces its timed steps compiled."""
    lines: dict[str, list[dict]] = {v: [] for v in runs}
    added = dict.fromkeys(runs, 0)
    compiles = dict.fromkeys(runs, 0)
    for done in range(WARMUP_ROUNDS + repeats):
        for variant, run in runs.items():
            resident, traces = mx.get_active_memory(), compile_count()
            mx.reset_peak_memory()
            line = trainer.learn(run, traj)[0]
            if done >= WARMUP_ROUNDS:
                lines[variant].append(line)
                added[variant] = max(added[variant], mx.get_peak_memory() - resident)
                compiles[variant] += compile_count() - traces
    out = {}
    for variant, timed in lines.items():
        med = {k: statistics.median(m[f"time/{k}"] for m in timed) for k in ("verify", "teacher", "update")}
        out[variant] = {
            "step_s": round(sum(med.values()), 3),
            **{f"{k}_s": round(v, 3) for k, v in med.items()},
            "rows_updated": PROMPTS * GROUP - int(timed[-1]["rows_skipped"]),
            "step_added_gb": round(added[variant] / 2**30, 3),
            "compiles_after_warmup": compiles[variant],
        }
    return out


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `fn()`, its result evaluated, over `repeats` calls after a
    warm-up call (the scripts' one timer)."""

    def call():
        out = fn()
        if out is not None:
            mx.eval(out)

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(hidden: int, inner: int, rows: int = 512, repeats: int = 10) -> float:
    """This process's rate on a block's largest matmul, `[rows, hidden] @ [hidden, inner]`
    (the MLP's; the forward's other matmuls are smaller and run slower)."""
    keys = mx.random.split(mx.random.key(0))
    x, w = mx.random.normal((rows, hidden), key=keys[0]), mx.random.normal((inner, hidden), key=keys[1])
    mx.eval(x, w)
    return 2 * rows * hidden * inner / median_seconds(lambda: x @ w.T, repeats) / 1e9


def matmul_gflop_by_part(model, positions: int, head_positions: int) -> dict[str, float]:
    """The matmul GFLOP of a forward per linear layer's name (`q_proj`, ..., summed over the
    blocks) and `head`: `positions` through every block's linear layers and `head_positions`
    through the vocabulary head (attention's and the elementwise work left out)."""
    parts: dict[str, float] = {}
    for layer in model.model.layers:
        for path, m in layer.named_modules():
            if isinstance(m, nn.Linear):  # a LoRA layer's base is `<name>.linear`; a LoRA layer is no Linear
                name = path.removesuffix(".linear").rsplit(".", 1)[-1]
                parts[name] = parts.get(name, 0.0) + 2 * m.weight.size * positions / 1e9
    args = model.args
    parts["head"] = 2 * args.vocab_size * args.hidden_size * head_positions / 1e9
    return parts


def forward_gflop(model, positions: int, head_positions: int) -> float:
    """The matmul GFLOP of a forward (`matmul_gflop_by_part`, summed)."""
    return sum(matmul_gflop_by_part(model, positions, head_positions).values())


def teacher_floor(run, traj) -> dict:
    """A lower bound on the teacher's time on this batch: `forward_gflop` of its forward
    (each prompt's teacher context once, then every completion token) at `matmul_gflops`, the
    best rate this process reaches. An exact teacher cannot take less on this machine. For a
    teacher on its own context (`plain`, `instructed`): it runs all blocks."""
    contexts = {tuple(c) for c in teacher_rows(traj, run.tokenizer, run.recipe)}
    completion = int(traj.rollout.mask.sum().item())
    gflop = forward_gflop(run.model, sum(len(c) for c in contexts) + completion, completion)
    args = run.model.args
    rate = matmul_gflops(args.hidden_size, args.intermediate_size)
    return {
        "teacher_gflop": round(gflop, 1),
        "matmul_gflops": round(rate, 1),
        "teacher_floor_s": round(gflop / rate, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--share-prefix", type=int, default=1, choices=(0, 1))
    ap.add_argument("--reuse-frozen", type=int, default=1, choices=(0, 1))
    ap.add_argument("--variants", nargs="+", default=["cast", "grpo", "grpo_same_rows"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-context", default=None, help="CAST's teacher.context (default: the recipe's)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_workload(Path(tmp) / "workload")
        runs, batch, floor, context = {}, None, {}, None
        with contextlib.ExitStack() as stack:
            for variant in args.variants:
                algorithm = "cast" if variant == "cast" else "grpo"
                recipe = recipe_for(
                    data_dir, algorithm, args.micro_batch, bool(args.share_prefix), bool(args.reuse_frozen),
                    args.teacher_context,
                )  # fmt: skip
                run = runs[variant] = stack.enter_context(trainer.setup(recipe, out_dir=Path(tmp) / variant))
                if variant == "grpo_same_rows":
                    run.advantages = same_rows(run.advantages)
                if variant == "cast":
                    context = recipe.teacher.context
                if batch is None:  # sampled once, by the first variant's (still untrained) model
                    batch, mixed = mixed_batch(run)
                    rss_sampling = rss_gb()
            results = time_variants(runs, batch, args.repeats)
            if "cast" in runs and context != "same":  # (`same`: the top blocks only)
                floor = teacher_floor(runs["cast"], batch)
    prompts, out = batch.prompts, batch.rollout
    line = {
        "bench": "step",
        "machine": cpu_name(),
        "blas": active_blas(),
        "threads": thread_settings(),
        "mlx": mx.__version__,
        "micro_batch": recipe.optimizer.micro_batch_size,
        "share_prefix": bool(args.share_prefix),
        "reuse_frozen": bool(args.reuse_frozen),
        "repeats": args.repeats,
        "teacher_context": context,  # CAST's (None when it did not run)
        "completion_tokens": int(out.mask.sum().item()),
        "prompt_tokens": sum(len(p) for p in prompts),
        "truncated": sum(f == "length" for f in out.finish_reasons),
        "lengths": [int(n) for n in out.lengths.tolist()],
        "rss_gb_after_sampling": round(rss_sampling, 3),
        "rss_gb": round(rss_gb(), 3),  # the process's peak: every variant's model is loaded
        # False: no tried pair had right and wrong answers in both groups; plain GRPO then
        # updates fewer rows (maybe none), and grpo_same_rows is the comparison to read
        "mixed_groups": mixed,
        **{f"{v}": r for v, r in results.items()},
    }
    if "cast" in results and "grpo" in results:
        line["cast_vs_grpo"] = round(results["cast"]["step_s"] / results["grpo"]["step_s"], 3)
    if "cast" in results and "grpo_same_rows" in results:
        line["cast_vs_grpo_same_rows"] = round(results["cast"]["step_s"] / results["grpo_same_rows"]["step_s"], 3)
    if floor:
        line["teacher_floor"] = floor
        if "grpo_same_rows" in results:  # the best CAST / GRPO an exact teacher allows here
            grpo = results["grpo_same_rows"]["step_s"]
            floor["cast_vs_grpo_same_rows_floor"] = round((grpo + floor["teacher_floor_s"]) / grpo, 3)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure a step's peak memory per phase at a few model shapes and fit the memory plan's
constants (`cast_mlx/training/memory_laws.py`).

    python scripts/fit_memory_plan.py --out runs/memory-plan.jsonl   # measure all points, fit, print
    python scripts/fit_memory_plan.py --from runs/memory-plan.jsonl  # fit and print only
    python scripts/fit_memory_plan.py --check tiny                   # the plan against new measurements

Each point builds a random-weight model of its shape (`scale_models.build`; `tiny` and
`smollm2-135m` from there, `wide`: a 1024-wide 8-block llama, `qwen-wide`: a 4-block qwen2 of
Qwen2.5-0.5B's widths and vocabulary), hands it to `trainer.setup` (as `bench_scale.py` does)
with the default GRPO recipe on bench_step's workload (prompts of 50 tokens with the embedded
tokenizer), and reads MLX's peak memory (`mx.get_peak_memory`, reset first) of:
- `teacher`, `update`: `trainer.learn` twice on a synthetic batch of P x G rows of exactly `L`
  tokens (`bench_scale.synthetic_batch`), the higher of the two calls (the second one runs with
  AdamW's moments and the teacher snapshot resident);
- `rollout`: then `trainer.sample` of the step's prompts: random weights never sample EOS, so
  every stream runs to the token cap.

The fit, in stages: the head's positions' worth of logits per position `u(L)` (`t(L)` for the
teacher) from the `tiny` points (a width-64 model: the head is nearly all of it), the per-token
constants by least squares (weighted by 1 / measured) on the other shapes, then again with the
head refitted; `ROLLOUT_LOGITS` from the rollouts. It prints the constants as the module's lines,
then a table of predicted against measured MiB per phase. Only what memory is measured: run it
while other work loads the CPU if needed (the peaks do not depend on the load).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_models as sm  # noqa: E402  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402

from cast_mlx.training import memory_laws as laws  # noqa: E402
from cast_mlx.training import memory_plan as mp  # noqa: E402
from cast_mlx.training import model_shape as ms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
SHAPES = {
    "tiny": sm.config("tiny"),
    "smollm2-135m": sm.config("smollm2-135m"),
    "wide": sm.config("tiny")
    | {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16,
       "num_key_value_heads": 4},
    "qwen-wide": sm.config("qwen2.5-0.5b") | {"num_hidden_layers": 4},
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Point:
    shape: str
    algorithm: str = "grpo"
    prompts: int = 1
    group: int = 4
    micro_batch: int = 4
    max_new: int = 64
    lora_layers: int = 8
    max_batch: int = 64
    phases: tuple = ("teacher", "update", "rollout")
    dtype: str = "float32"  # or 4bit: scale_models.build's 4-bit groups of 64, trained as QLoRA

    def sets(self) -> list[str]:
        return [
            f"algorithm.name={self.algorithm}",
            f"sampling.prompts_per_step={self.prompts}",
            f"sampling.group_size={self.group}",
            f"optimizer.micro_batch_size={self.micro_batch}",
            f"sampling.max_new_tokens={self.max_new}",
            f"lora.num_layers={self.lora_layers}",
            f"sampling.max_batch={self.max_batch}",
        ]


# The calibration points: the head's laws on `tiny` (one prompt, 2 rows a micro-batch, token caps
# 32..1536), the per-token constants on the other shapes (micro-batches of 2-8 rows, caps 64-256,
# LoRA on 1-16 blocks), the rollout's (waves of 4-16 streams) on all.
POINTS = [
    *(Point("tiny", "cast", 1, 2, 2, L, phases=("teacher", "update")) for L in (32, 64, 128, 256, 512, 768, 1024)),
    Point("tiny", "grpo", 1, 2, 2, 1536, phases=("update",)),
    Point("tiny", "cast", 2, 8, 8, 64),
    Point("tiny", "cast-verl", 2, 8, 4, 64, phases=("teacher", "update")),
    Point("tiny", "cast", 1, 4, 4, 64, phases=("teacher", "update"), dtype="4bit"),
    Point("tiny", "cast", 1, 2, 2, 128, phases=("teacher", "update"), dtype="4bit"),
    Point("smollm2-135m", "grpo", 1, 4, 4, 64, 4),
    Point("smollm2-135m", "grpo", 1, 4, 4, 64, 16),
    Point("smollm2-135m", "grpo", 1, 4, 4, 128, 8),
    Point("smollm2-135m", "cast", 2, 8, 8, 64, 8),
    Point("smollm2-135m", "cast", 4, 8, 4, 64, 16, max_batch=16),
    Point("smollm2-135m", "cast-verl", 2, 4, 4, 64, 8, phases=("teacher", "update")),
    Point("wide", "grpo", 1, 4, 4, 64, 2),
    Point("wide", "grpo", 1, 4, 4, 64, 6),
    Point("wide", "cast", 2, 4, 4, 64, 4),
    Point("wide", "grpo", 1, 2, 2, 128, 6),
    Point("qwen-wide", "grpo", 1, 2, 2, 64, 2),
    Point("qwen-wide", "cast", 1, 4, 4, 64, 2),
    Point("qwen-wide", "grpo", 1, 2, 2, 128, 2),
]


# --------------------------------------------------------------------------- measuring


@contextmanager
def random_setup(point: Point, workdir: Path, dtype: str = "float32"):
    """`trainer.setup` of the point's recipe with a random-weight model of its shape."""
    import bench_scale
    from bench_step import write_workload

    from cast_mlx import config as cfg
    from cast_mlx.training import trainer

    data = write_workload(workdir / "workload")
    base = ["data.task=custom", f"data.path={data}", "data.reward=lenient", "logging.eval_every=0", "loss.beta=0"]
    if dtype != "float32":
        base.append("model.dtype=quantized")
    recipe = cfg.load_recipe(ROOT / "recipes" / "smollm2-135m-arith-grpo.yaml", base + point.sets())
    gc.collect()
    mx.clear_cache()
    with bench_scale.random_model(SHAPES[point.shape], dtype, bench_scale.smol_tokenizer()):
        with trainer.setup(recipe, workdir / "run") as run:
            yield run


@contextmanager
def scoring_paths(cpu_paths: bool):
    """The laws are MLX's own allocations of the ops a Mac runs: no numpy passes, no packs, the
    head's backward recomputing its logits. `cpu_paths` turns the CPU's ways on, to check the
    plan against a CPU run's own allocations. The process's settings come back afterwards."""
    from cast_mlx.engine import head, hostmath, packed

    saved = hostmath.enabled, packed.enabled, head.KEEP_EXP
    hostmath.enabled = packed.enabled = cpu_paths
    head.KEEP_EXP = None if cpu_paths else False
    try:
        yield
    finally:
        hostmath.enabled, packed.enabled, head.KEEP_EXP = saved


def measure(point: Point, cpu_paths: bool = False) -> dict:
    """The point's measured peaks (MiB) with the plan's shape and workload, as one JSON-able
    row. `cpu_paths`: as a run on the CPU scores (numpy passes, the packed teacher), to check
    the plan against; the fit never takes such rows."""
    import bench_scale

    from cast_mlx.training import trainer

    start, dtype = time.perf_counter(), point.dtype
    row: dict = {"point": dataclasses.asdict(point), "dtype": dtype, "cpu_paths": cpu_paths}
    with scoring_paths(cpu_paths), tempfile.TemporaryDirectory() as tmp, random_setup(point, Path(tmp), dtype) as run:
        prompt, teacher = mp.longest_prompts(run.recipe, run.problems[: point.prompts], run.tokenizer)
        work = mp.workload(run.recipe, prompt, teacher)
        shape = ms.shape_of(SHAPES[point.shape] | {"torch_dtype": "bfloat16"})
        if dtype != "float32":  # what sm.build writes: 4 bits in groups of 64
            shape = dataclasses.replace(shape, quant=dict(sm.QUANT))
        row |= {"shape": dataclasses.asdict(shape), "work": dataclasses.asdict(work)}
        measured: dict = {"resident": mx.get_active_memory() / MiB}
        if {"teacher", "update"} & set(point.phases):
            traj, _ = bench_scale.synthetic_batch(run)
            calls: dict = {}
            with bench_scale.metered(calls):
                for _ in range(2):
                    gc.collect()
                    mx.clear_cache()
                    trainer.learn(run, traj)
            for phase in ("teacher", "update"):
                measured[phase] = max(peak for _, peak in calls[phase]) * 1024
            del traj
        gc.collect()
        mx.clear_cache()
        if "rollout" in point.phases:
            mx.reset_peak_memory()
            traj = trainer.sample(run, run.problems[: point.prompts])
            mx.eval(traj.rollout.tokens)
            measured["rollout"] = mx.get_peak_memory() / MiB
            del traj
    gc.collect()
    mx.clear_cache()
    row["measured"] = {k: round(v, 2) for k, v in measured.items()}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def measure_load(name: str = "smollm2-135m-instruct") -> dict:
    """`models.load`'s peak (MiB) for a model stored in another dtype than it runs in (the
    embedded 4-bit SmolLM2, dequantized to float32 on the CPU): a row for LOAD_EXTRA."""
    from cast_mlx.engine import models

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = models.load(name, dtype="float32")
    peak = mx.get_peak_memory() / MiB
    del model
    gc.collect()
    mx.clear_cache()
    config, _, _ = ms.model_config(name)
    return {"load": name, "shape": dataclasses.asdict(ms.shape_of(config)), "measured": {"load": round(peak, 2)}}


def fit_load(rows: list[dict]) -> float:
    extras = []
    for row in rows:
        if "load" in row:
            shape = ms.Shape(**row["shape"])
            stored, run = mp.weight_bytes(shape, "quantized"), mp.weight_bytes(shape, "float32")
            extras.append((row["measured"]["load"] * MiB - stored - run) / run)
    return round(float(np.median(extras)), 3) if extras else laws.LOAD_EXTRA


def predicted(row: dict) -> dict[str, float]:
    shape = ms.Shape(**row["shape"])
    return {k: v / MiB for k, v in mp.predict(shape, _work(row)).items()}


# --------------------------------------------------------------------------- fitting

CONSTANTS = (
    "UPDATE_HEAD", "TEACHER_HEAD", "UPDATE_H", "UPDATE_I", "UPDATE_T", "TEACHER_H", "TEACHER_I", "HEAD_QUANTIZED",
    "LOAD_EXTRA", "ROLLOUT_LOGITS",
)  # fmt: skip


@contextmanager
def constants(**values):
    saved = {k: getattr(laws, k) for k in values}
    for k, v in values.items():
        setattr(laws, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(laws, k, v)


def _work(row: dict) -> mp.Workload:
    return mp.Workload(**(row["work"] | {"keys": tuple(row["work"]["keys"])}))


def fit_head(rows: list[dict], phase: str, table: str) -> tuple:
    """The head's knots from the `tiny` rows: measured minus the rest, per [n, 1, V] logits."""
    knots: dict[int, list[float]] = {}
    zero = ((1, 0.0), (2, 0.0))
    for row in rows:
        if not _head_row(row) or phase not in row["measured"] or not _has_pass(row, phase):
            continue
        with constants(**{table: zero}):
            rest = predicted(row)[phase]
        n, length, vocab = (
            mp.pass_size(_work(row), phase == "teacher")[0],
            row["work"]["max_new"],
            row["shape"]["vocab"],
        )
        per = (row["measured"][phase] - rest) * MiB / (n * vocab * 4 * length)
        knots.setdefault(length, []).append(per)
    return tuple((length, round(float(np.mean(v)), 2)) for length, v in sorted(knots.items()))


def _head_row(row: dict) -> bool:
    return row["point"]["shape"] == "tiny" and row["dtype"] == "float32"


def fit_quantized_head(rows: list[dict]) -> float:
    """The quantized head's memory against the float32 head's (its bfloat16 logits are cast to
    float32, and its backward runs the head again through `mx.vjp`), from the 4-bit tiny rows."""
    ratios = []
    for row in rows:
        if row["point"]["shape"] != "tiny" or row["dtype"] == "float32":
            continue
        for phase in ("update", "teacher"):
            if phase in row["measured"] and _has_pass(row, phase):
                with constants(HEAD_QUANTIZED=0.0):
                    rest = predicted(row)[phase]
                with constants(HEAD_QUANTIZED=1.0):
                    head = predicted(row)[phase] - rest
                ratios.append((row["measured"][phase] - rest) / head)
    return round(float(np.median(ratios)), 2) if ratios else laws.HEAD_QUANTIZED


def _has_pass(row: dict, phase: str) -> bool:
    return phase == "update" or bool(row["work"]["teacher_tokens"] or row["work"]["reference"])


def fit_tokens(rows: list[dict], phase: str, names: tuple[str, ...]) -> dict[str, float]:
    """Least squares (weighted by 1 / measured) of the per-token constants on the other shapes."""
    a, y, wts = [], [], []
    zero = {name: 0.0 for name in names}
    for row in rows:
        if row["point"]["shape"] == "tiny" or row["dtype"] != "float32" or phase not in row["measured"]:
            continue
        if not _has_pass(row, phase):
            continue
        with constants(**zero):
            rest = predicted(row)[phase]
        s, w, b_a = row["shape"], row["work"], 4 if row["dtype"] == "float32" else 2
        tok_u, tok_t = mp.pass_size(_work(row), False)[1], mp.pass_size(_work(row), True)[1]
        k = s["layers"] if w["lora_layers"] < 0 else min(w["lora_layers"], s["layers"])
        if phase == "update":
            a.append([k * tok_u * s["hidden"] * b_a, k * tok_u * s["intermediate"] * b_a, tok_u * s["hidden"] * b_a])
        else:
            a.append([tok_t * s["hidden"] * b_a, tok_t * s["intermediate"] * b_a])
        y.append((row["measured"][phase] - rest) * MiB)
        wts.append(1.0 / (row["measured"][phase] * MiB))
    if not a:
        return {name: getattr(laws, name) for name in names}
    matrix, target, weight = np.array(a, float), np.array(y, float), np.array(wts)
    active = list(range(len(names)))
    while True:  # non-negative: drop a column whose coefficient comes out below 0 and refit
        coef = np.linalg.lstsq(matrix[:, active] * weight[:, None], target * weight, rcond=None)[0]
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    out = dict.fromkeys(names, 0.0)
    for i, c in zip(active, coef):
        out[names[i]] = round(float(max(c, 0.0)), 2)
    return out


def fit(rows: list[dict]) -> dict:
    values: dict = {"LOAD_EXTRA": fit_load(rows)}
    rows = [row for row in rows if "load" not in row and not row.get("cpu_paths")]  # MLX's own ops only
    for _ in range(3):  # the head and the per-token constants, each with the other's last fit
        with constants(**values):
            values["UPDATE_HEAD"] = fit_head(rows, "update", "UPDATE_HEAD") or laws.UPDATE_HEAD
            values["TEACHER_HEAD"] = fit_head(rows, "teacher", "TEACHER_HEAD") or laws.TEACHER_HEAD
        with constants(**values):
            values |= fit_tokens(rows, "update", ("UPDATE_H", "UPDATE_I", "UPDATE_T"))
            values |= fit_tokens(rows, "teacher", ("TEACHER_H", "TEACHER_I"))
    with constants(**values):
        values["HEAD_QUANTIZED"] = fit_quantized_head(rows)
    with constants(**values, ROLLOUT_LOGITS=0.0):
        spare = [
            (r["measured"]["rollout"] - predicted(r)["rollout"]) * MiB / _logits(r)
            for r in rows
            if "rollout" in r["measured"]
        ]
    values["ROLLOUT_LOGITS"] = round(float(np.median(spare)), 2) if spare else laws.ROLLOUT_LOGITS
    return values


def _logits(row: dict) -> float:
    w, s = row["work"], row["shape"]
    streams = min(w["prompts"], max(1, w["max_batch"] // w["group"])) * w["group"]
    return streams * s["vocab"] * 4


def report(rows: list[dict], values: dict) -> list[str]:
    lines = [
        f"UPDATE_HEAD = {values['UPDATE_HEAD']}",
        f"TEACHER_HEAD = {values['TEACHER_HEAD']}",
        f"UPDATE_H, UPDATE_I, UPDATE_T = {values['UPDATE_H']}, {values['UPDATE_I']}, {values['UPDATE_T']}",
        f"TEACHER_H, TEACHER_I = {values['TEACHER_H']}, {values['TEACHER_I']}",
        f"ROLLOUT_LOGITS = {values['ROLLOUT_LOGITS']}",
        f"HEAD_QUANTIZED = {values['HEAD_QUANTIZED']}",
        f"LOAD_EXTRA = {values['LOAD_EXTRA']}",
        "",
        "| shape | dtype | algorithm | P x G, micro-batch, tokens, LoRA layers, max_batch | phase | measured MiB | "
        "predicted MiB | error |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    worst = 0.0
    with constants(**values):
        for row in rows:
            if "load" in row:  # models.load of a model stored in another dtype
                shape = ms.Shape(**row["shape"])
                guess_load = mp.weight_bytes(shape, "quantized") + mp.weight_bytes(shape, "float32") * (
                    1 + laws.LOAD_EXTRA
                )
                got, err = row["measured"]["load"], guess_load / MiB / row["measured"]["load"] - 1
                guessed = f"{got:.1f} | {guess_load / MiB:.1f} | {err:+.1%}"
                lines.append(f"| {row['load']} | 4-bit to float32 | - | - | load | {guessed} |")
                worst = max(worst, abs(err))
                continue
            p, guess = row["point"], predicted(row)
            for phase in ("rollout", "teacher", "update"):
                if phase not in row["measured"]:
                    continue
                got = row["measured"][phase]
                err = guess[phase] / got - 1
                worst = max(worst, abs(err))
                lines.append(
                    f"| {p['shape']} | {row['dtype']} | {p['algorithm']} | {p['prompts']} x {p['group']}, "
                    f"{p['micro_batch']}, {p['max_new']}, {p['lora_layers']}, {p['max_batch']} | {phase} | {got:.1f} | "
                    f"{guess[phase]:.1f} | {err:+.1%} |"
                )
    lines.append(f"\nlargest error: {worst:.1%}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="append each measured row (JSON) to this file")
    ap.add_argument("--from", dest="source", type=Path, default=None, help="fit these rows; measure nothing")
    ap.add_argument("--check", nargs="*", default=None, help="measure these shapes' points; compare, no fit")
    ap.add_argument(
        "--cpu-paths", action="store_true", help="with --check: measure as a CPU run scores (numpy passes, packing)"
    )
    args = ap.parse_args(argv)
    if args.cpu_paths and args.check is None:
        ap.error("--cpu-paths: only with --check (the laws are fitted on MLX's own ops)")
    if args.source:
        rows = [json.loads(x) for x in args.source.read_text().splitlines() if x.strip()]
    else:
        points = [p for p in POINTS if args.check is None or not args.check or p.shape in args.check]
        rows = []
        for point in ["load"] * (args.check is None) + points:
            print(f"[fit_memory_plan] {point}", file=sys.stderr, flush=True)
            rows.append(measure_load() if point == "load" else measure(point, args.cpu_paths))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    current = {k: getattr(laws, k) for k in CONSTANTS}
    values = current if args.check is not None else fit(rows)
    print("\n".join(report(rows, values)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

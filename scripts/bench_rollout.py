"""Throughput of the rollout engine vs `mlx_lm.batch_generate`, same prompts, same process.

8 GSM8K test questions (or 8 fixed word problems when the data file is absent), chat-
templated, G = 8 completions each, 128 new tokens, temperature 1.0, the embedded SmolLM2
model in the default dtype (float32 on the CPU backend). The peer gets each prompt repeated
G times and decodes with the same batch size (`completion_batch_size = P*G`).

tokens/s = generated tokens (EOS included) / wall-clock seconds of the whole call, prefill
included. Peak memory is `mx.get_peak_memory()` after `mx.reset_peak_memory()` per engine;
`rss_mb` is the process's peak resident set (ru_maxrss), which only grows.

The machine may be shared: `--repeats N` runs both engines N times, alternating which goes
first, and reports each one's fastest run (default 1).

`--sampling-paths` also times the engine with sampling on the host (numpy, the CPU default)
and on the device (MLX ops, pipelined with `mx.async_eval`, the GPU default): the before and
after of the on-device path (same streams, same key).

Prints ONE JSON line. Usage: python scripts/bench_rollout.py [--prompts 8] [--group 8]
[--max-new 128] [--seed 0] [--repeats 1] [--skip-peer] [--sampling-paths]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cast_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402
from mlx_lm import batch_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from cast_mlx.engine import models, rollout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

FALLBACK_QUESTIONS = [
    "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
    "A train travels 60 km per hour for 2.5 hours. How far does it go?",
    "Sara buys 4 notebooks at $3 each and a pen for $2. How much does she spend?",
    "A class has 28 students; 3/4 of them passed a test. How many students passed?",
    "Mike reads 15 pages a day. How many days does he need for a 240-page book?",
    "A shop sells 120 cakes on Monday and twice as many on Tuesday. How many in total?",
    "Anna is 3 times as old as Ben, who is 7. How old will Anna be in 5 years?",
    "A rectangle is 9 cm long and 4 cm wide. What is its perimeter?",
]


def questions(n: int) -> list[str]:
    if GSM8K.exists():
        lines = GSM8K.read_text().splitlines()[:n]
        return [json.loads(line)["question"] for line in lines]
    return FALLBACK_QUESTIONS[:n]


def rss_mb() -> float:
    """Peak resident set of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_engine(model, prompts, group, max_new, eos, seed, on_device: bool | None = None) -> dict:
    mx.reset_peak_memory()
    params = rollout.SamplingParams(temperature=1.0, max_new_tokens=max_new, max_batch=len(prompts) * group)
    out = rollout.generate_groups(model, prompts, group, params, eos, key=seed, on_device=on_device)
    return {
        "tok_s": round(out.tokens_per_second, 2),
        "tokens": out.decode_tokens,
        "seconds": round(out.seconds, 2),
        "prefill_seconds": round(out.prefill_seconds, 2),
        "eos_finished": out.finish_reasons.count("eos"),
        "peak_mem_mb": round(mx.get_peak_memory() / 2**20, 1),
        "rss_mb": round(rss_mb(), 1),
    }


def run_peer(model, tokenizer, prompts, group, max_new, seed) -> dict:
    mx.reset_peak_memory()
    mx.random.seed(seed)
    repeated = [p for p in prompts for _ in range(group)]
    start = time.perf_counter()
    res = batch_generate(
        model,
        tokenizer,
        repeated,
        max_tokens=max_new,
        return_token_ids=True,
        sampler=make_sampler(temp=1.0),
        completion_batch_size=len(repeated),
    )
    seconds = time.perf_counter() - start
    tokens = res.stats.generation_tokens  # includes the EOS of stopped streams
    return {
        "tok_s": round(tokens / seconds, 2),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "prefill_seconds": round(res.stats.prompt_time, 2),
        "eos_finished": sum(len(ids) < max_new for ids in res.token_ids),
        "peak_mem_mb": round(mx.get_peak_memory() / 2**20, 1),
        "rss_mb": round(rss_mb(), 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument(
        "--sampling-paths", action="store_true",
        help="also time the engine with host (numpy) and on-device (MLX, pipelined) sampling, "
        "the before/after of the GPU path",
    )  # fmt: skip
    args = ap.parse_args(argv)

    model, tokenizer = models.load(models.DEFAULT_MODEL)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions(args.prompts)
    ]
    eos = set(tokenizer.eos_token_ids)
    # A short warm-up so neither side pays one-off costs (allocations, kernel set-up).
    rollout.generate_groups(model, prompts[:1], 2, rollout.SamplingParams(max_new_tokens=4), eos, key=0)

    ours, peers = [], []
    paths: dict[str, list] = {"host": [], "device": []} if args.sampling_paths else {}
    for i in range(max(1, args.repeats)):
        order = ["engine", "peer", *paths]
        for name in order if i % 2 == 0 else reversed(order):
            if name == "engine":
                ours.append(run_engine(model, prompts, args.group, args.max_new, eos, args.seed))
            elif name == "peer" and not args.skip_peer:
                peers.append(run_peer(model, tokenizer, prompts, args.group, args.max_new, args.seed))
            elif name in paths:
                on_device = name == "device"
                paths[name].append(run_engine(model, prompts, args.group, args.max_new, eos, args.seed, on_device))
    best = max(ours, key=lambda r: r["tok_s"])
    result = {
        "bench": "rollout",
        "device": str(mx.default_device()),
        "blas": cast_mlx.engine.blas.active_blas(),
        "threads": cast_mlx.engine.blas.thread_settings(),
        "prompts": len(prompts),
        "group": args.group,
        "max_new_tokens": args.max_new,
        "repeats": max(1, args.repeats),
        "prompt_tokens": [len(p) for p in prompts],
        "engine": best,
    }
    for name, runs in paths.items():
        result[f"sampling_{name}"] = max(runs, key=lambda r: r["tok_s"])
    if paths:
        result["device_vs_host_sampling"] = round(
            result["sampling_device"]["tok_s"] / result["sampling_host"]["tok_s"], 3
        )
    if peers:
        peer = max(peers, key=lambda r: r["tok_s"])
        result["batch_generate"] = peer
        result["speedup"] = round(best["tok_s"] / peer["tok_s"], 3) if peer["tok_s"] else None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

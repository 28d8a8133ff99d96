"""Greedy pass@1 of a model on the arithmetic task, per level (one JSON line per level).

Used to pick the default arithmetic level: the embedded SmolLM2-135M-Instruct should score
between 15% and 60% on it, so that GRPO/CAST groups are mixed (neither all right nor all
wrong) from the first step.

    python scripts/calibrate_arith.py                      # levels 1..5, 200 eval problems
    python scripts/calibrate_arith.py --levels 2 3 --n 100 --answer-format boxed
"""

from __future__ import annotations

import argparse
import json
import time

import cast_mlx  # noqa: F401  (loads the fast BLAS before mlx)
from cast_mlx.engine import models
from cast_mlx.tasks import data
from cast_mlx.tasks.verify import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--levels", type=int, nargs="+", default=list(data.ARITHMETIC_LEVELS))
    parser.add_argument("--n", type=int, default=200, help="eval problems per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--answer-format", choices=("hash", "boxed"), default="hash")
    parser.add_argument("--system-prompt", default=data.DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--show", type=int, default=0, help="print this many completions per level")
    args = parser.parse_args()

    from mlx_lm.generate import batch_generate  # greedy when no sampler is given

    model, tokenizer = models.load(args.model)
    for level in args.levels:
        problems = data.load_task("arithmetic", "eval", n=args.n, level=level, seed=args.seed)
        prompts = [
            tokenizer.encode(
                data.build_prompt(tokenizer, p, args.system_prompt, args.answer_format),
                add_special_tokens=False,
            )
            for p in problems
        ]
        start = time.perf_counter()
        response = batch_generate(
            model, tokenizer, prompts, max_tokens=args.max_tokens, completion_batch_size=args.batch_size
        )
        seconds = time.perf_counter() - start
        texts = response.texts
        verdicts = [verify(text, p.gold, args.answer_format) for text, p in zip(texts, problems)]
        for text, p, v in list(zip(texts, problems, verdicts))[: args.show]:
            print(f"--- {p.question} (gold {p.gold}; strict {v.strict}, lenient {v.lenient})")
            print(text)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "level": level,
                    "n": len(problems),
                    "answer_format": args.answer_format,
                    "max_tokens": args.max_tokens,
                    "strict": round(sum(v.strict for v in verdicts) / len(verdicts), 3),
                    "lenient": round(sum(v.lenient for v in verdicts) / len(verdicts), 3),
                    "seconds": round(seconds, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

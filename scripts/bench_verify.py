"""Verifier throughput: completions verified per second, cold and memoised (one JSON line).

2,000 mixed completions: half GSM8K-style (`####` answers, from the shared GSM8K test golds
when present, else generated), half MATH-style (`\\boxed{}` LaTeX answers in equivalent and
wrong forms). "cold" is a fresh Verifier (workers started beforehand, empty memo);
"memoised" verifies the same batch again.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from cast_mlx.tasks.verify import Verifier

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
# (gold, equivalent forms, wrong forms)
MATH_ANSWERS = [
    ("\\frac{1}{2}", ["0.5", "\\dfrac{1}{2}", "1/2"], ["\\frac{1}{3}", "2"]),
    ("\\frac{\\sqrt{2}}{2}", ["\\frac{1}{\\sqrt{2}}", "\\sqrt{2}/2"], ["\\sqrt{2}", "0.707"]),
    ("2\\sqrt{3}", ["\\sqrt{12}", "2 \\sqrt{3}"], ["3\\sqrt{2}", "\\sqrt{6}"]),
    ("(1, 2)", ["(1,2)", "\\left(1, 2\\right)"], ["(2, 1)", "(1, 3)"]),
    ("[0, 1)", ["[0,1)"], ["[0,1]", "(0,1)"]),
    ("x^2+2x+1", ["(x+1)^2", "1+2x+x^2"], ["(x-1)^2", "x^2+1"]),
    ("3+4i", ["4i+3"], ["3-4i", "5"]),
    ("\\frac{\\pi}{4}", ["\\pi/4", "0.25\\pi"], ["\\pi/2", "0.785"]),
    ("(-\\infty, 0) \\cup (1, \\infty)", ["(1,\\infty)\\cup(-\\infty,0)"], ["(-\\infty,1)"]),
    ("\\text{(C)}", ["C", "(C)"], ["(D)", "B"]),
]


def completions(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    if GSM8K.exists():
        golds = [
            json.loads(line)["answer"].split("####")[-1].strip().replace(",", "")
            for line in GSM8K.open(encoding="utf-8")
        ]
    else:
        golds = [str(rng.randint(1, 10_000)) for _ in range(1000)]
    items = []
    for i in range(n):
        if i % 2 == 0:
            gold = rng.choice(golds)
            answer = gold if rng.random() < 0.5 else str(rng.randint(1, 10_000))
            text = f"Step 1: think.\nStep 2: compute {rng.randint(1, 99)} + {rng.randint(1, 99)}.\n#### {answer}"
            items.append((text, gold, "hash"))
        else:
            gold, right, wrong = rng.choice(MATH_ANSWERS)
            answer = rng.choice(right if rng.random() < 0.5 else wrong)
            text = f"We simplify ... so the answer is $\\boxed{{{answer}}}$. (variant {i})"
            items.append((text, gold, "boxed"))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    items = completions(args.n)
    with Verifier(workers=args.workers, timeout=args.timeout) as verifier:
        verifier.verify("\\boxed{\\sqrt{8}/2}", "\\sqrt{2}", "boxed")  # start the workers
        verifier._memo.clear()
        start = time.perf_counter()
        verdicts = verifier.verify_batch(items)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        verifier.verify_batch(items)
        warm = time.perf_counter() - start
        timeouts = verifier.timeouts
    print(
        json.dumps(
            {
                "completions": len(items),
                "workers": args.workers,
                "cold_per_s": round(len(items) / cold, 1),
                "memoised_per_s": round(len(items) / warm, 1),
                "lenient_accuracy": round(sum(v.lenient for v in verdicts) / len(verdicts), 3),
                "timeouts": timeouts,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Worked arithmetic solutions for supervised fine-tuning with mlx-lm, before RL with cast-mlx.

    python scripts/make_sft_arith.py --recipe recipes/smollm2-135m-arith.yaml --out data/sft-arith --n 300
    mlx_lm.lora -c data/sft-arith/mlx_lm_lora.yaml        # or --train above, see below
    python -m cast_mlx.train --recipe recipes/smollm2-135m-arith.yaml \\
        --set model.adapter_path=data/sft-arith/adapters

writes `train.jsonl` / `valid.jsonl` in mlx-lm's chat format (the user turn is the prompt the
trainer builds, the assistant turn the generator's worked solution and `#### answer`) and
`mlx_lm_lora.yaml`: an `mlx_lm lora` config whose model, layers and LoRA shape (rank, scale,
keys) are the recipe's, so that `model.adapter_path` can start the RL run from its adapter.
Problems come from the task generator's train split, so none is in the held-out eval split.

`--train` runs mlx-lm's own trainer (`mlx_lm.lora`) on that config in this process: on Linux
the `mlx_lm.lora` command uses the stock wheel's reference BLAS, many times slower than the
MKL/OpenBLAS that importing cast_mlx loads first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cast_mlx import config as cfg  # noqa: E402
from cast_mlx.engine import models  # noqa: E402
from cast_mlx.tasks import data  # noqa: E402

BATCH = 4  # mlx-lm's batch size in the config


def sft_rows(problems: list, answer_format: str) -> list[dict]:
    """One mlx-lm chat row per problem: the trainer's user turn, then the worked answer."""
    rows = []
    for p in problems:
        answer = f"#### {p.gold}" if answer_format == "hash" else f"\\boxed{{{p.gold}}}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": data.user_message(p, answer_format)},
                    {"role": "assistant", "content": f"{p.solution}\n{answer}" if p.solution else answer},
                ]
            }
        )
    return rows


def mlx_lm_config(recipe: cfg.Recipe, model_dir: Path, data_dir: Path, iters: int) -> dict:
    lo = recipe.lora
    return {
        "model": str(model_dir),
        "train": True,
        "data": str(data_dir),
        "adapter_path": str(data_dir / "adapters"),
        "fine_tune_type": "lora",
        "num_layers": lo.num_layers,
        "lora_parameters": {"rank": lo.rank, "scale": lo.alpha / lo.rank, "dropout": lo.dropout, "keys": list(lo.keys)},
        "iters": iters,
        "batch_size": BATCH,
        "learning_rate": 1e-4,
        "mask_prompt": True,
        "steps_per_report": 10,
        "steps_per_eval": max(iters, 1),
        "val_batches": 1,
        "max_seq_length": 256,
        "seed": recipe.seed,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/make_sft_arith.py", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="recipes/smollm2-135m-arith.yaml")
    p.add_argument("--out", default="data/sft-arith")
    p.add_argument("--n", type=int, default=300, help="training rows (and n/10, at least 4, validation rows)")
    p.add_argument("--iters", type=int, default=100, help="mlx-lm training iterations in the config")
    p.add_argument("--train", action="store_true", help="then run mlx_lm.lora on it, in this process")
    args = p.parse_args(argv)
    try:
        recipe = cfg.load_recipe(args.recipe)
    except cfg.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if recipe.data.task != "arithmetic" or args.n < BATCH:
        print(f"error: the recipe must be an arithmetic one and --n >= {BATCH}", file=sys.stderr)
        return 2
    d = recipe.data
    n_valid = max(args.n // 10, BATCH)  # mlx-lm needs a full batch of validation rows
    problems = data.load_task("arithmetic", "train", n=args.n + n_valid, level=d.level, seed=recipe.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sft_rows(problems, d.answer_format)
    for name, part in (("train", rows[: args.n]), ("valid", rows[args.n :])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    model_dir = models.fetch(recipe.model.name) if recipe.model.name in models.EMBEDDED else Path(recipe.model.name)
    config = mlx_lm_config(recipe, Path(model_dir), out, args.iters)
    import yaml

    (out / "mlx_lm_lora.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.n} + {len(rows) - args.n} rows and mlx_lm_lora.yaml to {out}")
    if args.train:
        from mlx_lm import lora

        sys.argv = ["mlx_lm.lora", "-c", str(out / "mlx_lm_lora.yaml")]
        lora.main()
        print(f"adapter in {out / 'adapters'}: --set model.adapter_path={out / 'adapters'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

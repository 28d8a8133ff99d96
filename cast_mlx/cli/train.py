"""`python -m cast_mlx.train --recipe recipes/X.yaml [--set k=v ...] [--resume DIR] [--dry-run]`

Validates the recipe (before anything heavy is imported or loaded), prints the resolved
configuration, and trains (see `cast_mlx.training.trainer`). `--dry-run` instead loads the model
and greedily answers the first training problem, to check the set-up end to end.
`--resume RUN_DIR` continues a run from its latest checkpoint with the recipe stored there.

A run folder (`logging.out_dir`) belongs to one run: a folder that holds another run's
metrics or checkpoints is refused unless `--overwrite` is given, and one that another
process trains into right now (it holds the folder's `.lock`, see `training.run_lock`)
is refused always; rank 0 takes the lock before anything is written and releases it
however the command ends. Every input error that can be known before the model loads (the
recipe, the output folder, the data files) is reported before it loads, in one line with
exit 2; those that need the model (the context length, a checkpoint that does not fit it)
right after it loads, the same way.

Data parallel: `mlx.launch -n N -- python -m cast_mlx.train --recipe R` (or `--hosts a,b`,
`--hostfile hosts.json`) runs N processes that split each step's prompts; the recipe's
global batch stays the same (see `cast_mlx.engine.distributed`). Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from cast_mlx import config as cfg
from cast_mlx.errors import EXIT_DISK_FULL, EXIT_ERROR, EXIT_SIGNAL, EXIT_USAGE, DiskFullError, disk_full


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cast_mlx.train", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", help="recipe YAML (see recipes/); omitted: all defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set sampling.group_size=4 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="load the model and answer one problem")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in logging.out_dir (its metrics and checkpoints)",
    )
    p.add_argument("--no-dashboard", action="store_true", help="plain log lines instead of rich")
    p.add_argument("--quiet", action="store_true", help="do not print the resolved recipe")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved recipe and exit (no model is loaded)"
    )
    return p


def dry_run(recipe: cfg.Recipe) -> int:
    """Load the model, build the first training prompt, generate greedily, verify."""
    import mlx_lm

    from cast_mlx.engine import blas, models
    from cast_mlx.tasks import data, verify
    from cast_mlx.training import preflight

    t0 = time.perf_counter()
    model, tokenizer = models.load(recipe.model.name, dtype=recipe.model.dtype)
    t_load = time.perf_counter() - t0
    problem = preflight.task_problems(recipe, "train")[0]
    prompt = data.build_prompt(tokenizer, problem, recipe.data.system_prompt, recipe.data.answer_format)
    t1 = time.perf_counter()
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=recipe.sampling.max_new_tokens)
    t_gen = time.perf_counter() - t1
    verdict = (
        None if recipe.data.answer_format == "none" else verify.verify(answer, problem.gold, recipe.data.answer_format)
    )
    print(f"blas: {blas.active_blas()}")
    print(f"model: {recipe.model.name} (dtype {models.resolve_dtype(recipe.model.dtype)}), loaded in {t_load:.1f}s")
    print(f"problem: {problem.question}")
    print(f"gold: {problem.gold}")
    print(f"answer ({t_gen:.1f}s): {answer}")
    if verdict is None:
        print("verdict: gold answer unparseable")
    else:
        print(f"verdict: strict={verdict.strict} lenient={verdict.lenient} pred={verdict.pred!r}")
    return 0


def _resume_recipe(args) -> tuple[cfg.Recipe, Path]:
    from cast_mlx.training.checkpoint import TrainingError, find_checkpoint

    try:
        ckpt = find_checkpoint(args.resume, warn=lambda text: print(text, file=sys.stderr))
    except TrainingError as exc:
        raise cfg.ConfigError(str(exc)) from exc
    recipe = cfg.load_recipe(ckpt / "recipe.yaml", args.overrides)
    if args.recipe is not None:
        given = cfg.load_recipe(args.recipe, args.overrides)
        if cfg.recipe_hash(given) != cfg.recipe_hash(recipe):
            fields = differing_fields(cfg.to_dict(recipe), cfg.to_dict(given))
            raise cfg.ConfigError(
                f"--resume {args.resume}: the checkpoint's recipe differs from {args.recipe} in "
                f"{', '.join(fields[:5])}{' ...' if len(fields) > 5 else ''}; resume without --recipe to use the "
                "stored one"
            )
    return recipe, Path(ckpt)


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields whose values differ between two recipe dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differing_fields(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k} ({x!r} vs {y!r})")
    return out


def check_out_dir(out_dir: Path, fresh: bool, overwrite: bool) -> None:
    """The run folder must be usable before the model loads: a folder (or creatable as
    one), writable, and, for a fresh run, not holding another run unless `overwrite`."""
    from cast_mlx.training.checkpoint import run_artifacts

    if out_dir.exists() and not out_dir.is_dir():
        raise cfg.ConfigError(f"logging.out_dir: {out_dir} is a file, not a folder")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise cfg.ConfigError(f"logging.out_dir: {out_dir} cannot be written ({existing} is not a writable folder)")
    if fresh and not overwrite:
        found = run_artifacts(out_dir) if out_dir.is_dir() else []
        if found:
            raise cfg.ConfigError(
                f"logging.out_dir: {out_dir} already holds a run ({', '.join(p.name for p in found)}); "
                f"continue it with --resume {out_dir}, replace it with --overwrite, or set another logging.out_dir"
            )


def header(recipe: cfg.Recipe, ckpt) -> list[str]:
    """What this run is, in a few lines (the whole recipe: --print-config)."""
    import mlx.core as mx

    from cast_mlx.algorithm.facts import facts_of
    from cast_mlx.engine import blas

    d = recipe.data
    source = f"level {d.level}" if d.task == "arithmetic" else (d.path or d.hub_id or "the hub")
    out = ckpt.parent.parent if ckpt is not None else cfg.out_dir(recipe)
    changed = [f.split(" (")[0] for f in differing_fields(cfg.to_dict(cfg.from_dict({})), cfg.to_dict(recipe))]
    label = cfg.run_label(recipe)
    return [
        *([f"{cfg.ORACLE_LABEL.upper()}: its teacher sees the gold answer; a diagnostic bound"] if label else []),
        f"cast-mlx: {recipe.model.name} ({recipe.model.dtype}) on {d.task} ({source}), {recipe.algorithm.name}, "
        f"{recipe.schedule.steps} steps -> {out}",
        f"  {recipe.algorithm.name}: {facts_of(recipe.algorithm.name).summary}",
        f"  backend {mx.default_device()}, BLAS {blas.active_blas()}",
        f"  set in the recipe: {', '.join(changed) if changed else 'nothing (all defaults)'} "
        "(the whole recipe: --print-config)",
    ]


def checkpoint_step(ckpt: Path) -> int:
    import json

    return int(json.loads((ckpt / "state.json").read_text())["step"])


def take_out_dir(lock, out_dir: Path, fresh: bool, overwrite: bool, world) -> None:
    """Rank 0 (the only one that writes; `lock` is None on the others) takes the run
    folder's lock, then checks the folder again under it: a run that ended between
    `check_out_dir` and now left its files there. Every rank raises the same ConfigError
    when rank 0 cannot have the folder (only rank 0's message says why); the caller
    releases the lock however the command ends."""
    from cast_mlx.engine import distributed as dist

    error = None
    if lock is not None:
        try:
            lock.acquire(warn=lambda text: print(text, file=sys.stderr))
            check_out_dir(out_dir, fresh=fresh, overwrite=overwrite)
        except cfg.ConfigError as exc:
            error = exc
    if dist.max_int(world, int(error is not None), "taking the run folder"):
        raise error or cfg.ConfigError("logging.out_dir: rank 0 could not have the run folder")


class StartupSignals:
    """Until the loop takes over (it stops between steps), SIGINT and SIGTERM interrupt the
    start-up at once: nothing has been written then, so there is nothing to save. SIGINT gets
    this handler too, not Python's default one: a process started in the background by a
    shell inherits SIGINT ignored, and Python then installs no handler for it."""

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt(signum)

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def check_world(recipe: cfg.Recipe, ckpt, world) -> None:
    """The checks that need the number of processes: the shard rule, the same recipe on
    every rank, and a resume with as many processes as the checkpoint had. Raises
    ConfigError (the same decision on every rank) or PeerLost."""
    from cast_mlx.engine import distributed as dist
    from cast_mlx.training.checkpoint import TrainingError, check_world_size

    world.timeout = dist.recipe_timeout(recipe)
    dist.check_recipe(recipe, world.size)
    if ckpt is not None:
        try:
            check_world_size(ckpt, world.size)
        except TrainingError as exc:
            raise cfg.ConfigError(str(exc)) from exc
    if not dist.same_everywhere(world, cfg.recipe_hash(recipe)):
        raise cfg.ConfigError(
            "the processes resolved different recipes (their hashes differ); give every "
            "host the same recipe file, --set options and checkpoint"
        )


def train(recipe: cfg.Recipe, ckpt, live: bool, world) -> int:
    from cast_mlx.engine import distributed as dist
    from cast_mlx.engine.models import ModelCacheError, ModelLoadError
    from cast_mlx.training import trainer
    from cast_mlx.training.checkpoint import CheckpointError

    out_dir = ckpt.parent.parent if ckpt is not None else None
    try:
        with trainer.setup(recipe, out_dir=out_dir, world=world) as run:
            if ckpt is not None:
                trainer.resume(run, ckpt)
            return trainer.fit(run, live=live, resumed_from=ckpt)
    except DiskFullError as exc:  # rank 0's run files; the model cache of any rank (it says which)
        if world.is_main or isinstance(exc, ModelLoadError):
            where = f"rank {world.rank}: " if world.size > 1 and isinstance(exc, ModelLoadError) else ""
            print(f"error: {where}{exc}", file=sys.stderr)
        return EXIT_DISK_FULL
    except (cfg.ConfigError, CheckpointError, ModelCacheError) as exc:  # input errors found at load time
        if world.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except trainer.TrainingError as exc:  # the same on every rank: rank 0 says it
        if world.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ModelLoadError, dist.PeerLost) as exc:  # rank-specific: every rank says it
        where = f"rank {world.rank}: " if world.size > 1 and not isinstance(exc, dist.PeerLost) else ""
        print(f"error: {where}{exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with StartupSignals():
            return run_cli(args)
    except KeyboardInterrupt as exc:  # before the loop, which handles its own signals
        signum = exc.args[0] if exc.args else signal.SIGINT
        print(f"interrupted during start-up ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
        return EXIT_SIGNAL.get(signal.Signals(signum).name, EXIT_SIGNAL["SIGINT"])


def run_cli(args) -> int:
    ckpt = None
    try:
        if args.resume:
            recipe, ckpt = _resume_recipe(args)
        else:
            recipe = cfg.load_recipe(args.recipe, args.overrides)
        if not (args.print_config or args.dry_run):
            out_dir = ckpt.parent.parent if ckpt is not None else cfg.out_dir(recipe)
            check_out_dir(Path(out_dir), fresh=ckpt is None, overwrite=args.overwrite)
            from cast_mlx.training.preflight import check_memory_limit

            check_memory_limit(recipe)
    except cfg.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    world = None
    if not (args.print_config or args.dry_run):
        from cast_mlx.engine import distributed as dist

        try:
            world = dist.init_world()  # a world of one unless launched by mlx.launch
            check_world(recipe, ckpt, world)
        except cfg.ConfigError as exc:  # every rank decides the same: one of them says it
            if world is None or world.is_main:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except dist.PeerLost as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        from cast_mlx.training.run_lock import RunLock

        run_dir = Path(ckpt.parent.parent if ckpt is not None else cfg.out_dir(recipe))
        lock = RunLock(run_dir) if world.is_main else None
        try:  # the lock is held until this process is done with the folder, however that ends
            try:
                take_out_dir(lock, run_dir, fresh=ckpt is None, overwrite=args.overwrite, world=world)
            except cfg.ConfigError as exc:
                if world.is_main:
                    print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            except dist.PeerLost as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_ERROR
            except OSError as exc:  # the lock file cannot be written: the disk may be full
                full = disk_full(exc, run_dir, "the run lock in")
                if full is None:
                    raise
                print(f"error: {full}", file=sys.stderr)
                return EXIT_DISK_FULL
            return locked_cli(args, recipe, ckpt, world)
        finally:
            if lock is not None:
                lock.release()
    return locked_cli(args, recipe, ckpt, world)


def locked_cli(args, recipe: cfg.Recipe, ckpt, world) -> int:
    """The rest of the command once the run folder is this process's (`--print-config` and
    `--dry-run`, which write nothing, come here without the lock and without a world)."""
    done = checkpoint_step(ckpt) if world is not None and ckpt is not None else None
    if world is not None and done is not None and done >= recipe.schedule.steps:
        if world.is_main:
            print(
                f"nothing to do: {ckpt} is at step {done} and schedule.steps is "
                f"{recipe.schedule.steps}; raise it with --set schedule.steps=N to train further"
            )
        return 0
    if args.print_config:
        print(cfg.to_yaml(recipe).rstrip())
        print(f"# recipe hash: {cfg.recipe_hash(recipe)}")
        return 0
    if not args.quiet and (world is None or world.is_main):
        for line in header(recipe, ckpt):
            print(line)
        print(f"# recipe hash: {cfg.recipe_hash(recipe)}")
    if args.dry_run:
        from cast_mlx.engine.models import ModelLoadError

        try:
            return dry_run(recipe)
        except (ModelLoadError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DISK_FULL if isinstance(exc, DiskFullError) else EXIT_ERROR
    return train(recipe, ckpt, live=not args.no_dashboard, world=world)


if __name__ == "__main__":
    sys.exit(main())

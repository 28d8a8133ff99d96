"""`python -m cast_mlx.publish RUN --repo NAME`: a run's adapter on the Hugging Face Hub, as an
mlx-lm adapter folder (adapters.safetensors, adapter_config.json, the recipe) with its model
card (`cast_mlx.training.model_card`). TRL's `push_to_hub`; mlx-lm's `mlx_lm.fuse
--upload-repo` uploads a fused model instead."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from cast_mlx import config as cfg
from cast_mlx.cli import OneLineParser
from cast_mlx.engine import models
from cast_mlx.errors import EXIT_ERROR, EXIT_USAGE, TrainingError, UsageError
from cast_mlx.training import checkpoint as ckpt_io
from cast_mlx.training import model_card

FILES = (models.ADAPTER_WEIGHTS, models.ADAPTER_CONFIG, model_card.RECIPE)  # besides the card


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


def choose_checkpoint(run_dir: Path, which: str | None) -> Path:
    """The checkpoint to publish: `best`, `latest` (the newest complete one), a checkpoint
    folder (or its name under RUN/checkpoints), or by default the best one when the run has
    one, else the latest. UsageError naming what is wrong."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    if which in (None, "best"):
        best = ckpt_io.best_checkpoint(run_dir)
        if best is not None:
            ckpt = best
        elif which == "best":
            raise UsageError(f"--checkpoint best: {run_dir} has no best checkpoint (a run without evals)")
        else:
            which = "latest"
    if which == "latest":
        try:
            return ckpt_io.find_checkpoint(run_dir, warn=_warn)
        except TrainingError:
            raise UsageError(f"{run_dir}: no complete checkpoint under {ckpt_io.checkpoint_root(run_dir)}") from None
    if which is not None:
        ckpt = Path(which)
        if not ckpt.is_dir() and (ckpt_io.checkpoint_root(run_dir) / which).is_dir():
            ckpt = ckpt_io.checkpoint_root(run_dir) / which
        if not ckpt.is_dir():
            raise UsageError(f"--checkpoint {which}: no such checkpoint folder")
    why = ckpt_io.unreadable(ckpt)
    if why is not None:
        raise UsageError(f"{ckpt}: not a complete checkpoint ({why})")
    return ckpt


def check_adapter(ckpt: Path) -> None:
    """UsageError unless mlx-lm can load the checkpoint's adapter config."""
    try:
        why = ckpt_io.adapter_config_problem(ckpt_io.read_json(ckpt / models.ADAPTER_CONFIG))
    except (OSError, ValueError) as exc:
        why = str(exc)
    if why is not None:
        raise UsageError(f"{ckpt}: {why}")


def adapter_folder(run_dir: Path, ckpt: Path, out: Path, repo: str | None = None) -> Path:
    """`out` made an mlx-lm adapter folder: the checkpoint's adapters, adapter config and
    recipe, and the model card (its commands download `repo`)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(ckpt / name, out / name)
    (out / model_card.CARD).write_text(model_card.render_card(run_dir, ckpt, repo))
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def main(argv=None) -> int:
    p = OneLineParser(
        prog="python -m cast_mlx.publish",
        description="Upload a run's adapter, with its model card, to the Hugging Face Hub as an mlx-lm adapter folder.",
    )
    p.add_argument("run_dir", metavar="RUN", help="the run folder")
    p.add_argument("--repo", required=True, help="the model repository: NAME (under your user) or OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="best, latest or a checkpoint folder (default: best when the run has one, else latest)",
    )
    args = p.parse_args(argv)
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    run_dir = Path(args.run_dir)
    try:
        try:
            validate_repo_id(args.repo)
        except HFValidationError as exc:
            raise UsageError(f"--repo {args.repo}: {str(exc).splitlines()[0]}") from None
        ckpt = choose_checkpoint(run_dir, args.checkpoint)
        check_adapter(ckpt)
        try:  # the card renders (its recipe parses) before anything is created on the Hub
            model_card.render_card(run_dir, ckpt)
        except (cfg.ConfigError, OSError, ValueError) as exc:
            raise UsageError(f"{ckpt / model_card.RECIPE}: {_one_line(exc)}") from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a run folder that cannot be read
        print(f"error: {run_dir}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if huggingface_hub.get_token() is None:
        print("error: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN", file=sys.stderr)
        return EXIT_ERROR
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(args.repo, private=args.private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or args.repo
        with tempfile.TemporaryDirectory(prefix="cast-mlx-publish-") as tmp:
            folder = adapter_folder(run_dir, ckpt, Path(tmp) / "adapter", repo_id)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                repo_type="model",
                commit_message=f"cast-mlx: {ckpt.name} of {run_dir.name}",
            )
    except Exception as exc:  # noqa: BLE001 - the Hub's errors (auth, network, quota) as one line
        print(f"error: the Hub: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    print(f"published {ckpt} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command-line entry points over the library: `train`, `eval`, `diagnose`, `report`,
`plot`, `models`, `publish` (each `python -m cast_mlx.X`, or `cast-mlx X`), the one parser helper they
share, and the `cast-mlx` dispatcher. Exit codes: `cast_mlx.errors`."""

from __future__ import annotations

import argparse
import sys

from cast_mlx.errors import EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`error: ...`) and exit status
    `EXIT_USAGE`, instead of the usage block (every command, and scripts/compare.py)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


COMMANDS = {
    "train": ("cast_mlx.train", "train (or --dry-run) from a recipe"),
    "eval": ("cast_mlx.eval", "evaluate a model (and adapter) on a task"),
    "plot": ("cast_mlx.plot", "learning curves of one or more runs"),
    "diagnose": ("cast_mlx.diagnose", "will CAST's teacher help here? (gap diagnostics)"),
    "report": ("cast_mlx.report", "an HTML page about one run"),
    "models": ("cast_mlx.models", "fetch / list embedded models"),
    "publish": ("cast_mlx.publish", "upload a run's adapter with its model card to the Hugging Face Hub"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fetch":  # shorthand for `cast-mlx models fetch`
        argv = ["models"] + argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: cast-mlx COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

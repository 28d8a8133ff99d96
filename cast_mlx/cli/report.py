"""`python -m cast_mlx.report`: one self-contained HTML page about one training run, from its folder's files only."""

from __future__ import annotations

import sys
from pathlib import Path

from cast_mlx.cli import OneLineParser
from cast_mlx.errors import EXIT_USAGE
from cast_mlx.training.plot import PlotError
from cast_mlx.training.report import REPORT, write_report


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


def main(argv=None) -> int:
    p = OneLineParser(
        prog="python -m cast_mlx.report",
        description="One self-contained HTML page about one training run, from its folder's files only.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help=f"HTML file (default: RUN_DIR/{REPORT})")
    p.add_argument("--samples-per-step", type=int, default=2, help="completions shown per step (default 2)")
    args = p.parse_args(argv)
    if args.samples_per_step < 0:
        print("error: --samples-per-step must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = write_report(Path(args.run_dir), Path(args.out) if args.out else None, args.samples_per_step, warn=_warn)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: cannot write the report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

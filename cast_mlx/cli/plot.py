"""`python -m cast_mlx.plot`: learning curves of one or more training runs, side by side in one PNG."""

from __future__ import annotations

import sys

from cast_mlx.cli import OneLineParser
from cast_mlx.errors import EXIT_USAGE
from cast_mlx.training.plot import PlotError, plot_runs


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


def main(argv=None) -> int:
    p = OneLineParser(
        prog="python -m cast_mlx.plot",
        description="Learning curves of one or more training runs, side by side in one PNG.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", default="curves.png", help="PNG file (default: curves.png)")
    p.add_argument("--width", type=float, default=12.0, help="inches (default 12)")
    p.add_argument("--height", type=float, default=8.0, help="inches (default 8)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")
    args = p.parse_args(argv)
    if args.width <= 0 or args.height <= 0 or args.dpi <= 0:
        print("error: --width, --height and --dpi must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = plot_runs(args.run_dirs, args.out, args.width, args.height, args.dpi, warn=_warn)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

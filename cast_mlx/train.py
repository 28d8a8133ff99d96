"""`python -m cast_mlx.train`: the command's stable name; the command lives in `cast_mlx.cli.train`."""

import sys

from cast_mlx.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

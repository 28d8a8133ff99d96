"""`python -m cast_mlx.eval`: the command's stable name; the command lives in `cast_mlx.cli.eval`."""

import sys

from cast_mlx.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())

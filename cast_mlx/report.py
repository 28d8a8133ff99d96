"""`python -m cast_mlx.report`: the command's stable name; the command lives in `cast_mlx.cli.report`."""

import sys

from cast_mlx.cli.report import main

if __name__ == "__main__":
    sys.exit(main())

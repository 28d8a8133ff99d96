"""`python -m cast_mlx.report`: the command's stable name; the command lives in `cast_mlx.training.report`."""

import sys

from cast_mlx.training.report import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m cast_mlx.eval`: the command's stable name; the command lives in `cast_mlx.training.evaluation`."""

import sys

from cast_mlx.training.evaluation import main

if __name__ == "__main__":
    sys.exit(main())

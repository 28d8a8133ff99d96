"""`python -m cast_mlx.diagnose`: the command's stable name; the command lives in `cast_mlx.training.diagnose`."""

import sys

from cast_mlx.training.diagnose import main

if __name__ == "__main__":
    sys.exit(main())

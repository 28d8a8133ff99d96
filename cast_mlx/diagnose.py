"""`python -m cast_mlx.diagnose`: the command's stable name; the command lives in `cast_mlx.cli.diagnose`."""

import sys

from cast_mlx.cli.diagnose import main

if __name__ == "__main__":
    sys.exit(main())

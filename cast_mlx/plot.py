"""`python -m cast_mlx.plot`: the command's stable name; the command lives in `cast_mlx.cli.plot`."""

import sys

from cast_mlx.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m cast_mlx.models`: the command's stable name; the command lives in `cast_mlx.cli.models`."""

import sys

from cast_mlx.cli.models import main

if __name__ == "__main__":
    sys.exit(main())

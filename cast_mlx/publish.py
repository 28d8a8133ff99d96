"""`python -m cast_mlx.publish`: the command's stable name; the command lives in `cast_mlx.cli.publish`."""

import sys

from cast_mlx.cli.publish import main

if __name__ == "__main__":
    sys.exit(main())

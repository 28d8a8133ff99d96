"""`python -m cast_mlx.cli`: the same as the `cast-mlx` console script."""

import sys

from cast_mlx.cli import main

sys.exit(main())

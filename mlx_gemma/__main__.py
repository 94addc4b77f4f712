"""`python -m mlx_gemma` is the `mlx-gemma` command."""

import sys

from .cli import main

sys.exit(main())

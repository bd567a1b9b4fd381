"""``python -m rome_jax.cli``: the same as ``rome-jax``."""

import sys

from rome_jax.cli import main

sys.exit(main())

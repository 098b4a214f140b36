import sys

from kdd_jax.cli import main

sys.exit(main())

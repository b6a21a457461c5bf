"""``python -m lightning_seng.sweep``: W&B sweep files run offline, :mod:`lightning_seng.recipes.sweep`."""

import sys

from lightning_seng.recipes.sweep import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m lightning_seng.train``: the recipe application's Hydra entry point, :mod:`lightning_seng.recipes.train`."""

from lightning_seng.recipes.train import main

if __name__ == "__main__":
    main()

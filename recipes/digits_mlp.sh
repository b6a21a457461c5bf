#!/usr/bin/env bash
# Main job: MLP on scikit-learn's digits, SENG+SGD vs SGD: one table (test metrics, ms/step and their ratio), val_curves.png.
# Extra arguments are Hydra overrides, e.g.  ./recipes/digits_mlp.sh seng.damping=0.3 trainer.max_epochs=20
set -euo pipefail
exec python -m lightning_seng.train recipe=digits_mlp "$@"

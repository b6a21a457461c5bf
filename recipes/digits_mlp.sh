#!/usr/bin/env bash
# Main job: MLP on scikit-learn's digits, SENG+SGD vs SGD, test accuracy side by side (CPU, about a minute).
# Extra arguments are Hydra overrides, e.g.  ./recipes/digits_mlp.sh seng.damping=0.3 trainer.max_epochs=20
set -euo pipefail
exec python -m lightning_seng.train recipe=digits_mlp "$@"

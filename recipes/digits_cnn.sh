#!/usr/bin/env bash
# Small CNN on digits upsampled to 16x16, SENG+SGD vs SGD (CPU, about a minute).
set -euo pipefail
exec python -m lightning_seng.train recipe=digits_cnn "$@"

#!/usr/bin/env bash
# ResNet-18 on CIFAR-10 from a local directory of python-pickle batches (one GPU node).
#   ./recipes/cifar10_resnet18.sh /data/cifar-10-batches-py [overrides...]
set -euo pipefail
root="${1:?usage: $0 /path/to/cifar-10-batches-py [hydra overrides...]}"
shift
exec python -m lightning_seng.train recipe=cifar10_resnet18 data.root="$root" "$@"

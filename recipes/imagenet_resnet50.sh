#!/usr/bin/env bash
# ResNet-50 on ImageNet-1k from a local ImageFolder tree root/{train,val}/<class>/<image> (GPU node / cluster).
#   ./recipes/imagenet_resnet50.sh /data/imagenet [overrides...]
# Several nodes: add trainer.num_nodes=N and start one process per node with your launcher (e.g. srun).
set -euo pipefail
root="${1:?usage: $0 /path/to/imagenet [hydra overrides...]}"
shift
exec python -m lightning_seng.train recipe=imagenet_resnet50 data.root="$root" "$@"

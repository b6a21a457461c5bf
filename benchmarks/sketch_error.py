"""How far each sketch setting moves SENG's direction from the exact one, on a ResNet-18 at quarter width.

ResNet-18's layout (3x3 stem, two basic blocks per stage, widths 16-32-64-128; ``benchmarks/overhead.py``) on
generated 32x32 images with random labels, batch 256 by default, damping 2.0 (the authors' CIFAR value), BatchNorm
in training mode. One forward and backward gives the gradient; for every setting a fresh ``SENG`` refreshes on that
batch and rewrites the gradient (step 0 is a refresh step), and the distance ``‖d − d_exact‖ / ‖d_exact‖`` is taken
over all parameters. Sampled settings are repeated for ``--draws`` sketch seeds (``SENG(seed=...)``); the table gives
the mean, the smallest and the largest distance, and the refresh step's time.

Settings: ours (``route="auto"``, ``sketch_size`` sampling that many coordinates on the explicit route and rows on
the implicit route, Gram-route layers exact) and the SENG authors' (``route="threshold"``: implicit above
``implicit_threshold`` parameters, explicit ``U`` below; ``column_sample_size = s``: ``s²`` coordinates on explicit
layers, ``s`` rows of ``Ĝ`` and ``X̂`` on implicit layers, for ``UUᵀ`` and ``U g``). At quarter width no layer has
700 000 parameters, so the authors' rule is also run with the threshold divided by 16 (the width squared), which
sends the layers that are implicit at full width (layer4's 3x3 convolutions) to the implicit route.

    python benchmarks/sketch_error.py                  # table on stdout, CSV in benchmarks/results/sketch_error
    python benchmarks/sketch_error.py --batch 64 --draws 2
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.overhead import _resnet18_quarter  # noqa: E402
from lightning_seng import SENG  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sketch_error"

# (label, SENG keyword arguments, sampled?)
SETTINGS = [
    ("ours sketch_size=128", dict(sketch_size=128), True),
    ("ours sketch_size=256", dict(sketch_size=256), True),
    ("ours sketch_size=65536", dict(sketch_size=65536), True),
    ("authors s=128", dict(route="threshold", column_sample_size=128), True),
    ("authors s=256", dict(route="threshold", column_sample_size=256), True),
    ("authors s=256, threshold/16", dict(route="threshold", column_sample_size=256, implicit_threshold=43_750),
     True),
    ("authors rule, exact (no sampling)", dict(route="threshold", implicit_threshold=43_750), False),
]


def direction(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float, **kwargs) -> tuple:
    """SENG's direction on one refresh step, flattened over all parameters, its routes and the step's seconds."""
    model = copy.deepcopy(model)
    seng = SENG(model, damping=damping, update_freq=1, **kwargs)
    t0 = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    seng.step()
    seconds = time.perf_counter() - t0
    routes = sorted({f"{layer.curvature.route.name}" for layer in seng.layers.values()
                     if layer.curvature is not None and layer.curvature.route is not None})
    out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    seng.remove()
    return out, routes, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--draws", type=int, default=5, help="sketch seeds per sampled setting")
    parser.add_argument("--damping", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _resnet18_quarter()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    exact, routes, seconds = direction(model, x, y, args.damping)
    print(f"resnet18/4, batch {args.batch}, damping {args.damping}: exact refresh {seconds:.2f} s ({'/'.join(routes)})",
          flush=True)
    rows = []
    print(f"{'setting':36} {'mean %':>8} {'min %':>7} {'max %':>7} {'refresh s':>9}  routes")
    for label, kwargs, sampled in SETTINGS:
        distances, times = [], []
        for seed in range(args.draws if sampled else 1):
            d, routes, seconds = direction(model, x, y, args.damping, seed=seed, **kwargs)
            distances.append(100 * ((d - exact).norm() / exact.norm()).item())
            times.append(seconds)
            rows.append(dict(setting=label, seed=seed, distance_percent=distances[-1], refresh_s=seconds,
                             routes="/".join(routes)))
        print(f"{label:36} {statistics.mean(distances):>8.3f} {min(distances):>7.3f} {max(distances):>7.3f} "
              f"{statistics.median(times):>9.2f}  {'/'.join(routes)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sketch_error.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'sketch_error.csv'}")


if __name__ == "__main__":
    main()

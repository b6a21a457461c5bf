"""DDP scaling of SENG on CPU: step time and bytes communicated, for 1 and 2 processes, per mode.

Every configuration runs ``--steps`` training steps of a DistributedDataParallel model (gloo) with
``--batch-size`` samples per process (weak scaling: the global batch grows with the processes) and
reports, from rank 0:

- step time: median wall time of a step (forward, backward with DDP's gradient all-reduce,
  ``seng.step()``, ``optimizer.step()``), separately for curvature-refresh steps and the others;
- SENG traffic: bytes rank 0 received from other ranks in SENG's own collectives, per refresh
  step and per other step (logical payload, see ``ProcessGroupComm``), and the collectives per step;
- the gradient all-reduce of DDP itself (the parameters' bytes) for comparison.

The ``sgd`` rows are plain DDP without SENG.

    python benchmarks/ddp_scaling.py                           # MLP, 1 and 2 processes, all modes
    python benchmarks/ddp_scaling.py --model cnn --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_seng import SENG
from lightning_seng.distributed import SENG_MODES, make_comm
from lightning_seng.recipes.models import MLP, SmallCNN

MODES = ("sgd",) + SENG_MODES
WARMUP_STEPS = 2


def make_model(name: str):
    """The model and its input shape (without the batch dimension)."""
    if name == "mlp":
        return MLP(784, 10, hidden=(512, 512)), (784,)
    if name == "cnn":
        return SmallCNN(in_channels=3, num_classes=10, channels=(32, 64)), (3, 32, 32)
    raise ValueError(f"model must be one of ['mlp', 'cnn'] (got {name!r})")


def _worker(rank: int, world_size: int, args: argparse.Namespace, mode: str, init_file: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    model, shape = make_model(args.model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    comm = make_comm(mode) if mode != "sgd" else None
    seng = SENG(model, damping=0.5, update_freq=args.update_freq, comm=comm) if comm is not None else None
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch_size, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    times: Dict[bool, List[float]] = {True: [], False: []}
    traffic: Dict[bool, List[Dict[str, int]]] = {True: [], False: []}
    for step in range(WARMUP_STEPS + args.steps):
        refresh = seng is not None and seng.will_refresh
        before = comm.traffic() if comm is not None else {"calls": 0, "bytes_received": 0}
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if seng is not None:
            seng.step()
        optimizer.step()
        elapsed = time.perf_counter() - start
        after = comm.traffic() if comm is not None else before
        if step >= WARMUP_STEPS:
            times[refresh].append(elapsed)
            traffic[refresh].append({k: after[k] - before[k] for k in after})
    if rank == 0:
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if world_size > 1 else 0
        torch.save({"times": times, "traffic": traffic, "grad_bytes": grad_bytes}, out)
    dist.destroy_process_group()


def _measure(args: argparse.Namespace, mode: str, world_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=(world_size, args, mode, os.path.join(tmp, "rendezvous"), out),
                           nprocs=world_size, join=True, start_method="spawn")
        return torch.load(out)


def _median_ms(values: List[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f}" if values else "-"


def _mean_mb(values: List[Dict[str, int]], key: str = "bytes_received") -> str:
    return f"{statistics.fmean(v[key] for v in values) / 2**20:.3f}" if values else "-"


def _mean_calls(values: List[Dict[str, int]]) -> str:
    return f"{statistics.fmean(v['calls'] for v in values):.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per process")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--update-freq", type=int, default=5, help="SENG curvature refresh every this many steps")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    header = ("mode", "procs", "global batch", "step ms", "refresh step ms", "SENG MiB/step",
              "SENG MiB/refresh", "SENG calls/step", "SENG calls/refresh", "DDP grad MiB/step")
    rows = []
    for mode in args.modes:
        for world_size in args.world_sizes:
            r = _measure(args, mode, world_size)
            times, traffic = r["times"], r["traffic"]
            rows.append((mode, str(world_size), str(world_size * args.batch_size), _median_ms(times[False]),
                         _median_ms(times[True]), _mean_mb(traffic[False]), _mean_mb(traffic[True]),
                         _mean_calls(traffic[False]), _mean_calls(traffic[True]),
                         f"{r['grad_bytes'] / 2**20:.3f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(f"model={args.model} batch/process={args.batch_size} steps={args.steps} update_freq={args.update_freq} "
          f"threads/process={args.threads} backend=gloo (CPU)")
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()

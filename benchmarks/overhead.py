"""Per-step cost of SENG against plain SGD: wall time, refresh time and peak memory, on an MLP, a small CNN
and a token MLP built twice: from ``nn.Linear``/``nn.RMSNorm`` (dedicated routes, ``seqmlp``) and from a
Hugging Face ``Conv1D``-style linear and a custom RMS norm (the generic route, ``generic``).

Each configuration runs in a fresh subprocess so that its peak memory is its own: on CPU the figure
is the growth of the process's peak resident set (``ru_maxrss``) over what it held once the model,
the optimizer and the data were in place; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python benchmarks/overhead.py                      # CPU, table on stdout
    python benchmarks/overhead.py --models seqmlp,generic # the generic route against the dedicated ones
    python benchmarks/overhead.py --sketch-size 1024      # adds sketched-Gram rows
    python benchmarks/overhead.py --curvature-samples 32  # adds rows with U from 32 of the batch's samples
    python benchmarks/overhead.py --device cuda --steps 100
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG


class AddmmLinear(nn.Module):
    """Hugging Face's ``Conv1D``: weight stored ``(in, out)``, applied by ``addmm`` (no dedicated route)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * d_in ** -0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class CustomRMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TokenMLP(nn.Module):
    """Tokens ``(T, 64)``: linear 64→96, RMS norm, GELU, linear 96→64, mean over tokens, head 64→10."""

    def __init__(self, linear: type, norm: type):
        super().__init__()
        self.up, self.norm, self.down, self.head = linear(64, 96), norm(96), linear(96, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(F.gelu(self.norm(self.up(x)))).mean(1))


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The benchmark models and their input shape (without the batch dimension)."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10)), (784,)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 10)), (3, 32, 32)
    if name == "seqmlp":
        return TokenMLP(nn.Linear, nn.RMSNorm), (16, 64)
    if name == "generic":
        return TokenMLP(AddmmLinear, CustomRMSNorm), (16, 64)
    raise ValueError(f"model must be one of ['mlp', 'cnn', 'seqmlp', 'generic'] (got {name!r})")


def measure(model_name: str, optimizer: str, update_freq: int, sketch_size: int | None,
            curvature_samples: int | None, batch_size: int, steps: int, warmup: int, device: str, threads: int) -> dict:
    """Median seconds per training step and peak memory growth for one configuration."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape = make_model(model_name)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seng = (SENG(model, damping=0.5, update_freq=update_freq, sketch_size=sketch_size,
                 curvature_samples=curvature_samples) if optimizer == "seng" else None)
    xs = torch.randn(4, batch_size, *shape, device=device)
    ys = torch.randint(0, 10, (4, batch_size), device=device)
    cuda = device.startswith("cuda")

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs[i % 4]), ys[i % 4]).backward()
        if seng is not None:
            seng.step()
        opt.step()

    step(0)  # allocate gradients and optimizer state before the baseline
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i in range(1, warmup):
        step(i)
    times, refreshes = [], []
    # whole update_freq cycles, so refresh steps weigh in at their real share
    steps = max(steps // update_freq, 1) * update_freq
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize()
        refresh = seng is not None and seng.will_refresh
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if refresh:
            refreshes.append(seng.stats["refresh_time"])
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    cycles = [sum(times[i:i + update_freq]) / update_freq for i in range(0, steps, update_freq)]
    return {"model": model_name, "optimizer": optimizer, "update_freq": update_freq, "sketch_size": sketch_size,
            "curvature_samples": curvature_samples,
            "step_ms": 1000 * statistics.median(cycles),
            "refresh_ms": 1000 * statistics.median(refreshes) if refreshes else None,
            "routes": {k[len("layers/"):]: v for k, v in (seng.stats if seng else {}).items()
                       if k.startswith("layers/") and v},
            "peak_mib": max(peak, 0) / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--sketch-size", type=int, default=None,
                        help="also measure SENG with this sketch_size (coordinate sampling of the Gram)")
    parser.add_argument("--curvature-samples", type=int, default=None,
                        help="also measure SENG with U built from this many samples of the batch")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    if args.one:
        model_name, optimizer, freq, sketch, samples = args.one.split(":")
        print(json.dumps(measure(model_name, optimizer, int(freq), int(sketch) if sketch else None,
                                 int(samples) if samples else None, args.batch_size, args.steps, args.warmup,
                                 args.device, args.threads)))
        return

    rows = []
    for model_name in args.models.split(","):
        configs = [("sgd", 1, None, None), ("seng", 1, None, None), ("seng", 10, None, None)]
        if args.sketch_size:
            configs += [("seng", 1, args.sketch_size, None), ("seng", 10, args.sketch_size, None)]
        if args.curvature_samples:
            configs += [("seng", 1, None, args.curvature_samples), ("seng", 10, None, args.curvature_samples)]
        for optimizer, freq, sketch, samples in configs:
            cmd = [sys.executable, __file__, "--one",
                   f"{model_name}:{optimizer}:{freq}:{sketch or ''}:{samples or ''}",
                   "--device", args.device,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  measured {model_name} {optimizer} update_freq={freq} sketch_size={sketch} "
                  f"curvature_samples={samples}", file=sys.stderr, flush=True)
    sgd = {r["model"]: r for r in rows if r["optimizer"] == "sgd"}
    print(f"device={args.device} batch_size={args.batch_size} threads={args.threads} steps={args.steps}")
    print(f"{'model':7} {'optimizer':9} {'update_freq':>11} {'sketch':>7} {'samples':>7} {'ms/step':>9} {'x SGD':>7} "
          f"{'refresh ms':>10} {'peak MiB':>9} {'target':>7}  routes")
    for r in rows:
        ratio = r["step_ms"] / sgd[r["model"]]["step_ms"]
        target = "" if r["optimizer"] == "sgd" else ("<=2.0" if r["update_freq"] == 1 else "<=1.3")
        verdict = "" if not target else (" ok" if ratio <= float(target[2:]) else " MISS")
        refresh = "-" if r["refresh_ms"] is None else f"{r['refresh_ms']:.2f}"
        routes = " ".join(f"{k}:{v}" for k, v in r["routes"].items())
        print(f"{r['model']:7} {r['optimizer']:9} {r['update_freq']:>11} {str(r['sketch_size'] or '-'):>7} "
              f"{str(r['curvature_samples'] or '-'):>7} "
              f"{r['step_ms']:>9.2f} {ratio:>7.2f} {refresh:>10} "
              f"{r['peak_mib']:>9.1f} {target:>7}{verdict:5}  {routes}")


if __name__ == "__main__":
    main()

"""benchmarks/gpu_check.py on the CPU (``--tiny``): the table has every case and every column, with finite numbers
where a CPU can measure and ``n/a`` exactly where only CUDA can (never the figures themselves); the profiler
events are sorted into kernels, copies and launches; the decoder is causal."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from benchmarks.gpu_check import CASES, COLUMNS, CUDA_ONLY, Decoder, profiled_counts

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_every_row_and_column(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "resnet50 fp16: counting ops" in out  # progress lines
    md = (tmp_path / "cpu-tiny.md").read_text()
    assert md.splitlines()[-1] in out  # the table is printed too
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [h for _, h, _ in COLUMNS]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == list(CASES)
    for row in rows:
        for (key, head, _), cell in zip(COLUMNS[1:], row[1:], strict=True):
            if key in CUDA_ONLY:
                assert cell == "n/a", (row[0], head, cell)
            else:
                assert math.isfinite(float(cell)) and float(cell) >= 0, (row[0], head, cell)
    saved = json.loads((tmp_path / "cpu-tiny.json").read_text())["rows"]
    assert [r["case"] for r in saved] == list(CASES)
    for r in saved:
        assert r["sgd_ms"] > 0 and r["seng_ops"] > r["sgd_ops"] > 0 and r["kept_mib"] > 0
        assert r["details"]["layers_with_curvature"] == r["details"]["layers"]  # a real SENG step was timed
        assert r["details"]["seng_refresh_times_ms"] and r["details"]["seng_between_times_ms"]


def test_profiled_counts_sorts_kernels_copies_and_launches():
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [SimpleNamespace(name=n, device_type=d) for n, d in [
        ("void at::native::vectorized_elementwise_kernel<4>", cuda), ("ampere_sgemm_128x64_nn", cuda),
        ("Memcpy DtoH (Device -> Pinned)", cuda), ("Memcpy HtoD (Pinned -> Device)", cuda), ("Memset (Device)", cuda),
        ("cudaLaunchKernel", cpu), ("cuLaunchKernelEx", cpu), ("cudaMemcpyAsync", cpu), ("aten::mv", cpu)]]
    assert profiled_counts(events) == dict(kernels=2, memcpy_dtoh=1, memcpy_other=1, memset=1, launch_calls=2)


def test_decoder_is_causal_and_ties_its_head():
    torch.manual_seed(0)
    model = Decoder(vocab=50, context=8, width=16, heads=2, layers=2)
    assert model.head.weight is model.wte.weight
    tokens = torch.randint(0, 50, (2, 8))
    changed = tokens.clone()
    changed[:, 5] = (tokens[:, 5] + 1) % 50
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 8, 50)
    assert torch.allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])

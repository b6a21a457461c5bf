"""What SENG's step costs on a GPU next to SGD's: step time, kernels, host syncs and memory, in one run.

Cases (every model our own code, random data, no download):

- ``resnet50 bf16``: ResNet-50 (``lightning_seng.recipes.models.resnet50``: bottleneck blocks ``[3, 4, 6, 3]``,
  7x7 stem, 1000 classes), batch 64 at 224x224, forward and loss under ``torch.autocast(dtype=bfloat16)``;
- ``resnet50 fp16``: the same under float16 autocast with a ``torch.amp.GradScaler`` (initial scale 1024, the
  SENG authors' ImageNet setting): ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)``,
  ``seng.step(loss_scale=scaler.get_scale())``, ``scaler.step(opt)``, ``scaler.update()`` (the README's AMP order);
- ``gpt2 bf16``: a GPT-2-small-shaped decoder (:class:`Decoder`: 12 pre-norm blocks, width 768, 12 heads,
  context 1024, vocabulary 50257, head tied to the token embedding), batch 8 of random tokens, bf16 autocast.

Per case two runners, each with its own copy of the model (same seed): SGD (``torch.optim.SGD``, momentum 0.9,
``foreach=True``), and SENG with its default settings (``update_freq`` 10) in front of the same SGD. Every round
runs one training step of each (zero_grad, forward, backward, SENG, optimizer step), the order alternating
between rounds; the first ``--warmup`` rounds (one full ``update_freq`` cycle by default) are not timed. Steps are
timed with CUDA events around the step after a ``synchronize`` (``time.perf_counter`` on the CPU). Ratios are
to SGD's median step: ``between`` (median step between refreshes), ``refresh`` (median refresh step) and
``amortised`` = (refresh + (K - 1) · between) / K, as in ``benchmarks/overhead.py``.

Then, on steps between refreshes that are not the first after a refresh, each counted on a step of its own:

- ``aten ops``: the aten ops ``seng.step()`` dispatches (views excluded), and those of SGD's optimizer step
  (``scaler.step(opt)`` under fp16: it includes the scaler's check), under a ``TorchDispatchMode``;
- ``CUDA kernels``: the kernels ``torch.profiler`` records on the GPU during ``seng.step()`` and during SGD's
  optimizer step (memcpy and memset not counted; in the JSON beside them);
- ``host reads``: ``aten._local_scalar_dense`` calls in ``seng.step()`` (every ``.item()``, ``bool(tensor)``;
  on the CPU one by design: the step reads its non-finite flag there, ``lightning_seng.fused.HOST_READ_DEVICES``);
- ``CUDA syncs``: synchronising CUDA calls in ``seng.step()``, as ``torch.cuda.set_sync_debug_mode("warn")``
  reports them (one warning each);
- ``kept MiB``: ``sum(seng.kept_bytes().values())`` after the timing;
- ``peak + MiB``: on CUDA, with the timing runners freed, a fresh SGD runner and then a fresh SENG runner, each
  alone: ``torch.cuda.max_memory_allocated()`` over a step (reset before it), SENG's minus SGD's. ``refresh``:
  the first step (SENG's first refresh, which holds no earlier curvature: a later refresh may hold up to ``kept
  MiB`` more while it builds the new one); ``between``: the third step (the second between refreshes).

On a CPU (``--tiny``, the default when CUDA is absent) the sizes are tiny (ResNet with one bottleneck block per
stage at 8x8, batch 4; a decoder of 2 blocks, width 64, context 32, vocabulary 512, batch 4), ``update_freq`` 3
and one round of warm-up (float16 convolutions are slow on a CPU), one thread, and the CUDA-only columns read
``n/a``: the run checks the script, its numbers say nothing about a GPU.

The timing rounds of each case stop early, once a refresh and three steps between refreshes are timed, when
the case has used its share of ``--budget-s`` (default 420 s, so a GPU run ends well inside 8 minutes); the
column ``rounds`` says how many were timed.

    python benchmarks/gpu_check.py                      # CUDA if available, else --tiny on the CPU
    python benchmarks/gpu_check.py --tiny --out /tmp/x  # what CI runs

Writes ``<out>/<device>.md`` (the table, also printed) and ``<out>/<device>.json`` (every figure, the ops and
kernels by name), ``<out>`` defaulting to ``benchmarks/results/gpu_check``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shlex
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.opcount import OpCounter  # noqa: E402
from lightning_seng import SENG  # noqa: E402
from lightning_seng.recipes.models import Bottleneck, ResNet, resnet50  # noqa: E402

CASES = ("resnet50 bf16", "resnet50 fp16", "gpt2 bf16")
NA = "n/a"
# (key, markdown header, format); the CUDA-only keys hold None on a CPU
COLUMNS = [
    ("case", "case", "{}"),
    ("sgd_ms", "SGD ms", "{:.2f}"),
    ("between", "between ×SGD", "{:.3f}"),
    ("refresh", "refresh ×SGD", "{:.2f}"),
    ("amortised", "amortised ×SGD", "{:.3f}"),
    ("rounds", "rounds", "{}"),
    ("seng_ops", "SENG aten ops", "{}"),
    ("seng_ops_per_tensor", "per param tensor", "{:.2f}"),
    ("sgd_ops", "SGD aten ops", "{}"),
    ("seng_kernels", "SENG CUDA kernels", "{}"),
    ("sgd_kernels", "SGD CUDA kernels", "{}"),
    ("host_reads", "SENG host reads", "{}"),
    ("cuda_syncs", "SENG CUDA syncs", "{}"),
    ("kept_mib", "kept MiB", "{:.1f}"),
    ("peak_between_mib", "peak + MiB between", "{:.1f}"),
    ("peak_refresh_mib", "peak + MiB refresh", "{:.1f}"),
]
CUDA_ONLY = ("seng_kernels", "sgd_kernels", "cuda_syncs", "peak_between_mib", "peak_refresh_mib")


class Decoder(nn.Module):
    """GPT-2-shaped decoder on tokens ``(B, T)``, logits ``(B, T, vocab)``: token and position embeddings, ``layers``
    pre-norm blocks (causal attention through ``qkv`` and ``proj`` Linear layers and ``scaled_dot_product_attention``;
    an MLP ``width -> 4·width -> width`` with tanh-GELU), a final LayerNorm and a head tied to the token embedding."""

    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        # positions with the batch axis, so that the position embedding's input shows it as every other input does
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            h = block(h, self.heads)
        return self.head(self.norm(h))


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


@dataclass
class Sizes:
    """What a case trains on: the model, a batch of inputs and targets, and its shape in words."""
    model: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple]
    shape: str


def sizes(case: str, tiny: bool, context: Optional[int] = None) -> Sizes:
    if case.startswith("resnet50"):
        batch, side, classes = (4, 8, 10) if tiny else (64, 224, 1000)

        def model():
            if tiny:  # the same blocks, one per stage, the 3x3 stem
                return ResNet(Bottleneck, (1, 1, 1, 1), classes, stem="cifar", zero_init_residual=True)
            return resnet50(classes)

        def data(g):
            return torch.rand(batch, 3, side, side, generator=g), torch.randint(0, classes, (batch,), generator=g)

        blocks = "[1, 1, 1, 1], 3x3 stem" if tiny else "[3, 4, 6, 3]"
        return Sizes(model, data, f"bottleneck {blocks}, batch {batch}, {side}x{side}, {classes} classes")
    vocab, t, width, heads, layers, batch = (512, 32, 64, 4, 2, 4) if tiny else (50257, 1024, 768, 12, 12, 8)
    context = context or t

    def data(g):
        tokens = torch.randint(0, vocab, (batch, context + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Sizes(lambda: Decoder(vocab, context, width, heads, layers), data,
                 f"{layers} layers, width {width}, {heads} heads, context {context}, vocab {vocab}, batch {batch}")


class Runner:
    """One model with SGD (momentum 0.9, foreach), and SENG (default settings but ``update_freq``) if ``seng``."""

    def __init__(self, case: str, size: Sizes, device: torch.device, seng: bool, update_freq: int):
        torch.manual_seed(0)
        self.label = "seng" if seng else "sgd"
        self.model = size.model().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        self.seng = SENG(self.model, update_freq=update_freq, log_coverage=False) if seng else None
        self.dtype = torch.float16 if case.endswith("fp16") else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1024.0) if self.dtype == torch.float16 else None
        self.device = device
        self.times: List[float] = []
        self.refresh_times: List[float] = []
        self.since_refresh = 0  # steps taken since the last refresh step (0: the last step refreshed)

    @property
    def refreshing(self) -> bool:
        return self.seng is not None and self.seng.will_refresh

    def step(self, x: torch.Tensor, y: torch.Tensor, around_seng=contextlib.nullcontext,
             around_opt=contextlib.nullcontext) -> None:
        """One training step; ``around_seng`` and ``around_opt`` make the contexts ``seng.step()`` and the optimizer
        step run in (to count what they do)."""
        refresh = self.refreshing
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype):
            out = self.model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if self.scaler is None:
            loss.backward()
            if self.seng is not None:
                with around_seng():
                    self.seng.step()
            with around_opt():
                self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            if self.seng is not None:
                scale = self.scaler.get_scale()  # a host read, of the user's loop, outside seng.step()
                with around_seng():
                    self.seng.step(loss_scale=scale)
            with around_opt():
                self.scaler.step(self.opt)
            self.scaler.update()
        self.since_refresh = 0 if refresh else self.since_refresh + 1


class Clock:
    """Milliseconds of a call: CUDA events after a synchronize on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def profiled_counts(events) -> Dict[str, int]:
    """From ``torch.profiler`` events (``.name``, ``.device_type``): GPU kernels, memcpy by direction, memsets,
    and the host's kernel-launch calls (``cudaLaunchKernel``, ``cuLaunchKernel``, their ``Ex`` forms)."""
    from torch.autograd import DeviceType

    out = Counter(kernels=0, memcpy_dtoh=0, memcpy_other=0, memset=0, launch_calls=0)
    for e in events:
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith("Memcpy"):
                out["memcpy_dtoh" if "DtoH" in e.name else "memcpy_other"] += 1
            elif e.name.startswith("Memset"):
                out["memset"] += 1
            else:
                out["kernels"] += 1
        elif e.device_type == DeviceType.CPU and e.name.startswith(("cudaLaunch", "cuLaunch")):
            out["launch_calls"] += 1
    return dict(out)


@contextlib.contextmanager
def _profiled(into: dict):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    into.update(profiled_counts(prof.events()))
    from torch.autograd import DeviceType

    into["by_name"] = dict(Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA).most_common(12))


@contextlib.contextmanager
def _sync_warnings(into: dict):
    """Counts the synchronising CUDA calls in the block: ``set_sync_debug_mode("warn")`` warns on each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    into["syncs"] = sum("synchroniz" in str(w.message) for w in caught)


@dataclass
class Progress:
    start: float = field(default_factory=time.monotonic)

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", flush=True)


def _advance_to_steady(r: Runner, batches, i: int) -> int:
    """Steps ``r`` until its next step is between refreshes and not the first after one (which may set up what the
    following steps reuse); returns the next batch index."""
    while r.refreshing or r.since_refresh < 1:
        x, y = batches[i % len(batches)]
        r.step(x, y)
        i += 1
    return i


def _peak_mib(r: Runner, batches, steps: int) -> List[float]:
    """``max_memory_allocated`` (MiB) over each of the first ``steps`` steps (the peak reset before each) of the fresh
    runner ``r``, the only one alive; ``r`` is detached after."""
    gc.collect()
    peaks = []
    for i in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        r.step(*batches[i % len(batches)])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2 ** 20)
    _free(r)
    return peaks


def _free(*runners: Runner) -> None:
    """Detaches each runner's SENG and returns the device memory nothing holds any longer to the driver."""
    for r in runners:
        if r.seng is not None:
            r.seng.remove()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(case: str, args, device: torch.device, deadline: float, cases_left: int, say: Progress) -> dict:
    size = sizes(case, args.tiny, args.context)
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in size.data(g)) for _ in range(4)]
    say(f"{case}: {size.shape}")
    case_end = time.monotonic() + 0.7 * max(0.0, deadline - time.monotonic()) / cases_left
    row = _time_and_count(case, size, batches, args, device, case_end, say)  # its runners are freed on return
    if device.type == "cuda":
        say(f"{case}: peak memory, fresh runners one at a time")
        k = args.update_freq
        sgd = _peak_mib(Runner(case, size, device, False, k), batches, 3)
        seng = _peak_mib(Runner(case, size, device, True, k), batches, 3)
        row.update(peak_between_mib=seng[2] - sgd[2], peak_refresh_mib=seng[0] - sgd[0])
        row["details"].update(sgd_peaks_mib=sgd, seng_peaks_mib=seng)
    else:
        row.update(peak_between_mib=None, peak_refresh_mib=None)
    say(f"{case}: SGD {row['sgd_ms']:.2f} ms; SENG between {row['between']:.3f}x, refresh {row['refresh']:.2f}x, "
        f"amortised {row['amortised']:.3f}x; aten ops {row['seng_ops']} against SGD's {row['sgd_ops']}")
    return row


def _time_and_count(case: str, size: Sizes, batches, args, device: torch.device, case_end: float,
                    say: Progress) -> dict:
    """The table's row but for the peaks: times round-robin, then counts on steps between refreshes."""
    k, cuda = args.update_freq, device.type == "cuda"
    sgd, seng = (Runner(case, size, device, s, k) for s in (False, True))
    tensors = sum(1 for p in seng.model.parameters() if p.requires_grad)
    clock = Clock(device)
    warmup, rounds = args.warmup, args.rounds
    timed, i = 0, 0
    for i in range(warmup + rounds):
        x, y = batches[i % len(batches)]
        for r in ((sgd, seng) if i % 2 == 0 else (seng, sgd)):
            refresh = r.refreshing
            ms = clock(lambda: r.step(x, y))
            if i >= warmup:
                (r.refresh_times if refresh else r.times).append(ms)
        timed = max(0, i + 1 - warmup)
        if i == 0 or i + 1 == warmup or (i >= warmup and (i - warmup) % 10 == 9):
            say(f"{case}: round {i + 1}/{warmup + rounds}" + (" (warm-up done)" if i + 1 == warmup else ""))
        if (time.monotonic() > case_end and seng.refresh_times and len(seng.times) >= 3
                and i + 1 < warmup + rounds):
            say(f"{case}: its share of --budget-s is used; {timed} rounds timed")
            break
    if not seng.refresh_times or not seng.times:
        raise RuntimeError(f"{case}: no refresh step or no step between refreshes was timed; give --rounds at "
                           f"least --update-freq ({k})")
    sgd_ms = statistics.median(sgd.times)
    between = statistics.median(seng.times) / sgd_ms
    refresh = statistics.median(seng.refresh_times) / sgd_ms
    row = dict(case=case, sgd_ms=sgd_ms, between=between, refresh=refresh, amortised=(refresh + (k - 1) * between) / k,
               rounds=timed)

    say(f"{case}: counting ops{', kernels and syncs' if cuda else ''} on steps between refreshes")
    i += 1
    seng_ops, sgd_ops = OpCounter(), OpCounter()
    i = _advance_to_steady(seng, batches, i)
    seng.step(*batches[i % len(batches)], around_seng=lambda: seng_ops)
    sgd.step(*batches[i % len(batches)], around_opt=lambda: sgd_ops)
    i += 1
    row.update(seng_ops=seng_ops.total, seng_ops_per_tensor=seng_ops.total / tensors, sgd_ops=sgd_ops.total,
               host_reads=seng_ops.host_reads)
    details = dict(shape=size.shape, parameter_tensors=tensors, sgd_times_ms=sgd.times,
                   seng_between_times_ms=seng.times, seng_refresh_times_ms=seng.refresh_times,
                   seng_ops_by_name=dict(seng_ops.counts.most_common()),
                   sgd_ops_by_name=dict(sgd_ops.counts.most_common()))
    row.update(seng_kernels=None, sgd_kernels=None, cuda_syncs=None)
    if cuda:
        with _profiled({}):  # the profiler's first use sets itself up
            torch.ones(1, device=device).add_(1)
        seng_prof, sgd_prof, syncs = {}, {}, {}
        i = _advance_to_steady(seng, batches, i)
        seng.step(*batches[i % len(batches)], around_seng=lambda: _profiled(seng_prof))
        sgd.step(*batches[i % len(batches)], around_opt=lambda: _profiled(sgd_prof))
        i = _advance_to_steady(seng, batches, i + 1)
        seng.step(*batches[i % len(batches)], around_seng=lambda: _sync_warnings(syncs))
        details.update(seng_profile=seng_prof, sgd_profile=sgd_prof)
        row["cuda_syncs"] = syncs["syncs"]
        if seng_prof["kernels"] == 0 and seng_ops.total > 0:
            say(f"WARNING {case}: the profiler recorded no CUDA kernel in seng.step(), which dispatched "
                f"{seng_ops.total} aten ops: the kernel columns are left n/a")
        else:
            row.update(seng_kernels=seng_prof["kernels"], sgd_kernels=sgd_prof["kernels"])
    kept = seng.seng.kept_bytes()
    row["kept_mib"] = sum(kept.values()) / 2 ** 20
    stats = seng.seng.stats
    details.update(routes={key[7:]: v for key, v in stats.items() if key.startswith("layers/") and v},
                   coverage=stats.get("coverage"), skipped_refreshes=stats.get("skipped_refreshes"),
                   nonfinite_steps=stats.get("nonfinite_steps"),
                   layers_with_curvature=sum(1 for b in kept.values() if b > 0), layers=len(kept))
    if details["skipped_refreshes"] or details["nonfinite_steps"]:
        say(f"WARNING {case}: SENG skipped {details['skipped_refreshes']} refreshes and zeroed "
            f"{details['nonfinite_steps']} non-finite steps: its times are not those of a normal step")
    row["details"] = details
    _free(sgd, seng)
    return row


def markdown(rows: List[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [NA if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header(args, device: torch.device) -> List[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"`{shlex.join(['python', 'benchmarks/gpu_check.py', *args.argv])}`",
             f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
             f"{'tiny sizes, ' if args.tiny else ''}{torch.get_num_threads()} CPU threads, "
             f"update_freq {args.update_freq}, medians over the timed rounds."]
    if device.type != "cuda":
        lines.append("CPU run: it checks the script; the CUDA-only columns are n/a and the figures say nothing about "
                     "a GPU.")
    return lines


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--update-freq", type=int, default=None, help="SENG's update_freq (default 10; tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: update_freq; tiny: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3·update_freq; tiny: "
                                                                   "update_freq)")
    parser.add_argument("--context", type=int, default=None, help="the decoder's context (default 1024; tiny: 32)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all cases together")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_check"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            raise ValueError(f"--cases: {case!r} is not one of {list(CASES)}")
    if device.type != "cuda":
        args.tiny = True
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    if args.update_freq is None:
        args.update_freq = 3 if args.tiny else 10
    if args.update_freq < 3:
        raise ValueError(f"--update-freq must be >= 3 (got {args.update_freq}): the counts need a step between "
                         f"refreshes that is not the first after one")
    if args.warmup is None:
        args.warmup = 1 if args.tiny else args.update_freq
    if args.rounds is None:
        args.rounds = args.update_freq if args.tiny else 3 * args.update_freq
    say = Progress()
    deadline = say.start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (device.type + ("-tiny" if args.tiny else ""))
    rows: List[dict] = []
    say(" ".join(header(args, device)[1:]))
    for n, case in enumerate(cases):
        rows.append(run_case(case, args, device, deadline, len(cases) - n, say))
        # written after every case, so that a run cut short keeps what it measured
        table = "\n\n".join(["\n".join(header(args, device)), markdown(rows)])
        stem.with_suffix(".md").write_text(table)
        stem.with_suffix(".json").write_text(json.dumps(dict(header=header(args, device), rows=rows), indent=1,
                                                        default=str))
    print(table, end="")
    say(f"written {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return dict(rows=rows, md=stem.with_suffix(".md"), json=stem.with_suffix(".json"))


if __name__ == "__main__":
    main()

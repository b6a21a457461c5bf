"""Run a function on 2 CPU processes joined by a gloo process group, inside a normal pytest run.

:func:`run_on_ranks` spawns the ranks with ``torch.multiprocessing``; an assertion error on any rank
fails the test with that rank's traceback, and a hang (a deadlock in a collective) fails it after
``timeout`` seconds instead of blocking the test session. :func:`run_lightning_on_ranks` does the same
with the environment a Lightning ``Trainer(devices=2)`` expects from externally launched processes.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group_entry(rank: int, fn: Callable, world_size: int, init_file: str, args: Tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _lightning_entry(rank: int, fn: Callable, world_size: int, port: int, args: Tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    try:
        fn(rank, world_size, *args)
    finally:
        # Lightning leaves its gloo group alive; torn down at interpreter exit, its threads can abort the
        # process ("terminate called without an active exception") after the test body has passed.
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_cause(context) -> str:
    """The traceback of the rank that failed first: the other ranks typically fail afterwards, in a
    collective whose peer is gone, and torch reports whichever rank it notices first."""
    traces = []
    for path in context.error_files:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                traces.append(pickle.load(f))
    peer_gone = ("Connection reset by peer", "Connection closed by peer", "terminated")
    causes = [t for t in traces if not any(p in t for p in peer_gone)]
    return (causes or traces or ["(no traceback)"])[0]


def _join(context, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if context.join(timeout=max(deadline - time.monotonic(), 0.1)):
                return
        except mp.ProcessRaisedException:
            pytest.fail(f"a rank failed:\n{_first_cause(context)}", pytrace=False)
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f} s (deadlock?)")


def run_on_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 90.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes in one gloo group (file rendezvous,
    so no port is needed). ``fn`` must be a module-level function."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_process_group_entry, args=(fn, world_size, os.path.join(tmp, "rendezvous"), args),
                                     nprocs=world_size, join=False, start_method="spawn")
        _join(context, timeout)


def run_lightning_on_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 120.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes that a ``Trainer(devices=world_size)``
    adopts as its DDP ranks (``LOCAL_RANK`` etc. set, a free ``MASTER_PORT`` chosen)."""
    context = mp.start_processes(_lightning_entry, args=(fn, world_size, _free_port(), args),
                                 nprocs=world_size, join=False, start_method="spawn")
    _join(context, timeout)

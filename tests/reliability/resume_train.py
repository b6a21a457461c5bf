"""A small plain-PyTorch SENG training that checkpoints after every optimizer step and can resume.

Used by ``test_kill_resume.py``: run it, SIGKILL it mid-epoch, resume from the last checkpoint in a new
process, and compare the final weights with an uninterrupted run's (bit-exact on CPU)::

    python -m tests.reliability.resume_train --ckpt DIR --out final.pt [--resume] [--pause-at STEP]

Everything that decides the trajectory is in the checkpoint: model, optimizer (momentum buffers), LR
scheduler, the step counter and SENG's state (step, epoch, damping schedule position, committed
curvature, sketch RNG). Batches are a pure function of (epoch, position in epoch), as with a seeded
shuffling sampler, so a resumed run sees the same data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.schedules import ExponentialDamping

STEPS_PER_EPOCH = 5
EPOCHS = 4
BATCH = 8
UPDATE_FREQ = 3       # resume points fall between refreshes
SKETCH_SIZE = 10      # < every layer's parameter count: each refresh draws from the sketch RNG


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 12), nn.Tanh(), nn.Linear(12, 3))


def dataset():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return x, y


def batch(data, epoch: int, index: int):
    order = torch.randperm(data[0].shape[0], generator=torch.Generator().manual_seed(100 + epoch))
    idx = order[index * BATCH:(index + 1) * BATCH]
    return data[0][idx], data[1][idx]


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", type=int, default=-1,
                        help="in this step, after backward and before seng.step(), announce 'paused' and wait")
    parser.add_argument("--reset-sketch-rng", action="store_true", help="negative control: drop the RNG state")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = make_model()
    seng = SENG(model, damping=ExponentialDamping(0.8, rate=0.7), update_freq=UPDATE_FREQ,
                sketch_size=SKETCH_SIZE, route="explicit", seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ckpt_file = os.path.join(args.ckpt, "last.pt")
    start = 0
    if args.resume and os.path.exists(ckpt_file):
        state = torch.load(ckpt_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if args.reset_sketch_rng:
            state["seng"]["generator"] = torch.Generator().manual_seed(7).get_state()
        seng.load_state_dict(state["seng"])
        start = state["step"] + 1
    print(f"start {start}", flush=True)

    data = dataset()
    for step in range(start, EPOCHS * STEPS_PER_EPOCH):
        epoch, index = divmod(step, STEPS_PER_EPOCH)
        if index == 0 or step == start:
            seng.set_epoch(epoch)
        x, y = batch(data, epoch, index)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if step == args.pause_at:  # a kill now lands mid-step: hooks have captured, grads are raw
            print(f"paused {step}", flush=True)
            time.sleep(600)
        seng.step()
        opt.step()
        if index == STEPS_PER_EPOCH - 1:
            sched.step()
        save_atomic({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "seng": seng.state_dict()}, ckpt_file)
        print(f"saved {step} refreshed={(step % UPDATE_FREQ) == 0}", flush=True)

    torch.save({"model": model.state_dict(), "seng": seng.state_dict(), "lr": opt.param_groups[0]["lr"]}, args.out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

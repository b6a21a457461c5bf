"""End to end in a plain PyTorch loop: an MLP on scikit-learn's digits, SENG against SGD.

Same model, data order, epochs, batch size and learning-rate grid for both; each optimizer keeps the
learning rate with the best validation accuracy, and the test accuracies of those runs are compared.
SENG runs with the library's default damping and update frequency (no extra tuning budget).
Inputs are the pixel intensities scaled to [0, 1], as they come.
"""

import logging

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_seng import SENG

LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
EPOCHS, BATCH = 3, 64


def _data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


def _train(data, lr, use_seng, seed):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    seng = SENG(model) if use_seng else None
    order = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xtr), generator=order)
        for i in range(0, len(xtr), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            if seng is not None:
                seng.step()
            opt.step()
    with torch.no_grad():
        def acc(x, y):
            out = model(x)
            return (out.argmax(1) == y).float().mean().item() if torch.isfinite(out).all() else 0.0
        return acc(xva, yva), acc(xte, yte)


def _best_test_accuracy(data, use_seng, seed):
    runs = {lr: _train(data, lr, use_seng, seed) for lr in LR_GRID}
    best = max(runs, key=lambda lr: runs[lr][0])
    return best, runs[best][1]


def test_seng_beats_sgd_on_digits_mlp_with_equal_lr_budget(caplog):
    caplog.set_level(logging.ERROR)  # diverging grid points warn about non-finite gradients
    data = _data()
    sgd, seng = [], []
    for seed in (0, 1):
        sgd.append(_best_test_accuracy(data, False, seed))
        seng.append(_best_test_accuracy(data, True, seed))
    sgd_acc = sum(a for _, a in sgd) / len(sgd)
    seng_acc = sum(a for _, a in seng) / len(seng)
    print(f"\ndigits MLP, {EPOCHS} epochs, batch {BATCH}: SGD test acc {sgd_acc:.3f} (lr {[lr for lr, _ in sgd]}), "
          f"SENG {seng_acc:.3f} (lr {[lr for lr, _ in seng]})")
    assert seng_acc > sgd_acc

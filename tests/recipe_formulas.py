"""The SENG authors' schedules written as their scripts compute them (yangorwell/SENG; values and formulas only),
the independent references of tests/test_lr_schedules.py, tests/test_schedules.py and tests/test_recipes.py.

``k`` is the optimizer step from 0 and ``batches`` the steps per epoch; their loops count the batch from 1 on
ImageNet (``ind_batch``) and add 1 to a 0-based index on CIFAR (``batch_idx + 1``).
"""


def cifar_lr(k: int, batches: int) -> float:
    """Pytorch/cifar10/main_seng.py, --lr-scheme exp: 0.05 (1 - e/70)^6 with e = epoch + (batch_idx + 1)/batches."""
    epoch, batch_idx = divmod(k, batches)
    e = epoch + (batch_idx + 1) / batches
    return 0.05 * (1.0 - e / 70) ** 6


def imagenet_lr(k: int, batches: int) -> float:
    """Pytorch/imagenet/utils.py LRScheduler.update_lr: warm-up 0.01 -> 0.145 over 5 epochs, then
    0.145 (1 - (epoch - 5 + b/B)/60)^6, divided by 10 when epoch > 39."""
    epoch, index = divmod(k, batches)
    b = index + 1
    if epoch < 5:
        lr = 0.01 + (0.145 - 0.01) * (epoch + b / batches) / 5
    else:
        lr = 0.145 * (1 - (epoch - 5 + b / batches) / 60) ** 6
    return lr / 10 if epoch > 39 else lr


def imagenet_damping(k: int, batches: int) -> float:
    """Pytorch/imagenet/main_seng_bs.py: 0.17 * 0.9^(t/10) with t = epoch + ind_batch/batches."""
    epoch, index = divmod(k, batches)
    t = epoch + (index + 1) / batches
    return 0.17 * 0.9 ** (t / 10)

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state and leaves the default dtype as it found it."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


# The two packages that ship PyTorch Lightning (lightning_seng._packages): the standalone one and the unified
# `lightning` package's copy. The tests at the package boundary run against each one installed.
LIGHTNING_PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


@pytest.fixture(params=LIGHTNING_PACKAGES)
def pl_package(request):
    """The ``pytorch_lightning`` or the ``lightning.pytorch`` module; the test is skipped where it is not installed."""
    return pytest.importorskip(request.param)

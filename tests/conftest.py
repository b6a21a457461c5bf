import pytest
import torch

from lightning_seng._packages import PACKAGES


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state and leaves the default dtype as it found it."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


# The tests at the package boundary run against each package that ships PyTorch Lightning: the standalone
# `pytorch_lightning` and the unified `lightning` package's `lightning.pytorch`.
@pytest.fixture(params=PACKAGES)
def pl_package(request):
    """The ``pytorch_lightning`` or the ``lightning.pytorch`` module; the test is skipped where it is not installed."""
    return pytest.importorskip(request.param)

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state and leaves the default dtype as it found it."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)

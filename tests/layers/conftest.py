"""Tests here run tiny tensors, where intra-op threads cost more than they save (and a shared CI
machine makes them spin): run each test on one thread and restore the setting afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

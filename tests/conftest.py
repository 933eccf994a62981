"""Suite-wide test settings.

Without a GPU, Triton kernels run through Triton's interpreter. `triton.jit` reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test imports a kernel module.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "ci" (the default): the same 20 examples a test on every run, so a run's result depends on the code
# alone (a random draw once failed a dry run of CI on an fp32 rounding case, 2026-12-01, since fixed
# in its tolerance). "explore": fresh random examples and more of them, to hunt for new failures.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("explore", max_examples=200, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is faster than two fighting on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

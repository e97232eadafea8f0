"""Triton kernels run interpreted on CPU (TRITON_INTERPRET=1, set per test) and compiled on CUDA.

`kernels.triton_backend.triton_kernels()` reloads the kernel module when TRITON_INTERPRET has
changed since it was imported, so the order in which test directories import `kernels` does not
matter.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (runs compiled Triton kernels)")


HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(params=[
    pytest.param("interpret", marks=pytest.mark.skipif(HAS_CUDA, reason="compiled on this machine instead")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
])
def triton_device(request, monkeypatch) -> torch.device:
    """Where the Triton backend runs: the interpreter on CPU, or the GPU (no autotuning in tests)."""
    if request.param == "interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QSHARD_TRITON_TUNE", "0")
    return torch.device("cuda")

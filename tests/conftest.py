"""Shared fixtures: the default model (converted once into the qshard cache) and tiny synthetic
Llama checkpoints written by transformers itself."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before
# any module defines a @triton.jit kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_cuda else 0
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs at least 2 CUDA GPUs"))


@pytest.fixture(scope="session")
def default_model_dir():
    from engine.default_model import prepare_default

    return prepare_default()

"""Fixtures for format tests: one intra-op thread for tiny tensors, and a small float Llama."""

from __future__ import annotations

import pytest

from tests.quant.checkpoints import one_intra_op_thread, write_tiny_llama


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random float32 Llama: hidden 256, 8 heads, 2 KV heads, intermediate 1152 (9 groups of 128:
    4.5 per rank at TP 2), 2 layers, vocab 512, q/k/v/o biases."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))

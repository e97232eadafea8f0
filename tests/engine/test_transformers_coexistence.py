"""qshard ships a top-level package named `kernels`; so does the hub's `kernels` library, which
transformers probes for. Ours must not be mistaken for it."""

from __future__ import annotations

import importlib.util

import torch

import kernels  # ours, importable beside transformers


def test_transformers_does_not_take_our_kernels_for_the_hub_library(tmp_path):
    from transformers.utils import import_utils

    from tests.helpers import write_hf_llama

    assert importlib.util.find_spec("kernels").origin == kernels.__file__
    # transformers accepts `kernels` only within its supported version range; qshard's version is not
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    from transformers import AutoModelForCausalLM

    path = write_hf_llama(tmp_path, hidden=64, heads=4, kv_heads=2, intermediate=128, layers=1, vocab=64)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()

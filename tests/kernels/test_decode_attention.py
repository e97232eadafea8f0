"""Triton decode attention vs torch SDPA (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention

# CPU tensors run only under the interpreter (set by tests/conftest.py when there is no GPU)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_sdpa(device, heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(heads * 7 + kv_heads)
    B, D, slots, cap = 3, 32, 5, 150
    lengths = torch.tensor([1, 77, 150])
    slot_of = torch.tensor([4, 0, 2])
    q = torch.randn(B, heads, D, generator=g).to(device, dtype)
    k = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    v = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    out = decode_attention(q, k, v, slot_of.to(device), lengths.to(device), D ** -0.5, block_l=64)
    for b in range(B):
        n, s = int(lengths[b]), int(slot_of[b])
        ref = F.scaled_dot_product_attention(q[b:b + 1, :, None].double(), k[s:s + 1, :, :n].double(),
                                             v[s:s + 1, :, :n].double(), enable_gqa=True)[0, :, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out[b].double(), ref, atol=tol, rtol=tol), (out[b].double() - ref).abs().max()

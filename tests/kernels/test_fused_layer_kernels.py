"""The fused decode-layer kernels (add+RMSNorm, SiLU-and-mul, rotary+KV write) against the torch
path they replace: interpreter on CPU, compiled on CUDA. Float32 agrees to rounding; float16
bit for bit except where an exp/rsqrt implementation differs by an ulp."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from engine.layers.rotary import RotaryEmbedding
from kernels.fused_norm import add_rms_norm
from kernels.rotary_kv import rotary_kv
from kernels.silu_mul import silu_mul

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _same(got, want, device):
    """Equal, except bf16 under the interpreter, whose float32 -> bf16 casts truncate (1 ulp)."""
    if device == "cpu" and got.dtype == torch.bfloat16:
        return torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)
    return torch.equal(got, want)


def _tol(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _rms_ref(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:  # engine/layers/norm.py's formula
    f = h.float()
    return w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96])
def test_add_rms_norm(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g).to(device, dtype)
    res = torch.randn(5, n, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    want_res = x + res
    want = _rms_ref(want_res, w, 1e-6)
    got_res = res.clone()
    got = add_rms_norm(x, got_res, w, 1e-6)
    assert _same(got_res, want_res, device)  # the sum is rounded once to the dtype either way
    err = (got.double() - want.double()).abs().max().item()
    assert err <= _tol(dtype) * want.double().abs().max().item(), err
    # without a residual: the norm alone, x untouched
    x0 = x.clone()
    alone = add_rms_norm(x, None, w, 1e-6)
    assert torch.equal(x, x0)
    err = (alone.double() - _rms_ref(x, w, 1e-6).double()).abs().max().item()
    assert err <= _tol(dtype) * 8, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(device, dtype):
    g = torch.Generator().manual_seed(1)
    n = 1500  # not a multiple of the block: the tail is masked
    x = (3 * torch.randn(3, 2 * n, generator=g)).to(device, dtype)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = silu_mul(x)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= _tol(dtype) * want.double().abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_rotary_kv_write(device, dtype, heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    D, T, slots, cap = 32, 4, 3, 20
    rotary = RotaryEmbedding(D, 64, 10000.0, None, dtype, torch.device(device))
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g).to(device, dtype)
    positions = torch.tensor([0, 7, 19, 3], device=device)
    token_slots = torch.tensor([2, 0, 1, 0], device=device)
    # the torch path: rotate, then index_put into the cache
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q_ref, k_ref = rotary(positions, q.reshape(T, heads, D), k.reshape(T, kv_heads, D))
    v_ref = v.reshape(T, kv_heads, D)
    poison = torch.full((slots, kv_heads, cap, D), 7.0, dtype=dtype, device=device)
    k_want, v_want = poison.clone(), poison.clone()
    k_want[token_slots, :, positions] = k_ref
    v_want[token_slots, :, positions] = v_ref
    k_cache, v_cache = poison.clone(), poison.clone()
    got = qkv.clone()
    rotary_kv(got, heads, kv_heads, D, positions, rotary.cos, rotary.sin, token_slots, k_cache, v_cache)
    tol = _tol(dtype) * 4
    q_got, k_got, v_got = got.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    assert torch.allclose(q_got.reshape(T, heads, D).double(), q_ref.double(), atol=tol, rtol=0)
    assert torch.allclose(k_got.reshape(T, kv_heads, D).double(), k_ref.double(), atol=tol, rtol=0)
    assert torch.equal(v_got, v)  # values pass through unrotated
    assert torch.allclose(k_cache.double(), k_want.double(), atol=tol, rtol=0)
    assert _same(v_cache, v_want, device)  # only (slot, position) rows written; the rest still poison
    # without a cache: the rotation alone
    alone = qkv.clone()
    rotary_kv(alone, heads, kv_heads, D, positions, rotary.cos, rotary.sin)
    assert torch.equal(alone, got)

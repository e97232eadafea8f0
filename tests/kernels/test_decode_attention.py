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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits, min_chunk", [(2, 16), (3, 16), (8, 16), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_length_matches_sdpa(device, splits, min_chunk, dtype):
    """Flash-decoding splits combine to the unsplit result, whether a sequence takes several chunks,
    one (written directly), or leaves launched splits empty; query and output rows are picked by
    `tokens`, other output rows stay untouched."""
    g = torch.Generator().manual_seed(splits)
    heads, kv_heads, D, slots, cap, T = 8, 2, 32, 4, 200, 6
    lengths = torch.tensor([1, 70, 200, 33])
    slot_of = torch.tensor([3, 1, 0, 2])
    tokens = torch.tensor([5, 0, 2, 3])  # rows 1 and 4 are not decode tokens
    q = torch.randn(T, heads, D, generator=g).to(device, dtype)
    k = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    v = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    out = torch.full((T, heads, D), 9.0, dtype=dtype, device=device)
    for _ in range(2):  # twice: the tickets must be left zeroed for the next launch
        decode_attention(q, k, v, slot_of.to(device), lengths.to(device), D ** -0.5, block_l=16, splits=splits,
                         tokens=tokens.to(device), out=out, min_chunk=min_chunk)
        for b in range(4):
            n, s, t = int(lengths[b]), int(slot_of[b]), int(tokens[b])
            ref = F.scaled_dot_product_attention(q[t:t + 1, :, None].double(), k[s:s + 1, :, :n].double(),
                                                 v[s:s + 1, :, :n].double(), enable_gqa=True)[0, :, 0]
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.allclose(out[t].double(), ref, atol=tol, rtol=tol), (out[t].double() - ref).abs().max()
        assert (out[[1, 4]] == 9.0).all()


def test_choose_splits():
    from kernels.decode_attention import choose_splits

    assert choose_splits(64, 32, 4096, 132) == 1  # enough (sequence, KV head) pairs already
    assert choose_splits(1, 32, 4096, 132) == 5  # 132 / 32 -> 5 programs per pair fill the GPU
    assert choose_splits(1, 32, 272, 132) == 2  # chunks of >= 256 positions: two at most
    assert choose_splits(1, 32, 200, 132) == 1
    assert choose_splits(1, 8, 8192, 132) == 17


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits, block_l, warps", [(1, 16, 4), (3, 16, 4), (1, 32, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_fused_equals_rotary_kv_then_attention(device, splits, block_l, warps, dtype):
    """rotary=(cos, sin): the kernel rotates the QKV row, stores the new key/value and attends to
    them, as rotary_kv followed by the plain kernel does; the caches end up equal."""
    from engine.layers.rotary import RotaryEmbedding
    from kernels.rotary_kv import rotary_kv

    g = torch.Generator().manual_seed(11 + splits + block_l)
    heads, kv_heads, D, slots, cap = 6, 2, 32, 3, 80
    lengths = torch.tensor([1, 50, 80])  # the new token sits at length - 1 (first position: an empty cache)
    slot_of = torch.tensor([2, 0, 1])
    rotary = RotaryEmbedding(D, 128, 10000.0, None, dtype, torch.device(device))
    qkv = torch.randn(3, (heads + 2 * kv_heads) * D, generator=g).to(device, dtype)
    k = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    v = torch.randn(slots, kv_heads, cap, D, generator=g).to(device, dtype)
    dev = dict(device=device)
    # reference: rotate and store, then attend with the plain kernel
    k_ref, v_ref, qkv_ref = k.clone(), v.clone(), qkv.clone()
    rotary_kv(qkv_ref, heads, kv_heads, D, (lengths - 1).to(**dev), rotary.cos, rotary.sin, slot_of.to(**dev),
              k_ref, v_ref)
    want = decode_attention(qkv_ref[:, :heads * D].view(3, heads, D), k_ref, v_ref, slot_of.to(**dev),
                            lengths.to(**dev), D ** -0.5, block_l=16, splits=splits, min_chunk=16)
    got = decode_attention(qkv, k, v, slot_of.to(**dev), lengths.to(**dev), D ** -0.5, block_l=block_l,
                           splits=splits, rotary=(rotary.cos, rotary.sin), min_chunk=16, num_warps=warps)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), want.double(), atol=tol, rtol=tol), (got.double() - want.double()).abs().max()

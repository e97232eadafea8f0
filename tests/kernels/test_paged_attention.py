"""Paged Triton decode attention vs a torch reference over the same block tables (interpreter on
CPU, compiled on CUDA): fp32/fp16, GQA, lengths not multiples of the block, several splits, and
the rotary + cache-write fused form."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_decode_attention

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.cuda)]


def _tables(lengths: list[int], block_size: int, num_blocks: int, g: torch.Generator) -> torch.Tensor:
    """Each sequence's blocks, drawn without repeats from a shuffled pool (padded with block 0)."""
    need = [-(-n // block_size) for n in lengths]
    pool = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    rows = []
    for n in need:
        rows.append(pool[:n] + [0] * (width - n))
        pool = pool[n:]
    return torch.tensor(rows, dtype=torch.int32)


def _reference(q, k_cache, v_cache, tables, lengths, scale):
    """float64 SDPA of each sequence over its gathered positions."""
    bs = k_cache.shape[2]
    out = []
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        blocks = tables[b].long()[pos // bs]
        keys = k_cache[blocks, :, pos % bs].transpose(0, 1)[None].double()  # [1, Hkv, n, D]
        values = v_cache[blocks, :, pos % bs].transpose(0, 1)[None].double()
        out.append(F.scaled_dot_product_attention(q[b:b + 1, :, None].double(), keys, values, scale=scale,
                                                  enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits, block_size", [(1, 16), (3, 8)])
def test_paged_matches_reference(device, heads, kv_heads, dtype, splits, block_size):
    g = torch.Generator().manual_seed(heads + 10 * splits + block_size)
    D, num_blocks = 32, 40
    lengths = [1, 37, 100, 16]  # one position, a part block, several blocks, exactly one block
    tables = _tables(lengths, block_size, num_blocks, g)
    q = torch.randn(len(lengths), heads, D, generator=g).to(dtype)
    k = torch.randn(num_blocks, kv_heads, block_size, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, kv_heads, block_size, D, generator=g).to(dtype)
    ref = _reference(q, k, v, tables, lengths, D ** -0.5)
    for _ in range(2):  # twice: split tickets must be left zeroed
        out = paged_decode_attention(q.to(device), k.to(device), v.to(device), tables.to(device),
                                     torch.tensor(lengths, dtype=torch.int32, device=device), D ** -0.5,
                                     block_l=16, splits=splits, min_chunk=16)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (out.double().cpu() - ref).abs().max().item()
        assert err < tol, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rotary_write_matches_unfused(device, dtype):
    """The rotary form: query and key rotated, key and value stored at (block, offset) of position
    length - 1, attention over it = rotate + store by hand, then the plain kernel."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, D, bs, num_blocks = 8, 2, 32, 16, 24
    lengths = [5, 33, 48]
    tables = _tables(lengths, bs, num_blocks, g)
    k = torch.randn(num_blocks, kv_heads, bs, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, kv_heads, bs, D, generator=g).to(dtype)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * D, generator=g).to(dtype)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), 1.0 / (10000 ** (torch.arange(0, D, 2) / D)))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # by hand: rotate q and the new k as engine/layers/rotary.py does, store, attend
    q = qkv[:, :heads * D].view(3, heads, D)
    new_k = qkv[:, heads * D:(heads + kv_heads) * D].view(3, kv_heads, D)
    new_v = qkv[:, (heads + kv_heads) * D:].view(3, kv_heads, D)
    pos = torch.tensor(lengths) - 1

    def rot(x):
        c, s = cos[pos][:, None], sin[pos][:, None]
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

    k_want, v_want = k.clone(), v.clone()
    blocks = tables[torch.arange(3), pos // bs].long()
    k_want[blocks, :, pos % bs] = rot(new_k)
    v_want[blocks, :, pos % bs] = new_v
    ref = _reference(rot(q), k_want, v_want, tables, lengths, D ** -0.5)
    kd, vd = k.to(device), v.to(device)
    out = paged_decode_attention(qkv.to(device), kd, vd, tables.to(device),
                                 torch.tensor(lengths, dtype=torch.int32, device=device), D ** -0.5, block_l=16,
                                 splits=2, min_chunk=16, rotary=(cos.to(device), sin.to(device)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (kd.cpu() - k_want).abs().max().item() < tol and torch.equal(vd.cpu(), v_want)
    assert (out.double().cpu() - ref).abs().max().item() < tol


def test_bad_tables_refused():
    q = torch.zeros(2, 4, 32)
    k = torch.zeros(4, 2, 16, 32)
    with pytest.raises(ValueError, match="block tables"):
        paged_decode_attention(q, k, k, torch.zeros(3, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                               0.1)

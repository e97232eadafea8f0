"""The LUT4 (bitsandbytes nf4/fp4) Triton kernel, interpreted on CPU (compiled on CUDA), against the
reference dequantization; and the CPU dispatch taking the dequantized fallback."""

from __future__ import annotations

import pytest
import torch

from kernels import linear, prepare
from kernels.layouts import LUT4Layout
from kernels.reference import dequantize, reference_matmul

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), and its FP4 table
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0.0, 0.0052, 0.6667, 1.0, 0.3333, 0.5, 0.1667, 0.25, -0.0, -0.0052, -0.6667, -1.0, -0.3333, -0.5,
       -0.1667, -0.25]


def random_layout(n: int, k: int, blocksize: int, table, seed: int = 0, device="cpu") -> LUT4Layout:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand(n, k // blocksize, generator=gen) * 0.1 + 0.01
    return LUT4Layout(q.to(device), absmax.to(device), torch.tensor(table).to(device), blocksize)


@pytest.mark.parametrize("m,n,k,blocksize,table,dtype", [
    (1, 48, 128, 64, NF4, torch.float32),
    (5, 40, 256, 128, FP4, torch.float32),
    (17, 64, 64, 32, NF4, torch.float32),
    (3, 32, 192, 64, NF4, torch.bfloat16),
])
def test_kernel_matches_reference(triton_device, m, n, k, blocksize, table, dtype):
    layout = random_layout(n, k, blocksize, table, seed=m, device=triton_device)
    prepared = prepare(layout, dtype, backend="triton")
    assert prepared.backend == "triton"
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(dtype).to(triton_device)
    want = reference_matmul(x.cpu(), LUT4Layout(layout.qweight.cpu(), layout.absmax.cpu(), layout.table.cpu(),
                                                blocksize))
    got = linear(x, prepared).double().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol), (got - want).abs().max()
    assert torch.equal(prepared.dequantize().cpu(), dequantize(layout).cpu())


def test_cpu_dispatch_dequantizes():
    layout = random_layout(24, 128, 64, NF4)
    prepared = prepare(layout, torch.bfloat16)
    assert prepared.backend == "dequant"
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert torch.equal(linear(x, prepared), torch.nn.functional.linear(x, dequantize(layout).to(torch.bfloat16)))


def test_reference_nibble_order():
    # byte 0x1F: k=0 takes code 1 (high nibble), k=1 code 15 (low nibble)
    layout = LUT4Layout(torch.tensor([[0x1F] + [0] * 31], dtype=torch.uint8), torch.full((1, 1), 2.0),
                        torch.tensor(NF4), 64)
    w = dequantize(layout)
    assert w[0, 0].item() == pytest.approx(2 * NF4[1]) and w[0, 1].item() == 2.0 and w[0, 2].item() == -2.0

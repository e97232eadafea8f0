"""The LUT4 (bitsandbytes nf4/fp4) Triton kernel, interpreted on CPU (compiled on CUDA), against the
reference dequantization; and the CPU dispatch taking the dequantized fallback."""

from __future__ import annotations

from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]
COMPILE = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.lut_matmul import _lut_matmul

for act, dot_f32 in (("*bf16", False), ("*fp32", True)):  # fp16 takes the bf16 path
    consts = dict(BLOCKSIZE=64, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT_F32=dot_f32)
    pointers = {"x_ptr": act, "w_ptr": "*u8", "a_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": act}
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in inspect.signature(_lut_matmul).parameters}
    k = triton.compile(ASTSource(fn=triton.jit(_lut_matmul), signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))
    assert len(k.asm["cubin"]) > 1000 and ".target sm_90" in k.asm["ptx"], act
    print(act, "sm_90 cubin", len(k.asm["cubin"]), "bytes")
"""


def test_kernel_compiles_for_hopper(tmp_path):
    """Triton lowers the kernel to sm_90 machine code here, without a GPU (ptxas ships with triton). In a
    fresh process: after interpreted launches, compiling in the same process fails inside triton."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("sm_90 cubin") == 2

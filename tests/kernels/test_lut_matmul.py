"""The LUT4 (bitsandbytes nf4/fp4) Triton kernel, interpreted on CPU (compiled on CUDA), against the
reference dequantization; and the CPU dispatch taking the dequantized fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import linear, prepare
from kernels.errors import InputError
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


def reference_y(x: torch.Tensor, layout: LUT4Layout) -> torch.Tensor:
    """float64 x @ W^T, W from the reference dequantization (on CPU)."""
    cpu = LUT4Layout(layout.qweight.cpu(), layout.absmax.cpu(), layout.table.cpu(), layout.blocksize)
    return x.cpu().double() @ dequantize(cpu).double().T


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    got = got.double().cpu()
    assert not got.isnan().any(), "an output element was never written"
    assert torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol), (got - want).abs().max()


# (m, n, k, blocksize, dtype, block_k, split): n is never a multiple of block_n (8 for the GEMV, 32 for
# the dot); K a multiple of the blocksize and, where the step spans several absmax blocks, not of block_k
PATH_CASES = [
    (1, 44, 320, 64, torch.float32, 128, 1),  # 2.5 steps of 2 sub-blocks
    (1, 44, 320, 64, torch.bfloat16, 128, 3),
    (3, 44, 384, 128, torch.float16, 256, 1),  # 1.5 steps of 2 sub-blocks
    (3, 44, 224, 32, torch.float32, 128, 2),  # 1.75 steps of 4 sub-blocks
    (5, 44, 320, 64, torch.bfloat16, 128, 2),
    (5, 44, 384, 128, torch.float32, 128, 3),  # one sub-block a step, K in whole steps
    (17, 44, 224, 32, torch.float16, 128, 1),
    (17, 44, 320, 64, torch.float32, 128, 3),
]


@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "dot"])
@pytest.mark.parametrize("m,n,k,blocksize,dtype,block_k,split", PATH_CASES)
def test_paths_match_reference(triton_device, gemv, m, n, k, blocksize, dtype, block_k, split):
    """Either path at any M (the GEMV taking M in tiles of up to 4 rows, the dot in 16s), split or not,
    into a NaN-poisoned y whose rows are longer than N: every element of y[:, :N] is written, nothing
    past it, and a split leaves the shared workspace and counters zeroed for the next call."""
    from kernels.lut_matmul import LutConfig
    from kernels.triton_backend import split_workspace

    layout = random_layout(n, k, blocksize, NF4 if m % 2 else FP4, seed=m + k, device=triton_device)
    prepared = prepare(layout, dtype, backend="triton")
    cfg = LutConfig(gemv, min(4, 1 << (m - 1).bit_length()) if gemv else 16, 8 if gemv else 32, block_k, split)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(triton_device)
    y_rows = torch.full((m, n + 5), float("nan"), dtype=dtype, device=triton_device)
    prepared.launch(x, y_rows[:, :n], cfg)
    assert_close(y_rows[:, :n], reference_y(x, layout), dtype)
    assert y_rows[:, n:].isnan().all()
    if split > 1:
        ws, locks = split_workspace(x.device, 0, 0)
        assert not ws.any() and not locks.any()


@pytest.mark.parametrize("decode", ["auto", "select", "gather"])
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (3, torch.float32), (5, torch.float16),
                                     (17, torch.bfloat16)])
def test_dispatch_matches_reference(triton_device, monkeypatch, decode, m, dtype):
    """linear() through the configuration matmul picks (GEMV up to GEMV_MAX_M rows), both decodes."""
    from kernels.lut_matmul import GEMV_MAX_M

    monkeypatch.setenv("QSHARD_LUT_DECODE", decode)
    layout = random_layout(36, 320, 64, NF4, seed=m, device=triton_device)
    prepared = prepare(layout, dtype, backend="triton")
    assert prepared.decode == decode
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).to(dtype).to(triton_device)
    assert prepared.config_for(m, x.device).gemv == (m <= GEMV_MAX_M)
    assert_close(linear(x, prepared), reference_y(x, layout), dtype)
    assert prepared.matmul(x[:0]).shape == (0, 36)


def test_choose_config_splits_for_the_sms():
    """From the shapes alone: ~2 programs per SM, no empty split, interpreted sizes small."""
    from kernels.lut_matmul import LutConfig, choose_config

    qkv = choose_config(1, 12288, 4096, 132)  # Llama-2-7B's qkv: enough rows without a split
    assert qkv == LutConfig(True, 1, 16, 512, 1, 4)
    o = choose_config(1, 4096, 4096, 132)
    assert o.gemv and o.split_k == 2 and 4096 // o.block_n * o.split_k >= 2 * 132
    down = choose_config(4, 4096, 11008, 132)  # 21.5 steps of 512
    assert down.gemv and down.block_m == 4 and down.split_k == 2
    dot = choose_config(16, 12288, 4096, 132)
    assert not dot.gemv and dot.block_m == 16 and dot.block_k == 128 and dot.split_k == 2
    assert choose_config(128, 12288, 4096, 132) == LutConfig(False, 128, 64, 128, 2, 8)
    small = choose_config(1, 8, 1024, 132)  # 2 steps of K: at most 2 splits
    assert small.split_k == 2 and small.block_k == 512
    assert choose_config(1, 8, 192, 132).block_k == 256  # one (masked) step, no split
    assert choose_config(1, 8, 192, 132).split_k == 1
    assert choose_config(7, 12288, 4096, None) == LutConfig(False, 16, 32, 128, 1, 4)
    assert choose_config(2, 16, 4096, None) == LutConfig(True, 2, 8, 128, 2, 4)


def test_bad_configs_and_blocksizes_are_named():
    from kernels.lut_matmul import LutConfig

    for bad in [dict(block_k=8), dict(block_k=96), dict(block_m=3), dict(split_k=0), dict(gemv=False, block_m=8)]:
        with pytest.raises(InputError):
            LutConfig(**{**dict(gemv=True, block_m=1, block_n=8, block_k=64), **bad})
    with pytest.raises(InputError, match="multiple of 16"):
        prepare(random_layout(8, 64, 8, NF4), torch.float32, backend="triton")


def test_unknown_decode_is_named(monkeypatch):
    monkeypatch.setenv("QSHARD_LUT_DECODE", "magic")
    with pytest.raises(InputError, match="QSHARD_LUT_DECODE"):
        prepare(random_layout(8, 64, 64, NF4), torch.float32, backend="triton")


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

# (activations, GEMV, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DECODE_GATHER, MASK_K, num_warps): the configs
# choose_config takes on a GPU, both decodes; fp16 compiles as bf16 does
CONFIGS = [("*bf16", True, 1, 16, 512, 1, False, False, 4), ("*bf16", True, 4, 16, 512, 2, True, True, 4),
           ("*fp32", True, 2, 16, 512, 2, False, True, 4), ("*bf16", False, 16, 64, 128, 2, False, True, 4),
           ("*bf16", False, 128, 64, 128, 1, True, False, 8), ("*fp32", False, 64, 64, 128, 1, False, False, 4)]
for act, gemv, bm, bn, bk, split, gather, mask_k, warps in CONFIGS:
    consts = dict(BLOCKSIZE=64, SUB=64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GEMV=gemv,
                  DECODE_GATHER=gather, MASK_K=mask_k, DOT_F32=act == "*fp32")
    pointers = {"x_ptr": act, "w_ptr": "*u8", "a_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": act, "ws_ptr": "*fp32",
                "lock_ptr": "*i32"}
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in inspect.signature(_lut_matmul).parameters}
    k = triton.compile(ASTSource(fn=triton.jit(_lut_matmul), signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    assert len(k.asm["cubin"]) > 1000 and ".target sm_90" in k.asm["ptx"], act
    # the GEMV's decoded tile stays in registers: shared memory only for the small reductions
    assert not gemv or k.metadata.shared <= 4096, (gemv, gather, k.metadata.shared)
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
    assert out.stdout.count("sm_90 cubin") == 6

"""The Triton kernel against the float64 reference, every format, interpreted on CPU or compiled on CUDA.

Shapes are small and K/N are not multiples of the block sizes; outputs are NaN-poisoned so an
unwritten element fails; each case draws fresh random weights and activations.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from tests.kernels import kernel_factories as make
from tests.kernels.kernel_checks import assert_matches_reference

import kernels
from kernels import reference

# name -> (layout factory(gen), prepare options); K=200/300 and N=72/40 straddle every block size
CASES = {
    "gptq4-sym-g128": (lambda g: make.gptq(300, 72, 4, 128, gen=g), {}),
    "gptq4-asym-g128-actorder": (lambda g: make.gptq(300, 72, 4, 128, sym=False, act_order=True, gen=g), {}),
    "gptq4-asym-g32": (lambda g: make.gptq(200, 72, 4, 32, sym=False, gen=g), {}),
    "gptq4-sym-g32-actorder": (lambda g: make.gptq(200, 40, 4, 32, act_order=True, gen=g), {}),
    "gptq4-asym-perchannel": (lambda g: make.gptq(200, 72, 4, 200, sym=False, gen=g), {}),
    "gptq4-asym-unequal-groups": (lambda g: make.gptq(200, 72, 4, 128, sym=False, group_sizes=[40, 128, 32],
                                                      first_group=2, gen=g), {}),
    "gptq8-sym-g128": (lambda g: make.gptq(300, 40, 8, 128, gen=g), {}),
    "gptq8-asym-g64-actorder": (lambda g: make.gptq(200, 40, 8, 64, sym=False, act_order=True, gen=g), {}),
    "gptq3-asym-g32-actorder": (lambda g: make.gptq(200, 40, 3, 32, sym=False, act_order=True, gen=g), {}),
    "gptq3-sym-g64": (lambda g: make.gptq(200, 40, 3, 64, gen=g), {}),
    "gptq2-asym-g64": (lambda g: make.gptq(200, 40, 2, 64, sym=False, gen=g), {}),
    "gptq2-sym-g32-actorder": (lambda g: make.gptq(200, 40, 2, 32, act_order=True, gen=g), {}),
    "awq-g128-repacked": (lambda g: make.awq(256, 72, 128, gen=g), {}),
    "awq-g64-native": (lambda g: make.awq(192, 40, 64, gen=g), {"repack_awq": False}),
    "gptq4-asym-g128-actorder-even": (lambda g: make.gptq(256, 64, 4, 128, sym=False, act_order=True, gen=g), {}),
    "int8-perchannel": (lambda g: make.int8(200, 72, gen=g), {}),
    "int8-perchannel-even": (lambda g: make.int8(256, 64, gen=g), {}),
    "fp8-pertensor": (lambda g: make.fp8(200, 40, per_channel=False, gen=g), {}),
    "fp8-perchannel": (lambda g: make.fp8(200, 40, per_channel=True, gen=g), {}),
}


def _generator(*key) -> torch.Generator:
    # fresh inputs per case, reproducible per test id
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _run(prepared, x, config=None):
    y = torch.full((x.shape[0], prepared.out_features), float("nan"), dtype=x.dtype, device=x.device)
    out = prepared.matmul(x, config=config, out=y)
    assert out.data_ptr() == y.data_ptr()
    return y


def _assert_workspace_clean(device):
    from kernels.triton_backend import _WORKSPACES

    if device in _WORKSPACES:
        ws, locks = _WORKSPACES[device]
        assert not ws.any() and not locks.any(), "split-K left partial sums or counters behind"


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(triton_device, case, M):
    factory, options = CASES[case]
    gen = _generator(case, M)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton", **options)
    assert prepared.backend == "triton"
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16).to(triton_device)

    config = prepared.choose_config(M, x.device)
    assert_matches_reference(_run(prepared, x, config), x, layout)
    # the same tile split over K: partial sums meet in the workspace, which must be left zeroed
    split = dataclasses.replace(config, split_k=3)
    assert_matches_reference(_run(prepared, x, split), x, layout)
    _assert_workspace_clean(x.device)


@pytest.mark.parametrize("unpack", ["interleave", "slices"])
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("use_dot", [False, True], ids=["gemv", "dot"])
@pytest.mark.parametrize("case", ["gptq4-asym-g128-actorder", "gptq4-asym-g128-actorder-even",
                                  "gptq8-asym-g64-actorder", "gptq2-asym-g64", "gptq4-asym-unequal-groups",
                                  "awq-g64-native", "fp8-perchannel"])
def test_every_kernel_variant(triton_device, case, use_dot, M, unpack):
    """GEMV and dot tiles, K-packed words unpacked whole or code by code, split over K."""
    from kernels.triton_configs import KernelConfig

    if M > 1 and not use_dot:
        pytest.skip("the GEMV takes one row")
    factory, options = CASES[case]
    gen = _generator(case, use_dot, M, unpack)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton", **options)
    per_word = prepared.spec.per_word
    if unpack == "slices" and per_word == 1:
        pytest.skip("not packed along K")
    bk = 128 if per_word <= 8 else 256  # a slice of 32 // bits codes per word must hold ≥ 16 rows for a dot
    config = KernelConfig(use_dot, 16 if use_dot else 1, 32, bk, split_k=2, interleave=unpack == "interleave")
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16).to(triton_device)
    assert_matches_reference(_run(prepared, x, config), x, layout)
    _assert_workspace_clean(x.device)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["gptq4-sym-g128", "gptq4-asym-g128-actorder", "gptq4-asym-g128-actorder-even",
                                  "awq-g128-repacked"])
def test_lop3_unpack_matches_reference(case, dtype, M):
    """The compiled lop3/packed-fma 4-bit unpack (MAGIC_ASM; the interpreter runs no PTX), split and not."""
    from kernels.triton_backend import magic_asm_applies
    from kernels.triton_configs import KernelConfig

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    factory, options = CASES[case]
    gen = _generator("lop3", case, dtype, M)
    layout = make.to_device(factory(gen), "cuda")
    prepared = kernels.prepare(layout, dtype, backend="triton", **options)
    x = torch.randn(M, layout.in_features, generator=gen).to(dtype).cuda()
    block_k = 128
    for block_n, split in ((32, 1), (64, 2), (128, 3)):
        config = KernelConfig(True, 16 if M <= 16 else 32, block_n, block_k, split_k=split, interleave=False)
        assert magic_asm_applies(config, prepared.spec, prepared._scale_mode(config)[0], dtype, False), config
        assert_matches_reference(_run(prepared, x, config), x, layout)
        off = dataclasses.replace(config, magic_asm=False)
        torch.testing.assert_close(_run(prepared, x, config).float(), _run(prepared, x, off).float(),
                                   rtol=2e-2, atol=2e-2)
    _assert_workspace_clean(x.device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("case", ["gptq4-asym-g128-actorder", "gptq3-sym-g64", "int8-perchannel", "fp8-pertensor"])
def test_other_activation_dtypes(triton_device, case, M, dtype):
    factory, options = CASES[case]
    gen = _generator(case, M, dtype)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, dtype, backend="triton", **options)
    x = torch.randn(M, layout.in_features, generator=gen).to(dtype).to(triton_device)
    y = torch.full((M, layout.out_features), float("nan"), dtype=dtype, device=triton_device)
    prepared.matmul(x, out=y)
    assert_matches_reference(y, x, layout)


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_rebuilds_the_weight(triton_device, case):
    """The load-time conversion (sorting act-order rows, unpacking zeros, AWQ repacking) loses nothing."""
    factory, options = CASES[case]
    layout = make.to_device(factory(_generator(case)), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton", **options)
    assert prepared.layout is None
    torch.testing.assert_close(prepared.dequantize(), reference.dequantize(layout), rtol=0, atol=0)


def test_linear_keeps_leading_dims_and_empty_batches(triton_device):
    gen = _generator("leading")
    layout = make.to_device(make.gptq(200, 40, 4, 128, sym=False, gen=gen), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton")
    x = torch.randn(2, 3, 200, generator=gen).to(torch.bfloat16).to(triton_device)
    y = kernels.linear(x, prepared)
    assert y.shape == (2, 3, 40)
    assert_matches_reference(y.reshape(6, 40), x.reshape(6, 200), layout)
    assert kernels.linear(x[:, :0], prepared).shape == (2, 0, 40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_tuner_picks_and_caches_a_config(monkeypatch):
    from kernels.triton_configs import TUNER

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QSHARD_TRITON_TUNE", "1")
    gen = _generator("tuner")
    layout = make.to_device(make.gptq(4096, 1024, 4, 128, sym=False, act_order=True, gen=gen), "cuda")
    prepared = kernels.prepare(layout, torch.bfloat16)
    assert prepared.backend == "triton"
    for M in (1, 16, 128):
        x = torch.randn(M, 4096, generator=gen).to(torch.bfloat16).cuda()
        assert_matches_reference(kernels.linear(x, prepared), x, layout)
        first = prepared.choose_config(M, x.device)
        assert prepared.choose_config(M, x.device) is first  # cached: no timing after warm-up
    assert len(TUNER.best) >= 3

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


@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("use_dot", [False, True], ids=["gemv", "dot"])
@pytest.mark.parametrize("case", ["gptq4-asym-g128-actorder", "gptq8-asym-g64-actorder", "gptq2-sym-g32-actorder"])
def test_act_order_with_x_permuted_before_the_launch(triton_device, case, use_dot, M):
    """permute_x: x's columns put in the sorted rows' order by one index_select, then the plain
    kernel (no permutation inside), split over K and not; and the tuner offers it for act-order only."""
    from kernels.triton_configs import KernelConfig, candidates

    if M > 1 and not use_dot:
        pytest.skip("the GEMV takes one row")
    factory, options = CASES[case]
    gen = _generator("permute-x", case, use_dot, M)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton", **options)
    assert prepared.spec.has_perm
    bk = 128 if prepared.spec.per_word <= 8 else 256
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16).to(triton_device)
    for split in (1, 2):
        config = KernelConfig(use_dot, 16 if use_dot else 1, 32, bk, split_k=split, permute_x=True)
        assert not prepared._constexprs(config, x.dtype)["PERM"]
        assert_matches_reference(_run(prepared, x, config), x, layout)
    _assert_workspace_clean(x.device)
    plain = candidates(M, 4096, 4096, 8, 132)
    offered = candidates(M, 4096, 4096, 8, 132, permuted=True)
    assert not any(c.permute_x for c in plain) and len(offered) == 2 * len(plain)


@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["gptq4-sym-g128", "gptq4-asym-g128-actorder", "gptq4-asym-g128-actorder-even",
                                  "awq-g128-repacked"])
def test_lop3_unpack_matches_reference(triton_device, case, dtype, M):
    """The lop3/packed-fma 4-bit unpack (MAGIC_ASM: PTX compiled, emulated when interpreted), its
    slices as eight dots or joined into one, split over K and not."""
    from kernels.triton_backend import magic_asm_applies
    from kernels.triton_configs import KernelConfig

    if triton_device.type == "cpu" and (M in (5, 16) or case in ("awq-g128-repacked", "gptq4-asym-g128-actorder-even")):
        pytest.skip("interpreted: a few shapes suffice for the slice order (compiled on CUDA: all)")
    factory, options = CASES[case]
    gen = _generator("lop3", case, dtype, M)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, dtype, backend="triton", **options)
    x = torch.randn(M, layout.in_features, generator=gen).to(dtype).to(triton_device)
    shapes = ((32, 1, False), (64, 2, True)) if triton_device.type == "cpu" else (
        (32, 1, False), (64, 2, True), (128, 3, False), (64, 1, True), (128, 2, True))
    for block_n, split, joined in shapes:
        config = KernelConfig(True, 16 if M <= 16 else 32, block_n, 128, split_k=split, interleave=False,
                              joined=joined)
        assert magic_asm_applies(config, prepared.spec, prepared._scale_mode(config)[0], dtype), config
        assert_matches_reference(_run(prepared, x, config), x, layout)
    _assert_workspace_clean(x.device)


@pytest.mark.parametrize("case", ["gptq4-sym-g128", "gptq4-asym-g128-actorder", "gptq4-asym-unequal-groups",
                                  "gptq8-asym-g64-actorder", "gptq2-sym-g32-actorder", "awq-g128-repacked"])
def test_dequantized_cublas_path(triton_device, case):
    """Large M: the weight dequantized by one launch (act-order rows back in their own columns) equals
    dequantize() rounded once, and the cuBLAS matmul over it matches the reference."""
    from kernels.triton_configs import KernelConfig

    factory, options = CASES[case]
    gen = _generator("dequant-mm", case)
    layout = make.to_device(factory(gen), triton_device)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="triton", **options)
    config = KernelConfig(True, 64, 32, 64, dequant_mm=True)
    dense = prepared.dense_weight(torch.bfloat16, config)
    if triton_device.type == "cuda":  # rounded once, to nearest
        torch.testing.assert_close(dense, reference.dequantize(layout).to(torch.bfloat16), rtol=0, atol=0)
    else:  # the interpreter's float32 → bf16 conversion truncates: within one bf16 ulp
        torch.testing.assert_close(dense.float(), reference.dequantize(layout), rtol=2 ** -7, atol=0)
    x = torch.randn(70, layout.in_features, generator=gen).to(torch.bfloat16).to(triton_device)
    assert_matches_reference(_run(prepared, x, config), x, layout)


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

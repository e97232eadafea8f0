"""CPU backends (the AMX kernel, torch's int4/int8 weight-only ops in bf16, the dequantized
fallback) and the automatic choice between them, against the float64 reference."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.kernels import kernel_factories as make
from tests.kernels.kernel_checks import assert_matches_reference, bf16_cpu_backend

import kernels
from kernels import reference

# name -> (layout factory(gen), backend "auto" picks without AMX); K multiples of 32, N of 16 where the ops apply
CASES = {
    "gptq4-sym-g128": (lambda g: make.gptq(256, 48, 4, 128, gen=g), "cpu-int4"),
    "gptq4-asym-g128-actorder": (lambda g: make.gptq(384, 48, 4, 128, sym=False, act_order=True, gen=g), "cpu-int4"),
    "gptq4-asym-g32-actorder": (lambda g: make.gptq(192, 32, 4, 32, sym=False, act_order=True, gen=g), "cpu-int4"),
    "gptq4-asym-perchannel": (lambda g: make.gptq(320, 48, 4, 320, sym=False, gen=g), "cpu-int4"),
    "gptq4-unequal-groups": (lambda g: make.gptq(320, 48, 4, 128, sym=False, group_sizes=[64, 128, 128],
                                                 first_group=3, gen=g), "cpu-int4"),
    "gptq3-asym-g64-actorder": (lambda g: make.gptq(256, 32, 3, 64, sym=False, act_order=True, gen=g), "cpu-int4"),
    "gptq2-sym-g32": (lambda g: make.gptq(256, 32, 2, 32, gen=g), "cpu-int4"),
    "gptq8-asym-g128-actorder": (lambda g: make.gptq(256, 48, 8, 128, sym=False, act_order=True, gen=g), "cpu-int4"),
    "gptq8-sym-perchannel": (lambda g: make.gptq(256, 40, 8, 256, gen=g), "cpu-int8"),
    "gptq8-asym-perchannel-actorder": (lambda g: make.gptq(256, 40, 8, 256, sym=False, act_order=True, gen=g),
                                       "cpu-int8"),
    "awq-g128": (lambda g: make.awq(256, 48, 128, gen=g), "cpu-int4"),
    "int8-perchannel": (lambda g: make.int8(192, 40, gen=g), "cpu-int8"),
    # what the ops cannot express falls back to the dequantized weight
    "fp8-perchannel": (lambda g: make.fp8(192, 40, per_channel=True, gen=g), "dequant"),
    "gptq4-odd-N": (lambda g: make.gptq(256, 40, 4, 128, gen=g), "dequant"),
    "gptq4-odd-K": (lambda g: make.gptq(200, 48, 4, 128, gen=g), "dequant"),
    "gptq4-groups-straddle-32-rows": (lambda g: make.gptq(200, 48, 4, 128, group_sizes=[40, 128, 32], gen=g),
                                      "dequant"),
    "int8-odd-K": (lambda g: make.int8(200, 40, gen=g), "dequant"),
}


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("case", list(CASES))
def test_auto_backend_in_bf16(case, M):
    factory, expected = CASES[case]
    gen = _generator(case, M)
    layout = factory(gen)
    prepared = kernels.prepare(layout, torch.bfloat16)
    assert prepared.backend == bf16_cpu_backend(layout, expected), kernels.choose_backend(layout, torch.bfloat16)
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


@pytest.mark.parametrize("M", [1, 16, 33])
@pytest.mark.parametrize("case", [c for c, (_, b) in CASES.items() if b in ("cpu-int4", "cpu-int8")])
def test_torch_op_backends_by_name(case, M):
    """torch's ops stay correct where they would be picked (CPUs without AMX)."""
    factory, backend = CASES[case]
    gen = _generator(case, M, backend)
    layout = factory(gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend=backend)
    assert prepared.backend == backend
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", ["gptq4-asym-g128-actorder", "int8-perchannel", "awq-g128"])
def test_other_dtypes_use_the_dequantized_weight(case, dtype):
    """The torch ops are slow outside bf16 (3.3 ms vs 0.46 ms for fp32 F.linear at 2048²), so no."""
    factory, _ = CASES[case]
    gen = _generator(case, dtype)
    layout = factory(gen)
    prepared = kernels.prepare(layout, dtype)
    assert prepared.backend == "dequant"
    x = torch.randn(5, layout.in_features, generator=gen).to(dtype)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


@pytest.mark.parametrize("case", [c for c, (_, b) in CASES.items() if b != "dequant"])
def test_dequantize_is_the_reference(case):
    factory, _ = CASES[case]
    layout = factory(_generator(case))
    prepared = kernels.prepare(layout, torch.bfloat16)
    torch.testing.assert_close(prepared.dequantize(), reference.dequantize(layout), rtol=0, atol=0)
    lean = kernels.prepare(layout, torch.bfloat16, keep_layout=False)
    with pytest.raises(RuntimeError, match="keep_layout"):
        lean.dequantize()


def test_linear_checks_dtype_and_width():
    layout = make.int8(64, 32, gen=_generator("checks"))
    prepared = kernels.prepare(layout, torch.bfloat16)
    with pytest.raises(TypeError, match="prepared for"):
        kernels.linear(torch.randn(2, 64), prepared)
    with pytest.raises(ValueError, match="features"):
        kernels.linear(torch.randn(2, 63).bfloat16(), prepared)
    assert kernels.linear(torch.randn(4, 3, 64).bfloat16(), prepared).shape == (4, 3, 32)
    assert kernels.linear(torch.randn(0, 64).bfloat16(), prepared).shape == (0, 32)


def test_non_contiguous_activations():
    gen = _generator("strided")
    layout = make.gptq(256, 48, 4, 128, sym=False, act_order=True, gen=gen)
    prepared = kernels.prepare(layout, torch.bfloat16)
    x = torch.randn(256, 6, generator=gen).to(torch.bfloat16).T  # stride (1, 6)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)

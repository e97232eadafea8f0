"""The AMX CPU kernel (kernels/cpu_amx.c) against the float64 reference, its packing, and its build."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.kernels import kernel_factories as make
from tests.kernels.kernel_checks import assert_matches_reference

import kernels
from kernels import cpu_amx, native_build
from kernels.layouts import GPTQLayout
from tests.kernels.kernel_factories import pack_int32

needs_amx = pytest.mark.skipif(cpu_amx.available() is not None, reason=f"AMX kernel unavailable: {cpu_amx.available()}")

CASES = {
    "gptq4-sym-g128": lambda g: make.gptq(256, 48, 4, 128, gen=g),
    "gptq4-asym-g32-actorder": lambda g: make.gptq(192, 32, 4, 32, sym=False, act_order=True, gen=g),
    "gptq4-unequal-groups": lambda g: make.gptq(320, 48, 4, 128, sym=False, group_sizes=[64, 128, 128],
                                                first_group=3, gen=g),
    "gptq3-asym-g64-actorder": lambda g: make.gptq(256, 32, 3, 64, sym=False, act_order=True, gen=g),
    "gptq2-sym-g32": lambda g: make.gptq(256, 32, 2, 32, gen=g),
    # K = 32 mod 64: chunks of 32 rows, the activations' last 32 values on their own
    "gptq4-g32-odd-K": lambda g: make.gptq(160, 32, 4, 32, sym=False, gen=g),
    "gptq8-asym-g128-actorder": lambda g: make.gptq(256, 48, 8, 128, sym=False, act_order=True, gen=g),
    "gptq8-sym-perchannel": lambda g: make.gptq(256, 48, 8, 256, gen=g),
    "awq-g128": lambda g: make.awq(256, 48, 128, gen=g),
    # one block of K rows (2048 > any group run): the per-channel int8 path; a few 16-column panels
    "int8-perchannel-wide-K": lambda g: make.int8(2048, 64, gen=g),
    # the default model's K: a block of 9 chunks (spans of 3 in the plane-major path)
    "int8-perchannel-K576": lambda g: make.int8(576, 48, gen=g),
    "gptq4-g128-wide-K": lambda g: make.gptq(2048, 80, 4, 128, sym=False, gen=g),
}


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@needs_amx
# digits (M <= 16): one A tile up to M = 8, then a tile per plane; bf16 beyond: 2, 3, 5 tiles
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 13, 16, 17, 40, 70])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, M):
    gen = _generator(case, M)
    layout = CASES[case](gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


@needs_amx
def test_auto_picks_it_and_large_activations_stay_accurate():
    """x with magnitude 100: the zero points cancel in fp32, not in the bf16 output."""
    gen = _generator("large")
    layout = make.gptq(512, 32, 4, 64, sym=False, gen=gen)
    prepared = kernels.prepare(layout, torch.bfloat16)
    assert prepared.backend == "cpu-amx"
    x = (100 * torch.randn(3, 512, generator=gen)).to(torch.bfloat16)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


def _rows_with_outliers(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Every third row has one element 1000x its others (like the outlier channels of real activations)."""
    x = torch.randn(M, K, generator=gen)
    x[::3, 7] = 1000.0
    return x.to(torch.bfloat16)


@needs_amx
@pytest.mark.parametrize("M", [3, 12, 23])  # digit planes (one tile, a tile per plane), bf16
@pytest.mark.parametrize("case", ["gptq4-sym-g128", "gptq8-asym-g128-actorder", "int8-perchannel-wide-K"])
def test_outlier_rows_stay_accurate(case, M):
    gen = _generator("outliers", case, M)
    layout = CASES[case](gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = _rows_with_outliers(M, layout.in_features, gen)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


@needs_amx
def test_a_rows_result_does_not_depend_on_its_batch_within_a_path():
    """Rows are scaled one by one and tile sums are per row: alone or in a batch that takes the
    same path (digits up to M = 16, in one A tile or a tile per plane; bf16 beyond), the same bits."""
    gen = _generator("batch-invariance")
    layout = CASES["gptq4-asym-g32-actorder"](gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = _rows_with_outliers(40, layout.in_features, gen)
    sixteen = kernels.linear(x[:16], prepared)
    for m in (0, 4, 15):
        assert torch.equal(kernels.linear(x[m:m + 1], prepared), sixteen[m:m + 1]), m
    assert torch.equal(kernels.linear(x[2:10], prepared), sixteen[2:10])
    assert torch.equal(kernels.linear(x[3:14], prepared), sixteen[3:14])
    together = kernels.linear(x, prepared)
    assert torch.equal(kernels.linear(x[16:33], prepared), together[16:33])
    assert torch.equal(kernels.linear(x[20:40], prepared), together[20:40])


@needs_amx
@pytest.mark.parametrize("M", [6, 12, 20])  # digit planes (one tile, a tile per plane), bf16
def test_extreme_and_non_finite_activations(M):
    gen = _generator("extremes", M)
    layout = CASES["gptq4-sym-g128"](gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = torch.randn(M, layout.in_features, generator=gen)
    x[0] = 0.0
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3, :16] *= 1e-38  # bf16 subnormals next to normal values
    finite = x.to(torch.bfloat16)
    y = kernels.linear(finite, prepared)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert_matches_reference(y[1:], finite[1:], layout)
    bad = finite.clone()
    bad[4, 3], bad[5, 9] = float("inf"), float("nan")
    y = kernels.linear(bad, prepared)
    assert torch.isnan(y[4:6]).all()
    keep = [m for m in range(M) if m not in (4, 5)]
    assert torch.equal(y[keep], kernels.linear(finite, prepared)[keep])


@pytest.mark.parametrize("kc", [64, 32])
def test_pack_codes_places_each_code_where_the_kernel_reads_it(kc):
    """Byte 64 i + 4 col + p of a chunk's B tile holds k = 4 i + p; 4-bit: tile rows kc / 8 and up are high nibbles."""
    K, n = 128, 32
    codes = torch.randint(0, 16, (K, n), generator=_generator("pack4", kc), dtype=torch.int32)
    packed = cpu_amx.pack_codes(codes, 4, kc).view(n // 16, K // kc, kc // 8, 16, 4)  # [panel, chunk, i, col, p]
    for k, col in [(0, 0), (1, 0), (2, 5), (17, 3), (31, 15), (33, 20), (63, 31), (100, 7), (127, 30)]:
        chunk, r = divmod(k, kc)
        half, rest = divmod(r, kc // 2)
        i, p = divmod(rest, 4)
        byte = int(packed[col // 16, chunk, i, col % 16, p])
        assert (byte >> (4 * half)) & 15 == int(codes[k, col]), (k, col)
    codes8 = torch.randint(0, 256, (K, n), generator=_generator("pack8", kc), dtype=torch.int32)
    packed8 = cpu_amx.pack_codes(codes8, 8, kc).view(n // 16, K // kc, kc // 4, 16, 4)
    assert int(packed8[1, 1, 7, 3, 1]) == int(codes8[kc + 29, 16 + 3])


def test_refuses_what_it_cannot_run():
    gen = _generator("refuse")
    assert "bfloat16" in cpu_amx.unsupported_reason(make.gptq(256, 48, 4, 128, gen=gen), torch.float16)
    assert "multiple" in cpu_amx.unsupported_reason(make.gptq(256, 40, 4, 128, gen=gen), torch.bfloat16)
    assert "multiple" in cpu_amx.unsupported_reason(make.int8(200, 48, gen=gen), torch.bfloat16)
    assert "FP8" in cpu_amx.unsupported_reason(make.fp8(256, 48, per_channel=True, gen=gen), torch.bfloat16)
    with pytest.raises(ValueError, match="cpu-amx backend: .*bfloat16"):
        kernels.prepare(make.gptq(256, 48, 4, 128, gen=gen), torch.float32, backend="cpu-amx")


def test_a_failed_build_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QSHARD_CACHE", str(tmp_path))
    lib, why = native_build.load.__wrapped__("cpu_amx.c", ("-DQSHARD_TEST_BROKEN_BUILD", "-fno-such-flag"))
    assert lib is None and "failed" in why and "no-such-flag" in why
    assert not list((tmp_path / "kernels").glob("*.tmp"))


@needs_amx
@pytest.mark.parametrize("M", [1, 12, 20])  # digits in one tile, a tile per plane, bf16
def test_a_block_longer_than_a_fold_takes_its_zero_points_once(M):
    """Per-channel asymmetric codes with K = 10240: the int32 sums are folded at row 8192 and at
    10240 (a fold spans at most 8192 rows), the block's zero-point term only once."""
    gen = _generator("long-block", M)
    layout = make.gptq(10240, 32, 4, 10240, sym=False, gen=gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16)
    assert_matches_reference(kernels.linear(x, prepared), x, layout)


def test_the_build_key_covers_the_included_headers(tmp_path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "main.c").write_text('#include <stdint.h>\n#include "inc/a.h"\nint f(void) { return A; }\n')
    (tmp_path / "inc" / "a.h").write_text('#include "b.h"\n')
    (tmp_path / "inc" / "b.h").write_text("#define A 1\n")
    before = native_build._source_with_includes(tmp_path / "main.c")
    (tmp_path / "inc" / "b.h").write_text("#define A 2\n")
    after = native_build._source_with_includes(tmp_path / "main.c")
    assert before != after and after.endswith(b"#define A 2\n")


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 12, 20])  # digits in one tile, a tile per plane, bf16
def test_codes_at_their_zero_point_give_zero(bits, M):
    """W = s (q - z) = 0: the zero-point term must cancel the products exactly. It takes the block
    sums of x as the products saw them (the digits' sums, not x's): with x's own sums the digits'
    rounding came back multiplied by z (8-bit, z = 128: |y| up to 0.07, 6e-5 of what cancels)."""
    gen = _generator("zero-weight", bits, M)
    K, N = 512, 32
    q = torch.full((K, N), 2 ** (bits - 1), dtype=torch.int64)  # symmetric: z = 2^(bits - 1)
    scales = (torch.rand(K // 128, N, generator=gen) * 0.02 + 0.01).half()
    layout = GPTQLayout(qweight=pack_int32(q, bits, 0), scales=scales, qzeros=None, g_idx=None, bits=bits,
                        group_size=128, in_features=K, out_features=N)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = torch.randn(M, K, generator=gen)
    x[:, 7] = 30.0
    x = x.to(torch.bfloat16)
    y = kernels.linear(x, prepared).float()
    cancelled = 2 ** (bits - 1) * scales.float().max() * x.float().abs().sum(1, keepdim=True)
    assert (y.abs() <= 1e-6 * cancelled).all(), (y.abs() / cancelled).max()


@needs_amx
@pytest.mark.parametrize("M", [1, 12, 20])  # digits in one tile, a tile per plane, bf16
def test_the_thread_count_does_not_change_the_result(M):
    """Threads split the output panels (36 here: 18 each for two, 12 for three); every panel is
    computed the same way whichever thread takes it."""
    gen = _generator("threads", M)
    layout = make.gptq(256, 576, 4, 64, sym=False, gen=gen)
    prepared = kernels.prepare(layout, torch.bfloat16, backend="cpu-amx")
    x = torch.randn(M, layout.in_features, generator=gen).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kernels.linear(x, prepared))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert_matches_reference(results[0], x, layout)

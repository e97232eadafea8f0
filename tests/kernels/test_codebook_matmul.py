"""Codebook layouts (AQLM, VPTQ): the float decode against the formula written out element by
element, and the Triton kernel (interpreted on CPU, compiled on CUDA) against a float64 GEMM on
the decode. Shapes are small and straddle the kernel's blocks; outputs are compared elementwise."""

from __future__ import annotations

import zlib

import pytest
import torch

import kernels
from kernels import reference
from kernels.codebook_matmul import dequantize_codebook
from kernels.layouts import CodebookBlock, CodebookLayout, CodebookPart

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def part(gen, rows, cols, C, E, og, ig, *, groups=1, group_cols=None, k_offset=0, out_skip=0, scales=True):
    no = -(-(rows + out_skip) // og)
    group_cols = group_cols or cols
    codes = torch.randint(0, E, (no, cols // ig, C), generator=gen, dtype=torch.int32)
    books = (torch.randn(groups, C, E, og, ig, generator=gen) * 0.1).half().float()
    s = (torch.rand(no, generator=gen) + 0.5).half().float() if scales else None
    return CodebookPart(codes, books, s, group_cols, k_offset, out_skip, rows, cols)


def aqlm_like(gen, rows=70, cols=96, C=2, E=256, og=2, ig=8, out_skip=1):
    return CodebookLayout((CodebookBlock((part(gen, rows, cols, C, E, og, ig, out_skip=out_skip),)),))


def vptq_like(gen, rows=45, outliers=12, groups=3, gs=40, k_offset=5, with_norm=True, with_perm=True):
    """Outlier part (vector length 4, one codebook) + main part (vector length 8, centroid +
    residual, codebook group per 40 columns, starting 5 columns into its first group)."""
    main_cols = groups * gs - k_offset - 7
    out = part(gen, rows, outliers, 1, 16, 4, 1, group_cols=outliers, scales=False)
    main = part(gen, rows, main_cols, 2, 32, 8, 1, groups=groups, group_cols=gs, k_offset=k_offset, scales=False)
    K = outliers + main_cols
    perm = torch.randperm(K, generator=gen) if with_perm else None
    s = (torch.rand(K, generator=gen) + 0.5) if with_norm else None
    b = (torch.randn(K, generator=gen) * 0.01) if with_norm else None
    return CodebookLayout((CodebookBlock((out, main), perm, s, b),))


def fused(gen):
    """Two blocks with their own codebooks and shapes (q and k of a fused QKV)."""
    a, b = aqlm_like(gen, rows=40, C=1, E=64, og=1, ig=4, out_skip=0), aqlm_like(gen, rows=24, C=2, E=16, og=4, ig=8,
                                                                                   out_skip=2)
    return CodebookLayout(a.blocks + b.blocks)


LAYOUTS = {"aqlm-2x8-og2": aqlm_like, "aqlm-1x16-og1": lambda g: aqlm_like(g, C=1, E=1 << 16, og=1, out_skip=0),
           "vptq-outlier-residual-perm-norm": vptq_like,
           "vptq-plain": lambda g: _vptq_plain(g),
           "fused-blocks": fused}


def _vptq_plain(gen):
    main = part(gen, 33, 64, 1, 256, 8, 1, groups=2, group_cols=32, scales=False)
    return CodebookLayout((CodebookBlock((main,)),))


def naive_decode(layout: CodebookLayout) -> torch.Tensor:
    """The layout's formula, one element at a time (float64)."""
    rows = []
    for b in layout.blocks:
        parts = []
        for p in b.parts:
            _, _, C = p.codes.shape
            og, ig = p.codebooks.shape[3:]
            w = torch.zeros(p.out_features, p.in_features, dtype=torch.float64)
            for n in range(p.out_features):
                r = n + p.out_skip
                o, i = divmod(r, og)
                for k in range(p.in_features):
                    kg = (k + p.k_offset) // p.group_cols
                    v = sum(float(p.codebooks[kg, c, int(p.codes[o, k // ig, c]), i, k % ig]) for c in range(C))
                    w[n, k] = v * (float(p.scales[o]) if p.scales is not None else 1.0)
            parts.append(w)
        wint = torch.cat(parts, 1)
        w = wint.clone()
        if b.perm is not None:
            for j in range(b.in_features):
                w[:, int(b.perm[j])] = wint[:, j]
        if b.col_scale is not None:
            w = w * b.col_scale.double() + b.col_bias.double()
        rows.append(w)
    return torch.cat(rows, 0)


@pytest.mark.parametrize("name", ["aqlm-2x8-og2", "vptq-outlier-residual-perm-norm", "fused-blocks"])
def test_decode_is_the_formula(name):
    layout = LAYOUTS[name](torch.Generator().manual_seed(1))
    got = dequantize_codebook(layout, torch.float64)
    want = naive_decode(layout)
    assert got.shape == (layout.out_features, layout.in_features)
    assert torch.equal(got, want)  # float64 sums of fp16 values and products: exact on both sides


def test_cpu_auto_backend_is_the_dequantized_fallback():
    layout = aqlm_like(torch.Generator().manual_seed(2))
    prepared = kernels.prepare(layout, torch.float32)
    assert prepared.backend == "dequant"
    x = torch.randn(3, layout.in_features, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kernels.linear(x, prepared), torch.nn.functional.linear(x, dequantize_codebook(layout)))


def _magnitude(layout) -> torch.Tensor:
    """Bound on the terms a backend adds per weight: |Wint * s| + |b| (the kernel scales x, adds x @ b)."""
    rows = []
    for b in layout.blocks:
        bare = CodebookBlock(b.parts, b.perm, None, None)
        w = reference.dequantize(CodebookLayout((bare,)), torch.float64).abs()
        if b.col_scale is not None:
            w = w * b.col_scale.double().abs() + b.col_bias.double().abs()
        rows.append(w)
    return torch.cat(rows, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 19])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_triton_kernel_matches_reference(triton_device, name, M, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{M}".encode()))
    layout = LAYOUTS[name](gen)
    x = torch.randn(M, layout.in_features, generator=gen)
    ref = x.double() @ reference.dequantize(layout, torch.float64).T
    layout = _to(layout, triton_device)
    prepared = kernels.prepare(layout, dtype, backend="triton")
    y = kernels.linear(x.to(dtype).to(triton_device), prepared).cpu()
    assert y.shape == (M, layout.out_features) and y.dtype == dtype and torch.isfinite(y).all()
    ref_rounded = x.to(dtype).double() @ reference.dequantize(layout, torch.float64).cpu().T
    u = max(UNIT_ROUNDOFF[dtype], layout.in_features * 2.0 ** -24)
    bound = 4 * u * (x.double().abs() @ _magnitude(layout).cpu().T) + 1e-30
    worst = ((y.double() - ref_rounded).abs() / bound).max().item()
    assert worst <= 1.0, f"max error {worst:.2f}x the elementwise bound"
    assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 2e-3)


def _to(layout: CodebookLayout, device) -> CodebookLayout:
    def mv(t):
        return None if t is None else t.to(device)

    return CodebookLayout(tuple(
        CodebookBlock(tuple(CodebookPart(mv(p.codes), mv(p.codebooks), mv(p.scales), p.group_cols, p.k_offset,
                                         p.out_skip, p.out_features, p.in_features) for p in b.parts),
                      mv(b.perm), mv(b.col_scale), mv(b.col_bias)) for b in layout.blocks))

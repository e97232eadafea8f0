"""Marlin's tiled storage of 4-bit weights (IST-DASLab marlin `Layer.pack`; the `marlin` checkpoints
TGI and vLLM serve), written and read back, whole or as any box of tiles.

A layer with K in-features and N out-features, unsigned 4-bit codes q[k, n] (zero point 8:
w = (q - 8) * s) and scales S[g, n], is stored as
    B  int32 [K/16, 2N]   row t holds the codes of input rows 16t..16t+15
    s  float [G, N]       G = K/128 (group 128) or 1 (one group over K)
Inside row t of B, the codes are taken tile by tile (16 x 16 codes, tiles along N), and every
run of 4 tiles (1024 codes = 64 output columns = 128 words) is shuffled by a fixed permutation
(`WEIGHT_PERM`: the order in which the kernel's 32 lanes take their mma fragments), then packed 8
codes per word, lowest nibble first. s is shuffled inside every run of 64 entries of a row
(32 when there is one group). So a box of B rows [t0, t1) and word columns [128c0, 128c1) holds
exactly the codes of input rows [16t0, 16t1) and output columns [64c0, 64c1): a rank reads the
tiles covering its slice (16-row and 64-column alignment) and never the rest.

Layout facts checked by running marlin's own `Layer.pack` (its repository's marlin/__init__.py,
verbatim, CPU) against `encode_codes` / `encode_scales`; see tests/quant/test_marlin.py.
"""

from __future__ import annotations

import torch

from kernels.packing import pack_int32, unpack_int32

BITS = 4
ZERO = 8  # symmetric: every zero point is 2^(bits-1)
TILE_K = 16  # input rows per row of B
CHUNK_N = 64  # output columns per shuffled run (4 tiles of 16)
WORDS_PER_COLUMN = TILE_K * BITS // 32  # words of one column in one row of B (2)
GROUP_SIZES = (128, -1)


def _weight_perm() -> torch.Tensor:
    """Position p of a shuffled 1024-code run takes code WEIGHT_PERM[p] of the unshuffled run,
    where the unshuffled code of tile j, row r, column c (all within the run) is j*256 + r*16 + c.

    Lane l of the kernel owns columns l//4 and l//4 + 8 and rows 2m, 2m+1, 2m+8, 2m+9 (m = l % 4)
    of each tile; its 8 codes of a tile share one word, in nibble order (0, 2, 4, 6, 1, 3, 5, 7)
    so that the dequantizer can split the word into two halves of 4 codes."""
    entries: list[int] = []
    nibble_order = (0, 2, 4, 6, 1, 3, 5, 7)
    for lane in range(32):
        column, m = lane // 4, lane % 4
        rows = (2 * m, 2 * m + 1, 2 * m + 8, 2 * m + 9)
        fragment = [16 * r + column + 8 * half for half in (0, 1) for r in rows]
        fragment = [fragment[i] for i in nibble_order]
        for tile in range(4):
            entries.extend(tile * 256 + e for e in fragment)
    return torch.tensor(entries, dtype=torch.int64)


def _scale_perms() -> tuple[torch.Tensor, torch.Tensor]:
    """(grouped, single): shuffles of a run of 64 (resp. 32) scales of one row of s."""
    grouped = [i + 8 * j for i in range(8) for j in range(8)]  # the 8 x 8 transpose
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return torch.tensor(grouped), torch.tensor(single)


WEIGHT_PERM = _weight_perm()
WEIGHT_UNPERM = torch.argsort(WEIGHT_PERM)
SCALE_PERM, SCALE_PERM_SINGLE = _scale_perms()
SCALE_UNPERM, SCALE_UNPERM_SINGLE = torch.argsort(SCALE_PERM), torch.argsort(SCALE_PERM_SINGLE)


def check_shape(in_features: int, out_features: int, what: str) -> None:
    """Marlin's storage needs whole tile rows (K % 16) and whole shuffled runs (N % 64)."""
    if in_features % TILE_K:
        raise ValueError(f"{what}: in_features={in_features} is not a multiple of {TILE_K}, which Marlin's tiles need")
    if out_features % CHUNK_N:
        raise ValueError(f"{what}: out_features={out_features} is not a multiple of {CHUNK_N}, the width of "
                         f"Marlin's permutation runs")


def encode_codes(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [K, N] (K % 16 == 0, N % 64 == 0) -> B int32 [K/16, 2N]."""
    k, n = codes.shape
    tiles = codes.reshape(k // TILE_K, TILE_K, n // TILE_K, TILE_K).permute(0, 2, 1, 3)  # [t, tile, r, c]
    runs = tiles.reshape(k // TILE_K, n // CHUNK_N, 1024)[..., WEIGHT_PERM.to(codes.device)]
    return pack_int32(runs.reshape(k // TILE_K, n * TILE_K), BITS, 1)


def decode_codes(b: torch.Tensor) -> torch.Tensor:
    """A box of B, int32 [T, 128C] (whole runs) -> codes [16T, 64C] of the rows and columns it covers."""
    t, words = b.shape
    runs = unpack_int32(b, BITS, 1).reshape(t, words // (CHUNK_N * WORDS_PER_COLUMN), 1024)
    tiles = runs[..., WEIGHT_UNPERM.to(b.device)].reshape(t, -1, TILE_K, TILE_K)  # [t, tile, r, c]
    return tiles.permute(0, 2, 1, 3).reshape(t * TILE_K, -1)


def encode_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales [G, N] -> s [G, N] as stored (shuffled within runs of 64, or 32 for one group)."""
    perm = SCALE_PERM_SINGLE if scales.shape[0] == 1 else SCALE_PERM
    return scales.reshape(-1, perm.numel())[:, perm.to(scales.device)].reshape(scales.shape).contiguous()


def decode_scales(s: torch.Tensor, single_group: bool) -> torch.Tensor:
    """A box of s [G_box, 64C] (whole runs of 64 columns) -> scales in natural order.
    `single_group`: the layer has one group (s stored with the 32-entry shuffle)."""
    unperm = SCALE_UNPERM_SINGLE if single_group else SCALE_UNPERM
    return s.reshape(-1, unperm.numel())[:, unperm.to(s.device)].reshape(s.shape).contiguous()

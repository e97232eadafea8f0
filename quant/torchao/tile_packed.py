"""tinygemm's int4 tile layout (torch's _convert_weight_to_int4pack, what torchao's
Int4TilePackedTo4dTensor stores), decoded on the CPU for any box of tiles.

qdata int32 [N/8, K/(16*T), 32, T/2] (T = inner k-tiles, 8 in torchao): word [nt, kt, lane, j]
holds 8 codes of output row n = 8*nt + lane // 4. Its nibble p (bits 4p..4p+3) is the code of
column k = 16*T*kt + 32*j + 2*(lane % 4) + 8*(p % 4) + p // 4 (facts of the CUDA packing kernel:
byte i of the word's input is column pair 2*ks_i, 2*ks_i + 1, ks_i = 8*(T*kt + 2j) + lane % 4 + 4i;
high nibbles of the four bytes fill nibbles 0-3, low nibbles 4-7). Codes are unsigned, u in [0, 16).
A tile covers 8 rows x 16*T columns, so a rank reads the tiles covering its rows and columns.
"""

from __future__ import annotations

import torch

TILE_N = 8
LANES = 32


def tile_k(words_per_lane: int) -> int:
    return 32 * words_per_lane  # 16 columns per k-tile, 2 k-tiles per word


def _positions(words_per_lane: int) -> torch.Tensor:
    """int64 [32 * W * 8]: row * tile_k + column inside a tile, per (lane, word, nibble)."""
    lane = torch.arange(LANES).view(-1, 1, 1)
    j = torch.arange(words_per_lane).view(1, -1, 1)
    p = torch.arange(8).view(1, 1, -1)
    n = lane // 4
    k = 32 * j + 2 * (lane % 4) + 8 * (p % 4) + p // 4
    return (n * tile_k(words_per_lane) + k).reshape(-1)


def decode(qdata: torch.Tensor) -> torch.Tensor:
    """int32 [nT, kT, 32, W] -> codes int32 [8 nT, tile_k(W) kT]."""
    nt, kt, lanes, w = qdata.shape
    if lanes != LANES:
        raise ValueError(f"tile-packed qdata dim 2 is {lanes}, expected {LANES}")
    nibbles = (qdata.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 15  # [nT, kT, 32, W, 8]
    tiles = torch.empty(nt, kt, TILE_N * tile_k(w), dtype=torch.int32)
    tiles[:, :, _positions(w)] = nibbles.reshape(nt, kt, -1).to(torch.int32)
    return tiles.view(nt, kt, TILE_N, tile_k(w)).permute(0, 2, 1, 3).reshape(nt * TILE_N, kt * tile_k(w))


def encode(codes: torch.Tensor, words_per_lane: int = 4) -> torch.Tensor:
    """The inverse of `decode` (test checkpoints): codes [N, K] in [0, 16), N % 8 == 0, K % tile_k == 0."""
    n, k = codes.shape
    tk = tile_k(words_per_lane)
    tiles = codes.to(torch.int64).view(n // TILE_N, TILE_N, k // tk, tk).permute(0, 2, 1, 3)
    tiles = tiles.reshape(n // TILE_N, k // tk, -1)[:, :, _positions(words_per_lane)]
    nibbles = tiles.view(n // TILE_N, k // tk, LANES, words_per_lane, 8) << (4 * torch.arange(8))
    words = nibbles.sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32

"""Block-size choices for the Triton kernel: a few candidates per (shape, M bucket), tuned once.

Small M is memory-bound: the weight must stream at full bandwidth, so tiles are thin in M and
K is split until there are about two programs per SM. Large M is compute-bound: square tiles,
no split. `candidates` lists a handful per key (the first is the untuned default); `Tuner` times
them once per (kernel spec, N, K, M bucket) on CUDA and caches the winner, so after warm-up a
call costs a dict lookup. With QSHARD_TRITON_TUNE=0 the first candidate that launches is kept
without timing; while a CUDA graph is being captured (warm up first) and under the interpreter,
the first candidate is used as is.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace

import torch

log = logging.getLogger(__name__)

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelConfig:
    use_dot: bool  # tensor-core tile; False: FMA GEMV (block_m must be 1)
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    interleave: bool = True  # packed-along-K words: unpack whole blocks (True) or one code per word at a time
    magic_asm: bool = True  # where it applies (triton_backend.magic_asm_applies): the lop3 4-bit unpack
    joined: bool = False  # with the lop3 unpack: the slices joined into one dot over the block (K order)
    dequant_mm: bool = False  # large M: dequantize the weight once (Triton) and multiply with cuBLAS
    # act-order weights (rows sorted by group at load): x's columns permuted by one index_select per
    # call and the plain kernel, instead of reading x through the permutation inside the kernel
    permute_x: bool = False


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return 512


def slices(cfg: KernelConfig, per_word: int) -> int:
    """Code slices per block: 1, or one per code of a word when peeling K-packed words code by code."""
    return 1 if cfg.interleave else per_word


def is_valid(cfg: KernelConfig, per_word: int) -> bool:
    """Shape rules: the GEMV has one row; a dot needs every dimension ≥ 16; a block holds whole words.
    per_word: codes per int32 word for weights packed along K, else 1."""
    if cfg.block_k % per_word:
        return False
    if cfg.dequant_mm:
        return per_word > 1
    if not cfg.use_dot:
        return cfg.block_m == 1
    return cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k // slices(cfg, per_word) >= 16


def split_k_for(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """Smallest power-of-two split giving ~2 programs per SM, keeping ≥ 2 K blocks per split."""
    tiles = -(-M // block_m) * -(-N // block_n)
    k_blocks = -(-K // block_k)
    split = 1
    while tiles * split < 2 * sms and split * 2 * 2 <= k_blocks and split < 32:
        split *= 2
    return split


def candidates(M: int, N: int, K: int, per_word: int, sms: int, untimed: bool = False,
               permuted: bool = False) -> list[KernelConfig]:
    """A small ordered set for this M bucket; the first is the default. per_word: codes per word along K.
    permuted: act-order weights, whose kernels read x through the rows' permutation; each candidate
    then also comes with x permuted once before the launch (permute_x).

    Pruned by a sweep on an H100 (Llama-2-7B qkv and down, 4-bit and int8, M = 1, 16, 128): K-blocks
    of 256 lost in dot tiles, and 256-wide N tiles at M = 128; the GEMV won at M = 1 for 4-bit, a
    16-row dot for int8; peeling words code by code (interleave=False) won for the GEMV and at M = 16,
    unpacking whole blocks at M = 128.
    Widened after the first H100 run of `qshard bench kernels` (2026-11-23: 4-bit at 40-55% of copy
    bandwidth for M <= 64, 0.3-0.6x bf16 at M = 128-256 with ~1 tile per SM): a split giving 4 programs
    per SM besides 2 and 1, 8-warp GEMV/dot tiles, and split-K for the large-M tiles up to M = 256.
    """
    bm = m_bucket(M)
    bk = 128 if per_word <= 8 else 256
    packed = per_word > 1  # the interleave choice exists only for words packed along K
    both, peel, whole = ((False, True), (False,), (True,)) if packed else ((True,), (True,), (True,))
    shapes: list[tuple[bool, int, int, int, int, int, tuple[bool, ...]]] = []  # dot, BM, BN, BK, warps, stages
    if bm == 1:
        shapes += [(False, 1, 128, bk, 4, 2, both), (False, 1, 32, 2 * bk, 4, 2, peel),
                   (False, 1, 64, 2 * bk, 4, 2, peel), (True, 16, 64, bk, 4, 3, peel),
                   (False, 1, 128, bk, 8, 3, peel), (False, 1, 256, bk, 8, 2, peel)]
        if per_word == 8:  # 4-bit: 16-row dot tiles fed by the lop3 unpack (triton_kernels, MAGIC_ASM)
            shapes += [(True, 16, 128, bk, 4, 3, peel), (True, 16, 32, bk, 4, 4, peel), (True, 16, 64, bk, 4, 5, peel),
                       (True, 16, 128, bk, 8, 4, peel)]
    elif bm <= 16:
        shapes += [(True, 16, 128, bk, 4, 3, both), (True, 16, 64, bk, 4, 3, both), (True, 16, 32, bk, 4, 4, peel),
                   (True, 16, 128, bk, 8, 4, peel), (True, 16, 64, bk, 4, 5, peel)]
    elif bm <= 64:
        shapes += [(True, bm, 128, bk, 4, 3, both), (True, bm, 64, bk, 4, 3, both), (True, bm, 128, bk, 8, 4, whole),
                   (True, bm, 64, bk, 8, 4, whole)]
    else:
        shapes += [(True, 128, 128, bk, 8, 3, both), (True, 64, 128, bk, 4, 3, whole), (True, 128, 64, bk, 4, 4, whole),
                   (True, 64, 64, bk, 4, 4, whole), (True, 128, 128, bk // 2, 8, 4, whole)]
    out: list[KernelConfig] = []
    for use_dot, BM, BN, BK, warps, stages, unpackings in shapes:
        split = split_k_for(M, N, K, BM, BN, BK, sms)
        if bm <= 64:  # memory-bound: 2 programs per SM (the default), 1, and 4
            splits = (split, max(1, split // 2), split * 2)
        elif bm <= 256:  # unsplit first (the default), then 2 programs per SM
            splits = (1, split)
        else:  # prefill-sized M: no workspace of M x N partial sums
            splits = (1,)
        for s in dict.fromkeys(splits):
            if s > 1 and s * 2 * BK > K:  # keep at least two K blocks per split
                continue
            for interleave in unpackings:
                cfg = KernelConfig(use_dot, BM, BN, BK, s, warps, stages, interleave)
                if is_valid(cfg, per_word) and cfg not in out:
                    out.append(cfg)
    # Without the lop3 unpack (magic_asm=False) the peeled 4-bit dot tiles were 1.25-1.33x slower at
    # M = 16 on an H200 (2026-12-02): no candidate. The H200 sweep of 2026-12-03 (bench/results/
    # gpu-2026-12-03.md; Llama-2-7B and 70B/TP4 qkv and gate_up, bf16) timed two more: the lop3 slices
    # joined into one dot per block won at M = 64 by 8-14% and lost 2-3x at M <= 16, so the tuner
    # times them from M = 64; dequantize-once + cuBLAS won at M = 256 by 1.3-1.4x on all four layers
    # and lost at M = 128 on three, so it is timed from M = 256. `untimed` (bench kernels --sweep)
    # adds both below those sizes too.
    if per_word == 8 and (untimed or bm >= 64):
        out += [replace(c, joined=True) for c in out if c.use_dot and not c.interleave]
    if permuted:  # H200, 2026-12-03: reading x through the permutation made 7B qkv 1.6x slower at M = 1, 3.9x at 64
        out += [replace(c, permute_x=True) for c in out]
    if per_word > 1 and (bm >= 256 or (untimed and bm >= 128)):
        out.append(KernelConfig(True, 64, 64, 128, dequant_mm=True))
    return out


def interpreter_config(M: int, per_word: int, split_k: int = 1) -> KernelConfig:
    """Large blocks: the interpreter's cost grows with programs × K iterations."""
    bk = 128 if per_word <= 8 else 256
    if M == 1:
        return KernelConfig(False, 1, 64, bk, split_k)
    return KernelConfig(True, 16 if M <= 16 else 32, 64, bk, split_k)


class Tuner:
    """Chooses a KernelConfig per key; times candidates once on CUDA, then remembers."""

    def __init__(self):
        self.best: dict[str, KernelConfig] = {}
        self._names: dict[torch.device, str] = {}
        self.path = os.environ.get("QSHARD_TRITON_CACHE")  # optional JSON file shared across runs
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.best = {k: KernelConfig(**v) for k, v in json.load(f).items()}

    def key(self, spec_key: str, M: int, N: int, K: int, device: torch.device) -> str:
        if device not in self._names:
            self._names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"{self._names[device]}|{spec_key}|N={N}|K={K}|M={m_bucket(M)}"

    def choose(self, key: str, cands: list[KernelConfig], make_runner, device: torch.device) -> KernelConfig:
        """The cached or newly timed best of `cands`; `make_runner()` gives run(cfg), one launch."""
        cfg = self.best.get(key)
        if cfg is not None:
            return cfg
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return cands[0]  # no trial launches: they would be captured into the graph
        if os.environ.get("QSHARD_TRITON_TUNE", "1") == "0":
            cfg = self._first_that_runs(cands, make_runner())  # some shapes need more shared memory than there is
        else:
            cfg = self._time(cands, make_runner())
        self.best[key] = cfg
        log.info("chose %s -> %s", key, cfg)
        if self.path:
            with open(self.path, "w") as f:
                json.dump({k: asdict(v) for k, v in self.best.items()}, f, indent=1)
        return cfg

    @staticmethod
    def _first_that_runs(cands: list[KernelConfig], run) -> KernelConfig:
        for cfg in cands:
            try:
                run(cfg)
                return cfg
            except Exception as exc:  # out of shared memory or registers for this shape
                log.warning("triton config %s failed: %s", cfg, exc)
        raise RuntimeError(f"no Triton config could run among {cands}")

    @staticmethod
    def _time(cands: list[KernelConfig], run, reps: int = 20) -> KernelConfig:
        """Per-call GPU time of each candidate from a CUDA graph of `reps` calls: a few-µs kernel
        launched from Python would otherwise time the launch overhead, not the kernel."""
        timed: list[tuple[float, KernelConfig]] = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for cfg in cands:
            try:
                run(cfg)  # compile and warm
                torch.cuda.synchronize()
            except Exception as exc:  # a config the compiler rejects (resources) is skipped
                log.warning("triton config %s failed: %s", cfg, exc)
                continue
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(reps):
                        run(cfg)
                replay = graph.replay
            except Exception:
                torch.cuda.synchronize()

                def replay(cfg=cfg):
                    for _ in range(reps):
                        run(cfg)
            samples = []
            for _ in range(3):
                start.record()
                replay()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / reps)
            timed.append((sorted(samples)[1], cfg))
        if not timed:
            raise RuntimeError(f"no Triton config could run among {cands}")
        return min(timed, key=lambda t: t[0])[1]


TUNER = Tuner()

"""Triton backend: a layout converted at load into what `triton_kernels.quant_matmul_kernel` reads.

Decided once here, not per call: act-order rows sorted by group (qweight rows permuted at load; the
kernel reads x's columns through the permutation, so groups stay block-wide and no gather launch
runs per call: the 2026-11-23 H100 run, where a separate gather won, read g_idx per row instead); zero points unpacked to uint8 [G, N] (or a constant
when symmetric); groups classified as uniform (group = first + k // size), single, or irregular
(per-row g_idx); AWQ repacked along K so it takes the word-sliced path (`repack_awq=False` keeps
it packed along N, read by the kernel's AWQ path). The prepared buffers are a complete
description of the weight: `dequantize()` rebuilds it from them and the layout is dropped.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch

from kernels import triton_configs
from kernels.groups import plan_groups
from kernels.layouts import AWQLayout, FP8Layout, GPTQLayout, Int8Layout
from kernels.packing import AWQ_ORDER, pack_int32, unpack_int32
from kernels.prepared import PreparedWeight
from kernels.triton_configs import TUNER, KernelConfig

SINGLE_GROUP = 1 << 30  # a group size no block reaches: group = first_group everywhere


def triton_kernels():
    """The kernel module, (re)loaded if TRITON_INTERPRET changed since it was imported."""
    mod = sys.modules.get("kernels.triton_kernels")
    if mod is None:
        mod = importlib.import_module("kernels.triton_kernels")
    if mod.INTERPRET != mod.interpret_requested():
        mod = importlib.reload(mod)
    return mod


@dataclass(frozen=True)
class KernelSpec:
    """What the kernel is specialised on, fixed at load."""

    weight: str  # "kpack" | "kpack_stream" | "awq" | "dense"
    bits: int
    per_word: int  # codes per int32 word for "kpack", else 1
    scales: str  # "channel" | "tensor" | "group"
    zeros: str  # "none" | "const" | "table"
    group_size: int  # uniform group size (SINGLE_GROUP for one group), 0: irregular, read g_idx per row
    float_codes: bool
    has_perm: bool

    @property
    def key(self) -> str:
        return (f"{self.weight}{self.bits}/{self.scales}/{self.zeros}/g{self.group_size}"
                f"{'/perm' if self.has_perm else ''}")


class TritonWeight(PreparedWeight):
    backend = "triton"

    def __init__(self, layout, act_dtype: torch.dtype, repack_awq: bool = True):
        super().__init__(layout, act_dtype)
        self.first_group = 0
        perm = g_idx = zeros = None
        if isinstance(layout, (Int8Layout, FP8Layout)):
            is_fp8 = isinstance(layout, FP8Layout)
            per_tensor = layout.scales.dim() == 0
            self.spec = KernelSpec("dense", 8, 1, "tensor" if per_tensor else "channel", "none", 0, is_fp8, False)
            qweight, scales = layout.weight.contiguous(), layout.scales.float().contiguous()
        else:
            K, N = layout.in_features, layout.out_features
            if isinstance(layout, GPTQLayout):
                bits, plan = layout.bits, plan_groups(layout)
                qweight = layout.qweight
                if plan.perm is not None:
                    perm = plan.perm.to(torch.int32)
                    qweight = _by_column_chunks(
                        qweight, lambda w: pack_int32(unpack_int32(w, bits, 0, count=K)[plan.perm], bits, 0))
                ids, group_size, self.first_group = plan.group_ids, plan.uniform_size, plan.first_group
                if layout.qzeros is not None:
                    zeros = unpack_int32(layout.qzeros, bits, 1, count=N)
                weight = "kpack" if 32 % bits == 0 else "kpack_stream"
            else:
                bits, ids, group_size = 4, None, layout.group_size
                zeros = unpack_int32(layout.qzeros, 4, 1, count=N, order=AWQ_ORDER)
                qweight = layout.qweight
                weight = "awq"
                if repack_awq:
                    qweight = _by_column_chunks(
                        qweight, lambda w: pack_int32(unpack_int32(w, 4, 1, order=AWQ_ORDER), 4, 0), words=True)
                    qweight = qweight[:, :N].contiguous()
                    weight = "kpack"
            if ids is not None and int(ids[-1]) == int(ids[0]):
                group_size = SINGLE_GROUP
            elif group_size is None:
                group_size = 0
                g_idx = ids.to(torch.int32)
            per_word = 32 // bits if weight == "kpack" else 1
            self.spec = KernelSpec(weight, bits, per_word, "group", "const" if zeros is None else "table",
                                   group_size, False, perm is not None)
            scales = layout.scales
            if zeros is not None:
                zeros = zeros.to(torch.uint8).contiguous()
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("scales", scales.contiguous(), persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)
        self.register_buffer("g_idx", g_idx, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.layout = None  # the buffers above describe the weight completely
        self._configs: dict[int, KernelConfig] = {}  # per M bucket, after tuning
        self._specialised: dict[tuple, dict] = {}

    # ---- per call ----
    def matmul(self, x: torch.Tensor, config: KernelConfig | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] → y [M, N]; `config` overrides the tuned choice, `out` (row stride free) receives y."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        M, N = x.shape[0], self.out_features
        y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
        if y.shape != (M, N) or y.dtype != x.dtype or y.stride(-1) != 1:
            raise ValueError(f"out must be a row-contiguous {x.dtype} [{M}, {N}] tensor")
        if M == 0:
            return y
        if config is None:
            config = self.choose_config(M, x.device)
        self._launch(x, y, config)
        return y

    def choose_config(self, M: int, device: torch.device) -> KernelConfig:
        bucket = triton_configs.m_bucket(M)
        cfg = self._configs.get(bucket)
        if cfg is None:
            cfg = self._configs[bucket] = self._tuned_config(M, device)
        return cfg

    def _tuned_config(self, M: int, device: torch.device) -> KernelConfig:
        N, K, per_word = self.out_features, self.in_features, self.spec.per_word
        if triton_kernels().INTERPRET:
            return triton_configs.interpreter_config(M, per_word)
        key = TUNER.key(f"{self.spec.key}/{self.act_dtype}", M, N, K, device)
        cached = TUNER.best.get(key)
        if cached is not None:
            return cached
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        cands = triton_configs.candidates(M, N, K, per_word, sms, permuted=self.spec.has_perm)

        def make_runner():
            x = torch.randn(M, K, device=device).to(self.act_dtype)
            y = torch.empty(M, N, device=device, dtype=self.act_dtype)
            return lambda cfg: self._launch(x, y, cfg)

        return TUNER.choose(key, cands, make_runner, device)

    def _scale_mode(self, cfg: KernelConfig) -> tuple[str, int]:
        """(scale kind, GROUP_SIZE): a block-wide group needs block_k to divide the group size."""
        s = self.spec
        if s.scales != "group":
            return s.scales, 0
        if s.group_size and s.group_size % cfg.block_k == 0:
            return "group", s.group_size
        return "row", s.group_size if s.group_size != SINGLE_GROUP else 0

    def _constexprs(self, cfg: KernelConfig, dtype: torch.dtype) -> dict:
        """The kernel's specialisation for one config and activation dtype (cached: decode calls are hot)."""
        key = (cfg, dtype)
        if key not in self._specialised:
            tk, s, N, K = triton_kernels(), self.spec, self.out_features, self.in_features
            if not triton_configs.is_valid(cfg, s.per_word):
                raise ValueError(f"{cfg} is not valid for {s}")
            scale_mode, group_size = self._scale_mode(cfg)
            magic = bool(cfg.magic_asm and magic_asm_applies(cfg, s, scale_mode, dtype))
            if cfg.joined and not magic:
                raise ValueError(f"{cfg}: joined slices need the lop3 unpack, which does not apply to {s}")
            weight_kind = {"kpack": tk.KPACK, "kpack_stream": tk.KPACK_STREAM, "awq": tk.NPACK_AWQ,
                           "dense": tk.DENSE}
            scale_kind = {"channel": tk.SCALE_CHANNEL, "tensor": tk.SCALE_TENSOR, "group": tk.SCALE_GROUP,
                          "row": tk.SCALE_ROW}
            zero_kind = {"none": tk.ZERO_NONE, "const": tk.ZERO_CONST, "table": tk.ZERO_TABLE}
            self._specialised[key] = dict(
                WEIGHT=weight_kind[s.weight].value, BITS=s.bits, SLICES=triton_configs.slices(cfg, s.per_word),
                SCALES=scale_kind[scale_mode].value, ZEROS=zero_kind[s.zeros].value,
                ZERO_POINT=float(2 ** (s.bits - 1)), GROUP_SIZE=group_size, FLOAT_CODES=s.float_codes,
                USE_DOT=cfg.use_dot, DOT_F32=bool(tk.INTERPRET or dtype == torch.float32),
                EVEN=N % cfg.block_n == 0 and K % cfg.block_k == 0,
                LOW_MAGIC=(not cfg.use_dot and dtype != torch.float32 and scale_mode == "group"
                           and s.weight != "dense"),
                MAGIC_ASM=magic,
                JOINED=cfg.joined,
                PERM=s.has_perm and not cfg.permute_x,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return self._specialised[key]

    def _launch(self, x: torch.Tensor, y: torch.Tensor, cfg: KernelConfig) -> None:
        if cfg.dequant_mm:
            torch.mm(x, self.dense_weight(x.dtype, cfg).T, out=y)
            return
        constexprs = self._constexprs(cfg, x.dtype)
        if cfg.permute_x and self.perm is not None:  # x's columns in the sorted rows' order
            x = x.index_select(1, self.perm)
        M, N, K = x.shape[0], self.out_features, self.in_features
        tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
        ws, locks = (split_workspace(x.device, M * N, tiles) if cfg.split_k > 1 else (y, y))
        dummy = self.qweight  # for pointers a specialisation never reads
        zeros = self.zeros if self.zeros is not None else dummy
        triton_kernels().quant_matmul_kernel[(tiles, cfg.split_k)](
            x, self.qweight, self.scales, zeros, self.g_idx if self.g_idx is not None else dummy,
            self.perm if self.perm is not None else dummy, y, ws, locks,
            M, N, K, self.first_group,
            x.stride(0), y.stride(0), self.qweight.stride(0), self.scales.stride(0) if self.scales.dim() == 2 else 0,
            zeros.stride(0) if self.zeros is not None else 0,
            **constexprs,
        )

    def dense_weight(self, dtype: torch.dtype, cfg: KernelConfig) -> torch.Tensor:
        """The weight [N, K] in `dtype`, by one Triton launch (K-packed codes only): per call, never kept,
        so a rank's weights stay packed in memory."""
        s, N, K = self.spec, self.out_features, self.in_features
        if s.weight != "kpack":
            raise ValueError(f"dense_weight needs K-packed codes, not {s.weight}")
        out = torch.empty(N, K, dtype=dtype, device=self.qweight.device)
        tk, dummy = triton_kernels(), self.qweight
        group_size = 0 if self.g_idx is not None else s.group_size  # SINGLE_GROUP: first_group everywhere
        grid = (-(-K // cfg.block_k), -(-N // cfg.block_n))
        tk.dequantize_kernel[grid](
            self.qweight, self.scales, self.zeros if self.zeros is not None else dummy,
            self.g_idx if self.g_idx is not None else dummy, self.perm if self.perm is not None else dummy, out,
            N, K, self.first_group, self.qweight.stride(0), self.scales.stride(0),
            self.zeros.stride(0) if self.zeros is not None else 0, out.stride(0),
            BITS=s.bits, ZEROS=(tk.ZERO_TABLE if self.zeros is not None else tk.ZERO_CONST).value,
            GROUP_SIZE=group_size, PERM=self.perm is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=4)
        return out

    # ---- rebuilding the weight from the buffers ----
    def dequantize(self) -> torch.Tensor:
        s, N, K = self.spec, self.out_features, self.in_features
        if s.weight == "dense":
            scales = self.scales if self.scales.dim() == 0 else self.scales[:, None]
            return self.qweight.float() * scales
        if s.weight == "awq":
            codes = unpack_int32(self.qweight, 4, 1, count=N, order=AWQ_ORDER)
        else:
            codes = unpack_int32(self.qweight, s.bits, 0, count=K)
        rows = torch.arange(K, device=codes.device)
        if self.g_idx is not None:
            ids = self.g_idx.long()
        elif s.group_size == SINGLE_GROUP:
            ids = torch.full_like(rows, self.first_group)
        else:
            ids = self.first_group + rows // s.group_size
        z = 2.0 ** (s.bits - 1) if self.zeros is None else self.zeros.float()[ids]
        w_sorted = (codes.float() - z) * self.scales.float()[ids]  # [K, N], rows in sorted order
        w = torch.empty_like(w_sorted)
        w[self.perm.long() if self.perm is not None else rows] = w_sorted
        return w.T.contiguous()


def magic_asm_applies(cfg: KernelConfig, spec: KernelSpec, scale_mode: str, dtype: torch.dtype) -> bool:
    """Whether the kernel's lop3/packed-fma 4-bit unpack (triton_kernels, MAGIC_ASM; emulated when
    interpreted) serves this call: a 16-bit dot over 4-bit K-packed words peeled code by code,
    block-wide group scales and zero points in [0, 16)."""
    return (cfg.use_dot and dtype in (torch.float16, torch.bfloat16) and spec.weight == "kpack"
            and spec.bits == 4 and not cfg.interleave and scale_mode == "group" and spec.zeros in ("const", "table"))


def _by_column_chunks(t: torch.Tensor, fn, words: bool = False, chunk: int = 4096) -> torch.Tensor:
    """fn over column blocks of t, concatenated: repacking goes through int64 codes, so a whole
    70B-sized layer at once would need several GB of temporaries. words: t's columns are packed
    words of 8 output columns each (AWQ), fn returns 8 columns per word."""
    step = chunk // 8 if words else chunk
    return torch.cat([fn(t[:, i:i + step]) for i in range(0, t.shape[1], step)], dim=1)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown buffers a captured graph may still use


def split_workspace(device: torch.device, elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial sums and int32 per-tile counters; split-K kernels leave them zeroed."""
    ws, locks = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < elems or locks.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, locks))
        n_ws = max(elems, 0 if ws is None else ws.numel(), 1 << 16)
        n_locks = max(tiles, 0 if locks is None else locks.numel(), 1024)
        ws = torch.zeros(n_ws, dtype=torch.float32, device=device)
        locks = torch.zeros(n_locks, dtype=torch.int32, device=device)
        _WORKSPACES[device] = (ws, locks)
    return ws, locks

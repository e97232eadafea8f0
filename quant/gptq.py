"""GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers/optimum, TGI): loader and packer.

Stored per layer (K in-features, N out-features, G = K / group_size groups, b bits):
    qweight int32 [packed(K, b), N]  codes packed along K (3-bit: 32 codes in 3 words)
    qzeros  int32 [G, packed(N, b)]  zero points packed along N: z - 1 (v1) or z (v2), see gptq_zeros
    scales  float [G, N]
    g_idx   int32 [K]                group of each input row (act-order permutes it); may be absent
A rank's part of each follows parallel.sharding's rules; the layer becomes a kernels.GPTQLayout
with true zero points (None when every zero is the symmetric 2^(b-1)) and, where the rank's
rows do not start on a group boundary or act-order is on, an explicit g_idx.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32, unpack_int32
from parallel.sharding import (Axis, Groups, LinearShard, Role, TensorSource, local_group_ids, read_shard,
                               tensor_name, trivial_group_ids)
from quant.base import KernelLinear, Packer, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.gptq_common import (PACKED_BITS, check_group_size, check_stored, config_bool, config_field, config_int,
                               dense_if_unquantized, effective_group_size, read_whole)
from quant.gptq_zeros import FORMATS, V1, V2, ZeroDecision, decide, overflow_message, overflowed_fields

logger = logging.getLogger(__name__)

SCALES = Role("scales", (Axis.G, Axis.N))
G_IDX = Role("g_idx", (Axis.K,), group_ids=True)
# Formats that GPTQModel/vLLM repack GPTQ into for other kernels: not this layout.
_REPACKED = ("marlin", "gptq_marlin", "bitblas", "ipex", "exllama", "awq")


def qweight_role(bits: int) -> Role:
    return Role("qweight", (Axis.K, Axis.N), packed_dim=0, bits=bits)


def qzeros_role(bits: int) -> Role:
    return Role("qzeros", (Axis.G, Axis.N), packed_dim=1, bits=bits)


@dataclass(frozen=True)
class GPTQParams:
    """A GPTQ quantization_config; None where the config is silent (resolved at first load)."""

    bits: int | None
    group_size: int | None
    sym: bool | None
    checkpoint_format: str | None
    desc_act: bool | None

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "GPTQParams":
        bits = config_int(config, ("bits", "w_bit"), None, "gptq")
        if bits is not None:
            check_bits(bits)
        group_size = config_int(config, ("group_size", "groupsize"), None, "gptq")
        if group_size is not None:
            check_group_size(group_size, "gptq")
        if config.get("is_marlin_format"):
            raise QuantConfigError("gptq quantization_config has is_marlin_format=true: Marlin-repacked GPTQ "
                                   "checkpoints are not supported; use the original GPTQ checkpoint")
        fmt = config_field(config, ("checkpoint_format", "format"))
        if fmt is not None:
            if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
                extra = " (repacked for another kernel)" if str(fmt).lower() in _REPACKED else ""
                raise QuantConfigError(f"gptq quantization_config field checkpoint_format={fmt!r}{extra} is not "
                                       f"supported; supported: {', '.join(FORMATS)}")
            fmt = fmt.lower()
        pack_dtype = config.get("pack_dtype")
        if pack_dtype not in (None, "int32", "torch.int32"):
            raise QuantConfigError(f"gptq quantization_config field pack_dtype={pack_dtype!r} is not supported; "
                                   f"supported: int32")
        if config.get("dynamic"):
            logger.warning("gptq quantization_config has per-module 'dynamic' overrides; qshard reads every layer "
                           "with the global bits/group_size (mismatching layers fail their shape check)")
        return cls(bits, group_size, config_bool(config, ("sym",), "gptq"), fmt,
                   config_bool(config, ("desc_act",), "gptq"))


def check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise QuantConfigError(f"gptq quantization_config field bits={bits} is not supported; "
                               f"supported: {', '.join(map(str, PACKED_BITS))}")


def _tensor_scalar(weights: TensorSource, name: str) -> int:
    value = read_whole(weights, name).reshape(-1)
    if value.numel() != 1:
        raise QuantConfigError(f"tensor {name} must hold one value, got shape {list(value.shape)}")
    return int(value[0])


@register("gptq")
class GPTQLoader(WeightsLoader):
    method = "gptq"

    def __init__(self, params: GPTQParams):
        self.declared = params
        self._params: GPTQParams | None = None
        self._logged: set = set()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQLoader":
        return cls(GPTQParams.parse(config))

    def describe(self) -> str:
        p = self._params or self.declared
        return f"gptq(bits={p.bits}, group_size={p.group_size}, sym={p.sym}, format={p.checkpoint_format})"

    # -- checkpoint-wide parameters ----------------------------------------------------------

    def params(self, weights: TensorSource) -> GPTQParams:
        """The config completed by TGI-style scalar tensors (gptq_bits, gptq_groupsize, gptq_sym),
        which take precedence as in TGI; with gptq_bits present, an absent gptq_sym means asymmetric."""
        if self._params is not None:
            return self._params
        p = self.declared
        if weights.has("gptq_bits"):
            bits, sym = _tensor_scalar(weights, "gptq_bits"), False
            check_bits(bits)
            group_size = _tensor_scalar(weights, "gptq_groupsize") if weights.has("gptq_groupsize") else p.group_size
            if weights.has("gptq_sym"):
                sym = bool(_tensor_scalar(weights, "gptq_sym"))
            if group_size is not None:
                check_group_size(group_size, "gptq (tensor gptq_groupsize)")
            logger.info("GPTQ parameters from the checkpoint's tensors (TGI style): bits=%d, group_size=%s, sym=%s%s",
                        bits, group_size, sym, "" if weights.has("gptq_sym") else " (no gptq_sym tensor: asymmetric)")
            p = replace(p, bits=bits, group_size=group_size, sym=sym)
        if p.bits is None:
            raise QuantConfigError("gptq checkpoint gives no bit width: quantization_config has no 'bits' and there "
                                   "is no gptq_bits tensor")
        if p.group_size is None:
            logger.info("gptq quantization_config has no group_size; using the GPTQ default 128")
            p = replace(p, group_size=128)
        self._params = p
        return p

    # -- one layer ----------------------------------------------------------------------------

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "qweight", self.method)
        if dense is not None:
            return dense
        p = self.params(weights)
        gsize = effective_group_size(shard, p.group_size, self.method)
        has_zeros = any(weights.has(tensor_name(s, "qzeros")) for s in shard.sources)
        roles = [qweight_role(p.bits), SCALES] + ([qzeros_role(p.bits)] if has_zeros or p.sym is False else [])
        check_stored(weights, roles, shard, Groups(p.group_size), self.method, p.bits)

        act_order = self._act_order(weights, shard, p, gsize)
        groups = Groups(p.group_size, act_order)
        decision = self._zero_decision(weights, shard, p) if has_zeros else ZeroDecision(V2, True, "no qzeros stored")
        qweight = read_shard(weights, qweight_role(p.bits), shard, groups)
        scales = read_shard(weights, SCALES, shard, groups)
        qzeros = None
        if not decision.symmetric:
            stored = unpack_int32(read_shard(weights, qzeros_role(p.bits), shard, groups), p.bits, 1,
                                  count=shard.local_out_features)
            qzeros = pack_int32(decision.true_zeros(stored), p.bits, 1)
        if act_order:
            g_idx = read_shard(weights, G_IDX, shard, groups)  # absolute ids into the whole tables
        elif shard.k_start % gsize:
            g_idx = local_group_ids(shard, groups)  # the rank's rows start inside a group
        else:
            g_idx = None
        layout = GPTQLayout(qweight, scales, qzeros, g_idx, p.bits, gsize, shard.local_in_features,
                            shard.local_out_features)
        return KernelLinear(layout, weights.dtype)

    def _act_order(self, weights: TensorSource, shard: LinearShard, p: GPTQParams, gsize: int) -> bool:
        """Decided from the layer's FULL g_idx, so every rank decides alike: act-order iff a
        g_idx is stored and differs from k // group_size. Fused parts must share it."""
        names = [tensor_name(src, "g_idx") for src in shard.sources]
        present = [weights.has(n) for n in names]
        if not any(present):
            if p.desc_act:
                raise QuantConfigError(f"gptq quantization_config has desc_act=true but tensor {names[0]} is "
                                       f"missing: the act-order permutation of groups is unknown")
            return False
        if not all(present):
            missing, found = names[present.index(False)], names[present.index(True)]
            raise QuantConfigError(f"tensor {missing} is missing while {found} exists: fused layer parts must all "
                                   f"store g_idx")
        g_idx = [self._full_g_idx(weights, name, shard, p, gsize) for name in names]
        for name, other in zip(names[1:], g_idx[1:]):
            if not torch.equal(other, g_idx[0]):
                raise QuantConfigError(f"tensor {name} differs from {names[0]}: parts fused into one matmul "
                                       f"share their input and must share g_idx")
        trivial = trivial_group_ids(shard.in_features, Groups(gsize)).long().to(g_idx[0].device)
        act_order = not torch.equal(g_idx[0], trivial)
        if act_order != bool(p.desc_act):
            self._log_once(("desc_act", act_order), logging.INFO,
                           "gptq: %s has %s g_idx although desc_act=%s in the config; the g_idx decides",
                           shard.prefix, "a permuted" if act_order else "a trivial", p.desc_act)
        return act_order

    @staticmethod
    def _full_g_idx(weights: TensorSource, name: str, shard: LinearShard, p: GPTQParams, gsize: int) -> torch.Tensor:
        shape = list(weights.get_shape(name))
        if shape != [shard.in_features]:
            raise QuantConfigError(f"tensor {name} has shape {shape}, expected [{shard.in_features}] (in_features)")
        g_idx = read_whole(weights, name)
        if g_idx.is_floating_point() or g_idx.dtype == torch.bool:
            raise QuantConfigError(f"tensor {name} has dtype {g_idx.dtype}, expected integer group ids")
        g_idx = g_idx.long()
        groups = shard.in_features // gsize
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise QuantConfigError(f"tensor {name} holds group ids in [{int(g_idx.min())}, {int(g_idx.max())}], "
                                   f"outside [0, {groups}) for in_features={shard.in_features}, "
                                   f"group_size={p.group_size}")
        return g_idx

    def _zero_decision(self, weights: TensorSource, shard: LinearShard, p: GPTQParams) -> ZeroDecision:
        """Read every source's whole qzeros (small: one row per group) and decide v1/v2/symmetric."""
        fields = torch.cat([self._stored_zeros(weights, src, shard, p.bits).reshape(-1) for src in shard.sources])
        decision = decide(fields, p.bits, p.checkpoint_format, p.sym)
        if decision.version == V1 and overflowed_fields(fields, p.bits):
            raise QuantConfigError(overflow_message(p.bits, self._overflowed_layers(weights, shard, p.bits)))
        contradicts = ((p.checkpoint_format is not None and decision.version != p.checkpoint_format)
                       or (p.sym is True and not decision.symmetric))
        self._log_once(("zeros", decision), logging.WARNING if contradicts else logging.INFO,
                       "gptq zero points read as %s%s (%s; config: checkpoint_format=%s, sym=%s); first layer: %s",
                       decision.version, ", symmetric" if decision.symmetric else "", decision.reason,
                       p.checkpoint_format, p.sym, shard.prefix)
        if decision.version == V1 and not decision.symmetric and bool((fields == 0).any()):
            self._log_once(("v1-zero",), logging.WARNING,
                           "gptq v1 asymmetric checkpoint: %s (and maybe others) stores zero points of 1 as 0. "
                           "Packers with the asymmetric v1 bug that clamped z - 1 = -1 to 0 stored z = 0 the same "
                           "way; that cannot be detected from the checkpoint (such weights would be one scale "
                           "step off)", shard.prefix)
        return decision

    @staticmethod
    def _stored_zeros(weights: TensorSource, src: str, shard: LinearShard, bits: int) -> torch.Tensor:
        n = max(b.offset + b.size for b in shard.blocks if b.source == src)  # the source's full N
        return unpack_int32(read_whole(weights, tensor_name(src, "qzeros")), bits, 1, count=n)

    def _overflowed_layers(self, weights: TensorSource, shard: LinearShard, bits: int) -> list[tuple[str, int]]:
        """Every layer of the checkpoint with overflowed v1 zeros (when the source can list its
        tensors), so that one error names them all."""
        layers = []
        names = weights.names() if hasattr(weights, "names") else []
        for name in (n for n in names if n.endswith(".qzeros")):
            bad = overflowed_fields(unpack_int32(read_whole(weights, name), bits, 1), bits)  # padding fields are 0
            if bad:
                layers.append((name[: -len(".qzeros")], bad))
        if not any(name in shard.sources for name, _ in layers):
            for src in shard.sources:
                bad = overflowed_fields(self._stored_zeros(weights, src, shard, bits), bits)
                if bad:
                    layers.insert(0, (src, bad))
        return layers

    def _log_once(self, key, level: int, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, msg, *args)


class GPTQPacker(Packer):
    """Writes GPTQ layers: v2 (true zeros) for any quantization; v1 (z - 1) only when symmetric."""

    method = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = True, checkpoint_format: str = V1,
                 desc_act: bool | None = None, damp_percent: float = 0.01, true_sequential: bool = True):
        check_bits(bits)
        check_group_size(group_size, "gptq")
        if checkpoint_format not in FORMATS:
            raise QuantConfigError(f"checkpoint_format {checkpoint_format!r} is not one of {FORMATS}")
        if checkpoint_format == V1 and not sym:
            raise QuantConfigError("GPTQ v1 (checkpoint_format 'gptq') stores zero points as z - 1 and cannot hold the "
                             "z = 0 of asymmetric quantization (the asymmetric v1 packing bug: -1 wraps to 2^bits - 1 "
                             "and corrupts its word); write checkpoint_format 'gptq_v2' or quantize with sym=True")
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.checkpoint_format = checkpoint_format
        self.desc_act = desc_act
        self.damp_percent, self.true_sequential = damp_percent, true_sequential
        self._saw_act_order = False

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        want_group = k if self.group_size == -1 else self.group_size
        if (result.bits, result.sym, result.group_size) != (self.bits, self.sym, want_group):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, sym={result.sym}, group_size="
                             f"{result.group_size} but the packer writes bits={self.bits}, sym={self.sym}, "
                             f"group_size={want_group}")
        zeros = result.zeros.T.contiguous()  # [G, N] true zero points
        if self.checkpoint_format == V1:
            if bool((zeros < 1).any()):
                raise QuantConfigError(f"{prefix}: a zero point of 0 cannot be written as GPTQ v1 (z - 1 = -1)")
            zeros = zeros - 1
        self._saw_act_order |= not result.has_trivial_g_idx
        return {
            f"{prefix}.qweight": pack_int32(result.codes.T, self.bits, 0),
            f"{prefix}.qzeros": pack_int32(zeros, self.bits, 1),
            f"{prefix}.scales": result.scales.T.to(dtype).contiguous(),
            f"{prefix}.g_idx": result.g_idx.to(torch.int32).contiguous(),
        }

    def _desc_act(self) -> bool:
        return self._saw_act_order if self.desc_act is None else self.desc_act

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' GPTQConfig writes it (format and its legacy name checkpoint_format)."""
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "damp_percent": self.damp_percent, "desc_act": self._desc_act(), "sym": self.sym,
                "true_sequential": self.true_sequential, "format": self.checkpoint_format,
                "checkpoint_format": self.checkpoint_format, "meta": {"quantizer": ["qshard"]}}

    def extra_files(self) -> list[tuple[str, str]]:
        """quantize_config.json as AutoGPTQ / GPTQModel write it beside config.json."""
        config = {"bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
                  "desc_act": self._desc_act(), "static_groups": False, "sym": self.sym,
                  "true_sequential": self.true_sequential, "model_name_or_path": None, "model_file_base_name": None,
                  "quant_method": "gptq", "checkpoint_format": self.checkpoint_format}
        return [("quantize_config.json", json.dumps(config, indent=2))]

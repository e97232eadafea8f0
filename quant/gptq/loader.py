"""GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers/optimum, TGI): the loader.

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

import logging
from dataclasses import replace
from typing import Any

import torch

from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32, unpack_int32
from parallel.sharding import (Axis, Groups, LinearShard, Role, TensorSource, local_group_ids, read_shard,
                               tensor_name, trivial_group_ids)
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.packed_layers import check_group_size, check_stored, dense_if_unquantized, effective_group_size, \
    read_whole
from quant.gptq.config import GPTQParams, check_bits
from quant.gptq.zeros import V1, V2, ZeroDecision, decide, overflow_message, overflowed_fields

logger = logging.getLogger(__name__)

SCALES = Role("scales", (Axis.G, Axis.N))
G_IDX = Role("g_idx", (Axis.K,), group_ids=True)
def qweight_role(bits: int) -> Role:
    return Role("qweight", (Axis.K, Axis.N), packed_dim=0, bits=bits)


def qzeros_role(bits: int) -> Role:
    return Role("qzeros", (Axis.G, Axis.N), packed_dim=1, bits=bits)


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

"""bitsandbytes 4-bit (nf4 / fp4) tensors of one layer, and a rank's part of them as a LUT4Layout.

Stored per layer `{p}` (bitsandbytes QuantState.as_dict(packed=True), as transformers saves it):
- `{p}.weight`: the N*K codes flattened row-major, two per byte (even element in the high nibble),
  in a `quant_storage` container of any dtype, shape [N*K/2 / itemsize, 1]; its bytes are the codes.
- `{p}.weight.absmax` float32 [N*K / blocksize]: one scale per block of the flat weight; nested
  ("double quant"): uint8 codes into `weight.nested_quant_map` (256 floats) scaled by
  `weight.nested_absmax` (one per nested_blocksize absmax), plus `nested_offset`.
- `{p}.weight.quant_map` float32 [16]: the value of each code (the NF4 or FP4 table).
- `{p}.weight.quant_state.bitsandbytes__{nf4|fp4}`: uint8 bytes of a JSON object
  {quant_type, blocksize, dtype, shape [N, K], nested_blocksize, nested_dtype, nested_offset}.
w.flat[i] = quant_map[code(i)] * absmax[i // blocksize].

Sharding: when K is a multiple of blocksize no block crosses a row, so the weight is an [N, K/2]
byte matrix with absmax [N, K/blocksize]: a rank takes rows (column-parallel) or a range of whole
blocks of K (row-parallel). A rank whose K range would cut a block is refused, naming the layer.
Otherwise blocks run across rows: an unsplit or column-parallel rank whose rows start (and end) on
block boundaries reads its flat range of codes and is dequantized at load (no LUT4Layout holds
it); other ranks are refused.
The nested absmax is dequantized at load (its blocks do cross rows), for the whole layer: it is
1/blocksize of the weight.

The weight is the float32 product, as bitsandbytes computes it; bitsandbytes then rounds it to the
quant_state's `dtype` before its matmul, qshard to the engine's dtype (the same when they agree).
"""

from __future__ import annotations

import json

import torch

from kernels.layouts import LUT4Layout
from parallel.sharding import Layout, LinearShard, TensorSource, tensor_name
from quant.base import QuantConfigError
from quant.bitsandbytes.config import QUANT_TYPES

STATE_PREFIX = "weight.quant_state.bitsandbytes__"


def quant_state_name(weights: TensorSource, src: str) -> str | None:
    found = [tensor_name(src, STATE_PREFIX + t) for t in QUANT_TYPES if weights.has(tensor_name(src, STATE_PREFIX + t))]
    if len(found) > 1:
        raise QuantConfigError(f"bitsandbytes layer {src} stores both {' and '.join(found)}; expected one quant_state")
    return found[0] if found else None


def read_quant_state(weights: TensorSource, src: str, quant_type: str) -> dict:
    name = quant_state_name(weights, src)
    if name is None:
        raise QuantConfigError(f"tensor {tensor_name(src, STATE_PREFIX + quant_type)} is missing from the "
                               f"bitsandbytes 4-bit checkpoint (every quantized layer needs its quant_state)")
    raw = weights.read(name, None)
    try:
        state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantConfigError(f"tensor {name} is not a JSON quant_state: {e}") from None
    if not isinstance(state, dict):
        raise QuantConfigError(f"tensor {name} holds JSON {type(state).__name__}, not a quant_state object")
    stored_type = name.rsplit("__", 1)[1]
    if state.get("quant_type", stored_type) != stored_type or stored_type != quant_type:
        raise QuantConfigError(f"tensor {name} says quant_type={state.get('quant_type', stored_type)!r} but the "
                               f"quantization_config says bnb_4bit_quant_type={quant_type!r}")
    for key in ("blocksize", "shape"):
        if key not in state:
            raise QuantConfigError(f"tensor {name} has no field {key!r}")
    bs, shape = state["blocksize"], state["shape"]
    if not isinstance(bs, int) or bs <= 0 or bs % 2:
        raise QuantConfigError(f"tensor {name} field blocksize={bs!r} must be a positive even integer")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise QuantConfigError(f"tensor {name} field shape={shape!r} must be [out_features, in_features]")
    return state


def _need(weights: TensorSource, name: str, why: str) -> str:
    if not weights.has(name):
        raise QuantConfigError(f"tensor {name} is missing from the bitsandbytes checkpoint ({why})")
    return name


def dequantized_absmax(weights: TensorSource, src: str, state: dict, blocks: int) -> torch.Tensor:
    """float32 [blocks]: the layer's absmax, nested (double-quant) codes decoded as bitsandbytes does."""
    name = _need(weights, tensor_name(src, "weight.absmax"), "one scale per block")
    if list(weights.get_shape(name)) != [blocks]:
        raise QuantConfigError(f"tensor {name} has shape {weights.get_shape(name)}, expected [{blocks}] "
                               f"(shape {state['shape']}, blocksize {state['blocksize']})")
    dtype = weights.get_dtype(name)
    if dtype != torch.uint8:
        if dtype != torch.float32:
            raise QuantConfigError(f"tensor {name} has dtype {dtype}; expected float32 (or uint8 when nested)")
        return weights.read(name, None, raw=True) if weights.dtype != torch.float32 else weights.read(name, None)
    codes = weights.read(name, None).long()
    nested = _need(weights, tensor_name(src, "weight.nested_absmax"), f"{name} is uint8: nested absmax")
    table_name = _need(weights, tensor_name(src, "weight.nested_quant_map"), f"{name} is uint8: nested absmax")
    nbs = state.get("nested_blocksize")
    if not isinstance(nbs, int) or nbs <= 0 or "nested_offset" not in state:
        raise QuantConfigError(f"quant_state of {src} lacks nested_blocksize / nested_offset for its uint8 absmax")
    n_nested = -(-blocks // nbs)
    if list(weights.get_shape(nested)) != [n_nested] or list(weights.get_shape(table_name)) != [256]:
        raise QuantConfigError(f"tensors {nested} {weights.get_shape(nested)} / {table_name} "
                               f"{weights.get_shape(table_name)}: expected [{n_nested}] / [256]")
    scale = _raw_float32(weights, nested)
    table = _raw_float32(weights, table_name)
    absmax = table[codes] * scale.repeat_interleave(nbs)[:blocks]
    return absmax + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)


def _raw_float32(weights: TensorSource, name: str) -> torch.Tensor:
    dtype = weights.get_dtype(name)
    if not dtype.is_floating_point:
        raise QuantConfigError(f"tensor {name} has dtype {dtype}; expected a float")
    return weights.read(name, None, raw=True).float() if weights.dtype != dtype else weights.read(name, None).float()


def read_code_rows(weights: TensorSource, src: str, n: int, k: int, r0: int, r1: int) -> torch.Tensor:
    """uint8 [r1 - r0, K/2]: the code bytes of rows [r0, r1), read from the quant_storage container."""
    name = _need(weights, tensor_name(src, "weight"), "the packed codes")
    dtype = weights.get_dtype(name)
    size = dtype.itemsize
    shape = list(weights.get_shape(name))
    total = n * k // 2
    if len(shape) != 2 or shape[1] != 1 or shape[0] * size != total:
        raise QuantConfigError(f"tensor {name} has shape {shape} ({dtype}); a {n}x{k} 4-bit weight is stored as "
                               f"[{total // size}, 1] {dtype} ({total} bytes)")
    row_bytes = k // 2
    if row_bytes % size:
        raise QuantConfigError(f"tensor {name}: a row of {row_bytes} bytes is not a whole number of {dtype} "
                               f"elements, so rows cannot be read apart")
    index = (slice(r0 * row_bytes // size, r1 * row_bytes // size), slice(None))
    raw = dtype.is_floating_point and dtype != weights.dtype  # a cast would change the bytes (NaN patterns)
    t = weights.read(name, index, raw=True) if raw else weights.read(name, index)
    return t.contiguous().view(torch.uint8).reshape(r1 - r0, row_bytes)


def load_4bit(weights: TensorSource, shard: LinearShard, quant_type: str) -> LUT4Layout | torch.Tensor:
    """The rank's LUT4Layout of a (possibly fused) 4-bit layer; when K is not a multiple of the
    blocksize (blocks run across rows) the rank's dequantized float32 rows instead, where its rows
    start and end on block boundaries."""
    K = shard.in_features
    codes, absmaxes, dense, table, bs = [], [], [], None, None
    for src in shard.sources:
        state = read_quant_state(weights, src, quant_type)
        n_src = max(b.offset + b.size for b in shard.blocks if b.source == src)
        if state["shape"] != [n_src, K]:
            raise QuantConfigError(f"quant_state of {src} has shape {state['shape']}, expected [{n_src}, {K}]")
        if bs is None:
            bs = state["blocksize"]
        elif state["blocksize"] != bs:
            raise QuantConfigError(f"bitsandbytes layers {list(shard.sources)} run as one fused matmul but have "
                                   f"blocksizes {bs} and {state['blocksize']} ({src})")
        _check_blocks(src, shard, bs, n_src)
        map_name = _need(weights, tensor_name(src, "weight.quant_map"), "the 16 code values")
        if list(weights.get_shape(map_name)) != [16]:
            raise QuantConfigError(f"tensor {map_name} has shape {weights.get_shape(map_name)}, expected [16]")
        t = _raw_float32(weights, map_name)
        if table is None:
            table = t
        elif not torch.equal(t, table):
            raise QuantConfigError(f"bitsandbytes layers {list(shard.sources)} run as one fused matmul but "
                                   f"{map_name} differs from {shard.sources[0]}'s quant_map")
        absmax = dequantized_absmax(weights, src, state, -(-n_src * K // bs))
        for b in shard.blocks:
            if b.source != src:
                continue
            r0, r1 = b.offset + b.start, b.offset + b.stop
            if K % bs:
                dense.append(_flat_rows(weights, src, n_src, K, r0, r1, table, absmax, bs))
                continue
            rows_absmax = absmax.reshape(n_src, K // bs)
            codes.append(read_code_rows(weights, src, n_src, K, r0, r1)[:, shard.k_start // 2: shard.k_stop // 2])
            absmaxes.append(rows_absmax[r0:r1, shard.k_start // bs: shard.k_stop // bs])
    if dense:
        return torch.cat(dense)
    return LUT4Layout(torch.cat(codes).contiguous(), torch.cat(absmaxes).contiguous(), table.contiguous(), bs)


def _flat_rows(weights: TensorSource, src: str, n: int, k: int, r0: int, r1: int, table: torch.Tensor,
               absmax: torch.Tensor, bs: int) -> torch.Tensor:
    """float32 [r1 - r0, K] of a layer whose blocks run across rows: the flat elements
    [r0*K, r1*K) decoded (r0*K is a block boundary, so an even element and a whole byte)."""
    name = _need(weights, tensor_name(src, "weight"), "the packed codes")
    dtype = weights.get_dtype(name)
    size, total = dtype.itemsize, -(-n * k // 2)
    shape = list(weights.get_shape(name))
    if len(shape) != 2 or shape[1] != 1 or shape[0] != -(-total // size):
        raise QuantConfigError(f"tensor {name} has shape {shape} ({dtype}); a {n}x{k} 4-bit weight is stored as "
                               f"[{-(-total // size)}, 1] {dtype} ({total} bytes)")
    e0, e1 = r0 * k, r1 * k
    b0, b1 = e0 // 2, -(-e1 // 2)
    index = (slice(b0 // size, -(-b1 // size)), slice(None))
    raw = dtype.is_floating_point and dtype != weights.dtype
    t = (weights.read(name, index, raw=True) if raw else weights.read(name, index)).contiguous().view(torch.uint8)
    packed = t.reshape(-1)[b0 - b0 // size * size:][: b1 - b0]
    c = torch.stack((packed >> 4, packed & 15), -1).reshape(-1)[: e1 - e0].long()
    scale = absmax[torch.arange(e0, e1) // bs]
    return (table[c] * scale).reshape(r1 - r0, k)


def _check_blocks(src: str, shard: LinearShard, bs: int, n_src: int) -> None:
    K = shard.in_features
    if K % bs:  # blocks run across rows: a rank needs whole rows, starting and ending on block boundaries
        if shard.layout is Layout.ROW:
            raise QuantConfigError(f"bitsandbytes layer {src}: in_features {K} is not a multiple of blocksize "
                                   f"{bs}, so its blocks run across rows and rank {shard.rank} of "
                                   f"{shard.world_size} cannot take part of each row; only column-parallel or "
                                   f"unsplit layers load")
        for b in shard.blocks:
            r0, r1 = b.offset + b.start, b.offset + b.stop
            if b.source == src and ((r0 * K) % bs or ((r1 * K) % bs and r1 != n_src)):
                raise QuantConfigError(f"bitsandbytes layer {src}: rank {shard.rank} of {shard.world_size} would "
                                       f"take rows [{r0}, {r1}) of {K} in-features each, splitting a block of {bs} "
                                       f"(in_features is not a multiple of the blocksize, so blocks run across rows)")
        return
    if shard.layout is Layout.ROW and (shard.k_start % bs or shard.k_stop % bs):
        fits = [t for t in range(1, 9) if K % (bs * t) == 0]
        raise QuantConfigError(f"bitsandbytes layer {src}: rank {shard.rank} of {shard.world_size} would take "
                               f"in-features [{shard.k_start}, {shard.k_stop}), splitting a block of {bs} "
                               f"(in_features {K} = {K // bs} blocks); tensor-parallel sizes that keep blocks "
                               f"whole: {fits}")

"""The sharding rules, swept: for plain, GPTQ and AWQ checkpoints, every layer kind (column, merged
gate_up, fused QKV with and without KV-head replication, QKV stored fused, row) at TP 1-4, each
rank's dequantized weight equals its slice of the full dequantized weight bit for bit, and a
rank reads about its share of the big tensor, never all of it.

Sizes are chosen to break every alignment: in-features K = 180 (group -1: 45 rows per rank at TP 4,
not a whole word at any bit width) or 3 groups (96 / 192 / 384 for group 32 / 64 / 128: 1.5 groups
per rank at TP 2, 0.75 at TP 4); out-features 60 / 36 / 15 give column shards that end inside
packed words. (The 1152 / 128 at TP 2 of the issue is in tests/quant/test_gptq_loader.py.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels.packing import run_shape
from parallel.sharding import Layout, LinearShard, column_shard, qkv_shard, row_shard, tensor_name
from quant import get_loader
from tests.quant.checkpoints import (CountingWeights, awq_tensors, expected_slice, gptq_tensors, one_intra_op_thread,
                                     random_result, save_checkpoint)

K_FOR_GROUP = {-1: 180, 32: 96, 64: 192, 128: 384}  # 3 groups: misaligned at TP 2 and 4
HEAD_DIM = 5
# source -> out-features; every source takes the same K. 12 query heads of 5; k/v: 2 KV heads,
# k3/v3: 3, k1/v1: 1; qkv: q, k, v stored as one tensor.
COLUMN_SOURCES = {"col": 60, "gate": 60, "up": 36, "q": 60, "k": 10, "v": 10, "k3": 15, "v3": 15, "k1": 5, "v1": 5,
                  "qkv": 80}
ROW_OUT = 20
TP_SIZES = (1, 2, 3, 4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with one_intra_op_thread():
        yield


def layer_shards(k: int, tp: int, rank: int) -> dict[str, LinearShard]:
    shards = {
        "column": column_shard([("col", 60)], k, rank, tp),
        "gate_up": column_shard([("gate", 60), ("up", 36)], k, rank, tp),
        "row": row_shard("row", k, ROW_OUT, rank, tp),
    }
    if tp in (1, 2, 4):  # 2 KV heads: split at TP 1-2, replicated at TP 4
        shards["qkv"] = qkv_shard(["q", "k", "v"], k, 12, 2, HEAD_DIM, rank, tp)
        shards["qkv_stored_fused"] = qkv_shard(["qkv"], k, 12, 2, HEAD_DIM, rank, tp, fused=True)
    if tp in (1, 3):  # 3 KV heads: one per rank at TP 3
        shards["qkv_3kv"] = qkv_shard(["q", "k3", "v3"], k, 12, 3, HEAD_DIM, rank, tp)
    shards["qkv_1kv"] = qkv_shard(["q", "k1", "v1"], k, 12, 1, HEAD_DIM, rank, tp)  # replicated at TP 2-4
    return shards


def all_sources(k: int) -> dict[str, tuple[int, int]]:
    """source -> (out-features, in-features)."""
    return {**{s: (n, k) for s, n in COLUMN_SOURCES.items()}, "row": (ROW_OUT, k)}


def sweep(path, config, full: dict[str, torch.Tensor], k: int, big: str, small: tuple[str, ...], packed_dim=None,
          bits=None) -> int:
    """Load every layer kind at every TP size and rank; compare with the full weight's slice and
    check the bytes read. Returns the number of rank-layers checked."""
    weights = CountingWeights(path, dtype=torch.float32)
    loader = get_loader(config)
    checked = 0
    for tp in TP_SIZES:
        for rank in range(tp):
            for kind, shard in layer_shards(k, tp, rank).items():
                weights.reset()
                got = loader.load_linear(weights, shard).dequantize()
                want = expected_slice(full, shard)
                where = f"{kind} tp={tp} rank={rank}"
                assert got.dtype == torch.float32 and got.shape == want.shape, f"{where}: {got.shape} vs {want.shape}"
                assert torch.equal(got, want), f"{where}: max diff {(got - want).abs().max()}"
                _check_bytes(weights, shard, tp, big, small, packed_dim, bits, where)
                checked += 1
    return checked


def _check_bytes(weights: CountingWeights, shard: LinearShard, tp: int, big: str, small: tuple[str, ...],
                 packed_dim, bits, where: str) -> None:
    allowed_total = 0
    for src in shard.sources:
        name = tensor_name(src, big)
        shape, full_bytes = weights.get_shape(name), _nbytes(weights, name)
        blocks = [b for b in shard.blocks if b.source == src]
        if shard.layout is Layout.ROW:
            fraction = shard.local_in_features / shard.in_features
        else:
            fraction = sum(b.local_size for b in blocks) / max(b.offset + b.size for b in blocks)
        slack = 0
        if packed_dim is not None:  # a packed range may start and end inside a run of words
            other = full_bytes // shape[packed_dim]
            slack = 2 * run_shape(bits)[1] * other * len(blocks)
        share = full_bytes * fraction + slack
        read = weights.read_by_name.get(name, 0)
        assert read <= share, f"{where}: read {read} bytes of {name}, its share is {share:.0f}"
        if tp > 1 and share < full_bytes:  # (a 10-column AWQ tensor is 2 words wide: both cover a 5-column half)
            assert read < full_bytes, f"{where}: read all of {name}"
        small_bytes = sum(_nbytes(weights, tensor_name(src, s)) for s in small if weights.has(tensor_name(src, s)))
        allowed_total += share + 2 * small_bytes  # tables may be read whole twice (format checks, then the shard)
    assert weights.bytes_read <= allowed_total, f"{where}: read {weights.bytes_read} bytes, allowed {allowed_total:.0f}"


def _nbytes(weights: CountingWeights, name: str) -> int:
    return torch.Size(weights.get_shape(name)).numel() * torch.tensor([], dtype=weights.get_dtype(name)).element_size()


# -- plain ---------------------------------------------------------------------------------------


def test_plain_roles(tmp_path):
    k = 180
    gen = torch.Generator().manual_seed(0)
    full = {src: torch.randn(n, kk, generator=gen) for src, (n, kk) in all_sources(k).items()}
    save_checkpoint(tmp_path, {f"{s}.weight": w for s, w in full.items()})
    assert sweep(tmp_path, None, full, k, "weight", ()) == 58  # rank-layers over TP 1-4


# -- GPTQ ----------------------------------------------------------------------------------------


def _gptq_cases():
    for bits in (2, 3, 4, 8):
        for group in (-1, 32, 64, 128):
            for sym in (True, False):
                for act in (False, True):
                    if group == -1 and act:
                        continue  # one group: every permutation of it is trivial
                    for version in ("gptq", "gptq_v2"):  # asymmetric v1 with zeros >= 1 (no overflow)
                        name = f"b{bits}-g{group}-{'sym' if sym else 'asym'}-{'act' if act else 'noact'}-{version}"
                        yield pytest.param(bits, group, sym, act, version, id=name)


@pytest.mark.parametrize("bits, group, sym, act, version", list(_gptq_cases()))
def test_gptq_roles(tmp_path, bits, group, sym, act, version):
    k = K_FOR_GROUP[group]
    results = {src: random_result(n, kk, bits, group, sym, act_order=act, min_zero=1 if version == "gptq" else 0,
                                  seed=i) for i, (src, (n, kk)) in enumerate(all_sources(k).items())}
    shared = results["col"].g_idx  # fused parts share their input, hence g_idx
    results = {s: replace(r, g_idx=shared) for s, r in results.items()}
    tensors = {}
    for src, r in results.items():
        tensors.update(gptq_tensors(src, r, version))
    save_checkpoint(tmp_path, tensors)
    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": act,
              "checkpoint_format": version}
    full = {s: r.dequantize() for s, r in results.items()}
    sweep(tmp_path, config, full, k, "qweight", ("qzeros", "scales", "g_idx"), packed_dim=0, bits=bits)


# -- AWQ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "zeros8"])
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
def test_awq_roles(tmp_path, group, sym):
    k = K_FOR_GROUP[group]
    results = {src: random_result(n, kk, 4, group, sym, seed=i)
               for i, (src, (n, kk)) in enumerate(all_sources(k).items())}
    tensors = {}
    for src, r in results.items():
        tensors.update(awq_tensors(src, r))
    save_checkpoint(tmp_path, tensors)
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    full = {s: r.dequantize() for s, r in results.items()}
    sweep(tmp_path, config, full, k, "qweight", ("qzeros", "scales"), packed_dim=1, bits=4)

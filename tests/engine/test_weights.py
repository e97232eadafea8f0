"""Weights: lazy shard reads equal slices of the full tensor and never read the whole tensor."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from engine.weights import CheckpointError, Weights
from parallel.sharding import ShardingError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(24, 36, generator=g),
        "b": torch.randn(12, 8, 6, generator=g),
        "fused": torch.randn(48, 10, generator=g),  # blocks 24 + 12 + 12 along dim 0
        "ints": torch.randint(-2**31, 2**31 - 1, (16, 12), dtype=torch.int32, generator=g),
    }
    # two files and an index, as sharded HF checkpoints are
    save_file({k: tensors[k] for k in ("a", "b")}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in ("fused", "ints")}, str(d / "model-00002-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "fused": "model-00002-of-00002.safetensors", "ints": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, tensors


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["a", "b", "ints"]), dim=st.integers(0, 2), world=st.sampled_from([1, 2, 3, 4, 6]),
       data=st.data())
def test_get_sharded_is_the_slice(checkpoint, name, dim, world, data):
    path, tensors = checkpoint
    full = tensors[name]
    dim = dim % full.dim()
    rank = data.draw(st.integers(0, world - 1))
    w = Weights(path, rank=rank, world_size=world)
    if full.shape[dim] % world:
        with pytest.raises(ShardingError, match=f"{full.shape[dim]} is not divisible by the tensor-parallel size {world}"):
            w.get_sharded(name, dim)
        return
    part = full.shape[dim] // world
    shard = w.get_sharded(name, dim)
    assert torch.equal(shard, full.narrow(dim, rank * part, part))
    # only the shard's bytes were read, never the whole tensor
    assert w.bytes_read == shard.numel() * shard.element_size()
    if world > 1:
        assert w.bytes_read < full.numel() * full.element_size()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 12])
def test_get_packed_sharded_takes_each_block(checkpoint, world):
    path, tensors = checkpoint
    full, blocks = tensors["fused"], [24, 12, 12]
    for rank in range(world):
        w = Weights(path, rank=rank, world_size=world)
        got = w.get_packed_sharded("fused", 0, blocks)
        want, offset = [], 0
        for b in blocks:
            want.append(full[offset + rank * b // world: offset + (rank + 1) * b // world])
            offset += b
        assert torch.equal(got, torch.cat(want))
        assert w.bytes_read == got.numel() * 4


def test_floats_cast_ints_kept(checkpoint):
    path, tensors = checkpoint
    w = Weights(path, dtype=torch.bfloat16)
    assert w.get_tensor("a").dtype == torch.bfloat16
    assert torch.equal(w.get_tensor("ints"), tensors["ints"])


def test_resident_memory_grows_by_the_shard_only(tmp_path):
    """A rank reading its quarter of a 256 MiB tensor adds far less than the tensor to its RSS."""
    big = torch.randn(8192, 8192)  # 256 MiB
    save_file({"w": big}, str(tmp_path / "model.safetensors"))
    del big

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    w = Weights(tmp_path, rank=1, world_size=4)
    before = rss()
    shard = w.get_sharded("w", 0)
    grown = rss() - before
    assert shard.shape == (2048, 8192)
    assert grown < 64 * 2**20 + 16 * 2**20 + shard.numel() * 4, grown / 2**20


def test_missing_tensor_named(checkpoint):
    path, _ = checkpoint
    with pytest.raises(CheckpointError, match="tensor model.layers.0.nope.weight is missing"):
        Weights(path).get_tensor("model.layers.0.nope.weight")

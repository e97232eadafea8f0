"""Lazy, shard-aware reads of safetensors checkpoints.

`Weights` opens every `*.safetensors` file of a checkpoint (through `model.safetensors.index.json`
when present) and reads tensors, or slices of them, on demand: a rank only ever touches the bytes
of its own shard. Floating-point tensors are cast to the engine's dtype; integer and float8
tensors keep theirs. Quantization formats read through this class via `quant` loaders; nothing
here knows a format.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from parallel.sharding import Axis, Role, ShardingError, column_shard, read_shard
from kernels.errors import QShardError

logger = logging.getLogger(__name__)

RELEASE_BYTES = 8 << 20  # see Weights._release_map
_KEEP_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(QShardError, ValueError):
    """A checkpoint file is missing, corrupt, truncated or lacks a tensor; the message names it."""


class Weights:
    """Tensors of one checkpoint directory (or an explicit list of files), read lazily."""

    def __init__(self, files: Sequence[str | os.PathLike] | str | os.PathLike, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        self.dtype = dtype
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.bytes_read = 0
        self._files = self._find_files(files)
        self._handles = {}
        self._read_since_open: dict[Path, int] = {}
        self._where: dict[str, Path] = {}
        for path in self._files:
            handle = self._open(path)
            self._handles[path] = handle
            for name in handle.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears in both {self._where[name].name} and {path.name}")
                self._where[name] = path

    # -- discovery ---------------------------------------------------------------------------

    @staticmethod
    def _find_files(files) -> list[Path]:
        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            if root.is_dir():
                index = root / "model.safetensors.index.json"
                if index.exists():
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
                    paths = [root / f for f in dict.fromkeys(weight_map.values())]
                else:
                    paths = sorted(root.glob("*.safetensors"))
                if not paths:
                    pickled = [p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES]
                    hint = (f"; found {pickled}: qshard reads safetensors only, pickle checkpoints are never "
                            f"loaded (convert them to safetensors)" if pickled else "")
                    raise CheckpointError(f"no *.safetensors files in {root}{hint}")
            else:
                paths = [root]
        else:
            paths = [Path(f) for f in files]
        for p in paths:
            if not p.exists():
                raise CheckpointError(f"checkpoint file {p} does not exist")
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p} is not a .safetensors file; pickle checkpoints are never loaded")
        return paths

    @staticmethod
    def _open(path: Path):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {e}") from None
        size = path.stat().st_size
        # safetensors checks offsets lazily; check the data section fits the file up front.
        end = 0
        for name in handle.keys():
            s = handle.get_slice(name)
            n = 1
            for d in s.get_shape():
                n *= d
            end += n * _itemsize(s.get_dtype())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little") + 8
        if header + end > size:
            raise CheckpointError(f"checkpoint file {path} is truncated: its header describes "
                                  f"{header + end} bytes but the file has {size}")
        return handle

    # -- the TensorSource protocol ----------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        try:
            path = self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint "
                                  f"({', '.join(p.name for p in self._files)})") from None
        return self._handle(path).get_slice(name)

    def _release_map(self, path: Path, nbytes: int) -> None:
        """Pages read through a handle's memory map stay in this process's resident set until the
        map goes: drop the handle (reopened lazily) every RELEASE_BYTES read through it, so that a
        rank's RSS grows by the tensors it keeps, not by every page of the checkpoint it touched.
        Not after every read: reopening parses the header again (~17 ms for 900 tensors)."""
        self._read_since_open[path] = self._read_since_open.get(path, 0) + nbytes
        if self._read_since_open[path] >= RELEASE_BYTES:
            self._handles[path] = None
            self._read_since_open[path] = 0

    def _handle(self, path: Path):
        """The file's safetensors handle, reopened if `read` released it."""
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle

    def get_shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def get_dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._slice(name).get_dtype()]

    def read(self, name: str, index: tuple[slice, ...] | None = None, raw: bool = False) -> torch.Tensor:
        """Read `name` (or the box `index` of it), cast floats to self.dtype (raw: stored dtype, for
        packed codes kept in a float container), on self.device."""
        s = self._slice(name)
        try:
            if not s.get_shape():  # 0-d tensors (per-tensor scales) take no slice
                t = self._handle(self._where[name]).get_tensor(name)
            else:
                t = s[index] if index else s[:]
        except Exception as e:  # safetensors raises plain errors for bad slices / bad bytes
            raise CheckpointError(f"could not read tensor {name}{list(index) if index else ''}: {e}") from None
        self.bytes_read += t.numel() * t.element_size()
        touched = t.numel() * t.element_size()
        if index is not None and t.dim() > 1 and any(i != slice(None) for i in index[1:]):
            touched = t.shape[0] * math.prod(s.get_shape()[1:]) * t.element_size()  # whole rows' pages
        mapped = t  # a view of the file's memory map
        if not raw and t.is_floating_point() and t.dtype not in _KEEP_DTYPES:
            t = t.to(self.dtype)
        if self.device.type == "cpu" and t.data_ptr() == mapped.data_ptr():
            t = t.clone()  # own memory: a kept tensor must not pin the map (see _release_map)
        del mapped
        self._release_map(self._where[name], touched)
        return t.to(self.device)

    # -- convenience reads (TGI-style names) --------------------------------------------------

    def get_tensor(self, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        if shape is not None and self.get_shape(name) != list(shape):
            raise CheckpointError(f"tensor {name} has shape {self.get_shape(name)}, expected {list(shape)}")
        return self.read(name)

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's even slice of `name` along `dim`."""
        return self.get_packed_sharded(name, dim, [self.get_shape(name)[dim]])

    def get_packed_sharded(self, name: str, dim: int, block_sizes: Sequence[int]) -> torch.Tensor:
        """`name` stores several blocks back to back along `dim` (e.g. fused qkv); take this
        rank's even slice of each block and concatenate them."""
        shape = self.get_shape(name)
        dim = dim % len(shape)
        if sum(block_sizes) != shape[dim]:
            raise ShardingError(f"tensor {name} has size {shape[dim]} along dim {dim}, "
                                f"but its blocks {list(block_sizes)} add up to {sum(block_sizes)}")
        prefix, _, suffix = name.rpartition(".")
        offsets = [sum(block_sizes[:i]) for i in range(len(block_sizes))]
        shard = column_shard([(prefix, b) for b in block_sizes], 0, self.rank, self.world_size, offsets)
        # The fake K axis is never cut by a column shard; FULL dims are read whole.
        axes = tuple(Axis.N if d == dim else Axis.FULL for d in range(len(shape)))
        return read_shard(self, Role(suffix, axes), shard)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files a checkpoint directory would load (CheckpointError when it has none,
    or only pickle files), found without reading a tensor: the driver checks this before ranks start."""
    return Weights._find_files(path)


def _itemsize(dtype: str) -> int:
    return torch.tensor([], dtype=_DTYPES[dtype]).element_size()


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}

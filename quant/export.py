"""Write a quantized checkpoint from a float one: each decoder linear layer's weight goes through a
quantize function (RTN, GPTQ, ...) and the format's `Packer`; everything else is copied.

Output: config.json with the format's quantization_config, safetensors files (sharded with an
index above `max_shard_bytes`), tokenizer/generation files copied. Written into a temporary
directory renamed into place, so an interrupted export leaves no half checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kernels.errors import InputError
from quant.base import Packer
from quant.calibrate.args import QuantResult
from quant.output_dir import atomic_directory

logger = logging.getLogger(__name__)

# decoder linear layers: model.layers.<i>.<self_attn|mlp>.<name>_proj.weight
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")

QuantizeFn = Callable[[str, torch.Tensor], QuantResult]


def is_quantizable(name: str, skip: Iterable[str] = ()) -> bool:
    prefix = name[: -len(".weight")]
    return bool(LINEAR_WEIGHT.match(name)) and not any(s and s in prefix for s in skip)


def float_tensors(model_dir: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a float checkpoint, one at a time, in file order."""
    index = model_dir / "model.safetensors.index.json"
    files = (list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else sorted(p.name for p in model_dir.glob("*.safetensors")))
    if not files:
        raise InputError(f"no *.safetensors files in {model_dir}")
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def check_not_quantized(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc or (model_dir / "quantize_config.json").exists():
        method = (qc or {}).get("quant_method", "gptq")
        raise InputError(f"{model_dir} is already quantized ({method}); quantize a float checkpoint")
    return config


def export_quantized(model_dir: str | Path, out_dir: str | Path, packer: Packer, quantize: QuantizeFn,
                     skip: Iterable[str] = ("lm_head",), dtype: torch.dtype = torch.float16,
                     max_shard_bytes: int = 4 << 30, progress: bool = True,
                     tensors: Iterable[tuple[str, torch.Tensor]] | None = None, overwrite: bool = False) -> Path:
    """Quantize `model_dir` into `out_dir`. `tensors` (name, float tensor) may replace reading
    model_dir's files, e.g. weights already updated by layer-wise calibration. An existing
    non-empty `out_dir` is replaced only with `overwrite`, and never one that is, contains or lies
    inside `model_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = check_not_quantized(model_dir)
    skip = tuple(skip)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=(model_dir,)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        source = tensors if tensors is not None else float_tensors(model_dir)
        for name, tensor in tqdm(source, desc="quantizing", unit="tensor", disable=not progress):
            if is_quantizable(name, skip):
                prefix = name[: -len(".weight")]
                result = quantize(prefix, tensor.float())
                writer.add(packer.pack(prefix, result, dtype))
            else:
                writer.add({name: tensor.to(dtype) if tensor.is_floating_point() else tensor})
        writer.close()
        config["quantization_config"] = packer.quantization_config()
        config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra in packer.extra_files():
            (tmp / extra[0]).write_text(extra[1])
        for f in _COPIED_FILES:
            if (model_dir / f).exists():
                shutil.copy2(model_dir / f, tmp / f)
    return out_dir


class ShardWriter:
    """Collects tensors and writes model-0000i-of-0000n.safetensors files plus their index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        for name, t in tensors.items():
            self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        i = len(self.files)
        save_file(self.pending, str(self.out_dir / f"part-{i}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out_dir / "part-0.safetensors", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"part-{i}.safetensors", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

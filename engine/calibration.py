"""qshard's own Llama-family model as a `quant.calibrate.pipeline.CalibrationTarget`.

The model is built at TP=1 from the float checkpoint with the unquantized loader, in float32
(GPTQ's Hessians and error feedback want full precision). Blocks run without a KV cache on
batches of whole calibration samples. Fused modules (q/k/v, gate/up) expose their checkpoint
layers as row slices sharing one input, hence one Hessian.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.models import model_class
from engine.weights import Weights
from parallel.state import single_process
from quant import get_loader
from quant.calibrate.pipeline import CalibratedLinear, LinearPart
from kernels.errors import QShardError

logger = logging.getLogger(__name__)


class AlreadyQuantizedError(QShardError, ValueError):
    """The model directory holds a quantized checkpoint: calibration needs the float one."""


class LlamaCalibrationTarget:
    """Blocks = decoder layers of a float Llama/Mistral/Qwen2 checkpoint, run on `device`."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 8):
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        if cfg.quantization_config:
            method = cfg.quantization_config.get("quant_method", "?")
            raise AlreadyQuantizedError(f"{model_dir} is already quantized (quant_method {method!r}); "
                                        f"calibrate from the float checkpoint")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.config = cfg
        self.device = torch.device(device)
        self.batch_size = batch_size
        weights = Weights(model_dir, dtype=torch.float32, device=self.device)
        with torch.no_grad():  # not inference_mode: weights are rewritten in place later
            self.model = model_class(cfg.model_type)(cfg, weights, get_loader(None), single_process(self.device),
                                                     torch.float32, self.device)
        self.model.eval()
        self.num_blocks = len(self.model.layers)

    @torch.no_grad()
    def first_block_inputs(self, samples: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, ForwardBatch]]:
        states = []
        vocab = self.config.vocab_size
        for start in range(0, len(samples), self.batch_size):
            chunk = [list(s) for s in samples[start:start + self.batch_size]]
            for s in chunk:
                if not s or min(s) < 0 or max(s) >= vocab:
                    raise ValueError(f"a calibration sample must be a non-empty list of token ids in [0, {vocab})")
            batch = ForwardBatch.build(chunk, [0] * len(chunk), list(range(len(chunk))), self.device)
            states.append((self.model.embed_tokens(batch.token_ids), batch))
        return states

    @torch.no_grad()
    def run_block(self, index: int, hidden: tuple[torch.Tensor, ForwardBatch]) -> tuple[torch.Tensor, ForwardBatch]:
        h, batch = hidden
        out, residual = self.model.layers[index](h.clone(), None, batch, None)  # the block adds into its input
        return residual + out, batch

    def linears(self, index: int) -> list[CalibratedLinear]:
        layer = self.model.layers[index]
        modules = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
        return [_calibrated(m) for m in modules]


def _calibrated(parallel_linear) -> CalibratedLinear:
    """A ParallelLinear holding a DenseLinear at TP=1: its blocks are the checkpoint layers."""
    shard = parallel_linear.shard
    parts, row = [], 0
    for block in shard.blocks:
        if block.offset != 0:
            raise ValueError(f"{block.source} is stored fused with other layers (rows from {block.offset}); "
                             f"quantizing fused checkpoint tensors is not supported")
        parts.append(LinearPart(block.source, slice(row, row + block.size)))
        row += block.size
    param = parallel_linear.linear.weight

    def set_weight(w: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(w.to(param.dtype))

    return CalibratedLinear(module=parallel_linear, parts=parts, get_weight=lambda: param.detach(),
                            set_weight=set_weight, in_features=shard.in_features)

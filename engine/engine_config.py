"""Engine settings shared by the driver and every rank (picklable, so workers get a copy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model_path: str
    tensor_parallel_size: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # "cpu" or "cuda"; rank r of a CUDA run uses cuda:<local rank>
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    seed: int = 0
    progress: bool = True
    # a collective waiting longer than this fails instead of hanging; a starting rank that makes
    # no progress (layers read) for this long is reported by number (engine.executor.startup)
    dist_timeout_s: float = 120.0
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (engine/dummy.py)
    cuda_graphs: bool = True  # replay captured decode steps on CUDA (False: eager, like vLLM's enforce_eager)
    cuda_graph_max_batch: int = 64
    kernels: str = "auto"  # a layer's non-matmul work: "auto" (Triton on CUDA), "torch", "triton" (engine.layers.kernel_choice)

    def __post_init__(self):
        from engine.layers.kernel_choice import check_kernels

        check_kernels(self.kernels)  # in the driver, before any rank starts

    def rank_device(self, local_rank: int) -> torch.device:
        return torch.device(f"cuda:{local_rank}") if self.device == "cuda" else torch.device("cpu")

"""The device a run asks for, checked before any process starts or any weight is read."""

from __future__ import annotations

import torch

from kernels.errors import InputError

# executors whose ranks all run on this machine (ray and torchrun ranks may run on other nodes)
_LOCAL_EXECUTORS = ("uni", "mp")


def resolve_device(device: str, tensor_parallel_size: int = 1, executor: str = "uni") -> str:
    """'cpu' or 'cuda' for device 'auto' / 'cpu' / 'cuda'; InputError when CUDA is asked for but not
    there: a torch build without CUDA, no GPU visible, or fewer GPUs than local ranks."""
    if not isinstance(device, str) or device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not torch.backends.cuda.is_built():
        raise InputError(f"device 'cuda' is not available: this torch ({torch.__version__}) is a build without CUDA; "
                         f"install a CUDA build of torch or use --device cpu")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise InputError("device 'cuda' is not available: no GPU is visible "
                         "(check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES); use --device cpu")
    if executor in _LOCAL_EXECUTORS and tensor_parallel_size > gpus:
        raise InputError(f"device 'cuda' with tensor_parallel_size={tensor_parallel_size} needs "
                         f"{tensor_parallel_size} GPUs (one per rank) but {gpus} are visible")
    return device

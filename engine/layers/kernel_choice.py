"""Which implementation runs a decode layer's non-matmul work (norms, activation, rotary + KV
write, decode attention): the engine option `kernels`.

"auto": fused Triton kernels on CUDA, plain torch elsewhere; "torch": plain torch everywhere (the
reference path, and the "before" of benchmarks); "triton": the Triton kernels everywhere (on a
CPU only under TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import torch

from kernels.errors import InputError

KERNELS = ("auto", "torch", "triton")


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise InputError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def use_triton(kernels: str, device: torch.device) -> bool:
    check_kernels(kernels)
    return kernels == "triton" or (kernels == "auto" and torch.device(device).type == "cuda")

"""The object `prepare` returns: a layout made ready for one backend, as an nn.Module."""

from __future__ import annotations

import torch

from kernels import reference


class PreparedWeight(torch.nn.Module):
    """Backend tensors (as buffers) for one quantized linear; `matmul` takes x as [M, K].

    `layout` is kept for `dequantize()` unless the backend can rebuild the weight from its own
    buffers (then it is dropped, so the packed weight is not held twice).
    """

    backend = "abstract"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__()
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.act_dtype = act_dtype
        self.layout = layout

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [N, K]."""
        if self.layout is None:
            raise RuntimeError(f"{type(self).__name__} was prepared with keep_layout=False")
        return reference.dequantize(self.layout)

    def extra_repr(self) -> str:
        return (f"backend={self.backend}, in_features={self.in_features}, out_features={self.out_features}, "
                f"act_dtype={self.act_dtype}")


class DequantizedWeight(PreparedWeight):
    """Dequantize once at load, then a dense matmul: correct for every layout, the fallback."""

    backend = "dequant"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        # float32 first, then one rounding to act_dtype
        self.register_buffer("weight", reference.dequantize(layout).to(act_dtype), persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)

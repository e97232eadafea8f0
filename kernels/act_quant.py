"""W8A8: dynamic per-token activation quantization for Int8Layout / FP8Layout with `dynamic_act`.

Each row (token) of x gets its own scale s = amax(|x_row|) / QMAX (FP8: 448, int8: 127, so every
value is representable and nothing clips; FBGEMM's `act_scale_ub` caps the amax first), then
q = round(x / s) to the weight's 8-bit type and y = (q @ Wq^T) * s * s_w.

Paths, chosen once at load by `plan`:
- "native": CUDA, the 8-bit matmul itself. FP8 through torch._scaled_mm (sm >= 89, K and N
  multiples of 16) with unit scales and the per-token / per-channel scales applied to its float32
  output (tensor-wise scaling works from sm 89 on, row-wise needs sm 90); int8 through
  torch._int_mm (exact int32 sums; M padded past 16, K and N multiples of 8).
- "w16": everywhere else (CPU, FP8 before sm 89, shapes the ops refuse): 16-bit activations
  through the W8A16 backend the dispatch picks (issue 7: "on CPU dequantize"), logged once.
`EmulatedW8A8Weight` is the exact CPU model of the native path (x quantized per token, then
de-quantized, then the W8A16 matmul): the tests' oracle, and what transformers computes for a
compressed-tensors W8A8 checkpoint. It is not the CPU default: on this small model per-token
int8 activations move logits far more than 8-bit weights do, and their scales depend on TP (below).

Scales are computed from the rank's own input: on a row-parallel layer a token's amax is over
the rank's slice of K, so TP > 1 quantizes activations slightly more finely than TP = 1 (as vLLM
does; making it identical would need an all-reduce of amax per layer).
"""

from __future__ import annotations

import logging

import torch

from kernels import reference
from kernels.layouts import FP8Layout, Int8Layout
from kernels.prepared import PreparedWeight

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
INT8_MAX = 127.0
MIN_SCALE = 1e-12  # an all-zero token quantizes to zeros instead of dividing by 0
_logged: set[str] = set()


def wants_dynamic(layout) -> bool:
    return isinstance(layout, (Int8Layout, FP8Layout)) and layout.dynamic_act


def quantize_per_token(x: torch.Tensor, fp8: bool, scale_ub: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn or int8, scales float32 [M, 1]) with x ~= q * scales."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scales = (amax / (FP8_MAX if fp8 else INT8_MAX)).clamp(min=MIN_SCALE)
    if fp8:
        q = (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        q = (xf / scales).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return q, scales


def fake_quantize_per_token(x: torch.Tensor, fp8: bool, scale_ub: float | None = None) -> torch.Tensor:
    """x rounded through its per-token 8-bit quantization, back in x's dtype."""
    q, scales = quantize_per_token(x, fp8, scale_ub)
    return (q.float() * scales).to(x.dtype)


def plan(layout) -> tuple[str, str]:
    """("native" | "w16", why) for a W8A8 layout on its device."""
    fp8 = isinstance(layout, FP8Layout)
    device = layout.weight.device
    if device.type != "cuda":
        return "w16", f"no 8-bit activation matmul on {device.type}: activations stay 16-bit (W8A16)"
    if fp8:
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "w16", "FP8 activations need sm >= 89: activations stay 16-bit (W8A16)"
        if layout.in_features % 16 or layout.out_features % 16:
            return "w16", "torch._scaled_mm needs K and N multiples of 16: those layers run W8A16"
    elif layout.in_features % 8 or layout.out_features % 8:
        return "w16", "torch._int_mm needs K and N multiples of 8: those layers run W8A16"
    return "native", "CUDA 8-bit matmul"


def log_once(why: str) -> None:
    if why not in _logged:
        _logged.add(why)
        log.info("W8A8 layers: %s", why)


class NativeW8A8Weight(PreparedWeight):
    """CUDA: 8-bit activations x 8-bit weights in one torch op, scales applied to the output."""

    backend = "w8a8"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        self.fp8 = isinstance(layout, FP8Layout)
        self.scale_ub = layout.act_scale_ub if self.fp8 else None
        # [K, N] column-major: the second operand layout both ops want
        self.register_buffer("weight_t", layout.weight.t(), persistent=False)
        s = layout.scales.float()
        self.register_buffer("scales", s.reshape(1, -1) if s.dim() else s, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        q, sx = quantize_per_token(x, self.fp8, self.scale_ub)
        M = q.shape[0]
        if self.fp8:
            one = torch.ones((), dtype=torch.float32, device=q.device)
            acc = torch._scaled_mm(q, self.weight_t, scale_a=one, scale_b=one, out_dtype=torch.float32)
        else:
            if M <= 16:  # torch._int_mm on CUDA needs M > 16
                q = torch.cat([q, q.new_zeros(17 - M, q.shape[1])])
            acc = torch._int_mm(q, self.weight_t)[:M].float()
        return (acc * sx * self.scales).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(self.layout)


class EmulatedW8A8Weight(PreparedWeight):
    """Per-token quantize-dequantize of x, then the W8A16 backend's matmul on it (tests' oracle)."""

    def __init__(self, inner: PreparedWeight, layout):
        super().__init__(layout, inner.act_dtype)
        self.inner = inner
        self.layout = None  # inner keeps (or rebuilds) the weight
        self.fp8 = isinstance(layout, FP8Layout)
        self.scale_ub = layout.act_scale_ub if self.fp8 else None
        self.backend = f"{inner.backend}+a8-emulated"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.matmul(fake_quantize_per_token(x, self.fp8, self.scale_ub))

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize()

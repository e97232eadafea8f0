"""GPTQ zero points: which convention a layer's stored qzeros use, and the v1 overflow.

- v1 (`checkpoint_format: "gptq"`): the stored field is z - 1; v2 (`"gptq_v2"`): the true z.
- A config can be silent or wrong about it. For a symmetric layer the stored values tell:
  every field 2^(b-1) is v2, every field 2^(b-1) - 1 is v1. Asymmetric zeros cannot be told apart
  this way (any value is legal in both), so the declared format (default v1) is used.
- v1 cannot store z = 0: packers computing z - 1 = -1 as an unsigned wrote 2^b - 1 into the field
  (and, OR-ing a 32-bit -1 into the word, into every higher field of it). A v1 field of 2^b - 1
  would mean z = 2^b, which no b-bit zero point is: such layers are refused, never read.
  A packer that clamped -1 to 0 instead ("zeros of 0 reset to 1") left a legal v1 value: that
  cannot be detected from the checkpoint, and is only warned about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

V1 = "gptq"
V2 = "gptq_v2"
FORMATS = (V1, V2)


@dataclass(frozen=True)
class ZeroDecision:
    version: str  # V1: stored = z - 1; V2: stored = z
    symmetric: bool  # every true zero is 2^(bits-1): the layout needs no qzeros
    reason: str  # what the decision rests on, for the log

    def true_zeros(self, stored: torch.Tensor) -> torch.Tensor:
        return stored + 1 if self.version == V1 else stored


def decide(stored: torch.Tensor, bits: int, declared: str | None, sym: bool | None) -> ZeroDecision:
    """How to read a layer's stored zero fields (all of them, identical input on every rank).

    declared: the config's checkpoint_format (None: silent); sym: the config's sym (None: silent).
    """
    half = 1 << (bits - 1)
    if sym is not False and stored.numel():
        if bool((stored == half).all()):
            return ZeroDecision(V2, True, f"every stored zero is {half} = 2^(bits-1), the true symmetric zero")
        if bool((stored == half - 1).all()):
            return ZeroDecision(V1, True, f"every stored zero is {half - 1} = 2^(bits-1) - 1, the symmetric "
                                          f"zero stored as z - 1")
    version = declared or V1
    reason = (f"checkpoint_format {declared!r}" if declared else
              "checkpoint_format absent, so the default 'gptq' (v1)")
    if sym:
        reason += "; the config says sym=true but the stored zeros vary, so they are read as asymmetric"
    true = stored + 1 if version == V1 else stored
    return ZeroDecision(version, bool(stored.numel()) and bool((true == half).all()), reason)


def overflowed_fields(stored: torch.Tensor, bits: int) -> int:
    """Stored v1 fields that would mean z = 2^bits: the asymmetric z - 1 overflow."""
    return int((stored == (1 << bits) - 1).sum())


def overflow_message(bits: int, layers: list[tuple[str, int]]) -> str:
    """The error for v1 layers holding overflowed zeros: (layer, overflowed fields) each."""
    top = (1 << bits) - 1
    shown = ", ".join(f"{name} ({bad} zero points)" for name, bad in layers[:20])
    more = f" and {len(layers) - 20} more" if len(layers) > 20 else ""
    return (f"GPTQ v1 checkpoint (checkpoint_format 'gptq', stored zero = z - 1) holds overflowed asymmetric zero "
            f"points in {len(layers)} layer(s): {shown}{more}. A stored {bits}-bit field of {top} would mean "
            f"z = {top + 1}, which no {bits}-bit zero point is: a zero point of 0 was packed as z - 1 = -1 (the "
            f"asymmetric v1 packing bug), and a 32-bit -1 also overwrites the higher fields of its word, so these "
            f"zeros cannot be recovered. Re-export the model with checkpoint_format 'gptq_v2' (true zeros) or with "
            f"sym=true. If this checkpoint in fact stores true zeros, set \"checkpoint_format\": \"gptq_v2\" in its "
            f"quantization_config.")

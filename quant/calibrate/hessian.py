"""The GPTQ Hessian of one linear layer, H = 2/n * sum_t x_t x_t^T, from its input activations."""

from __future__ import annotations

import math

import torch


class HessianAccumulator:
    """Running mean of 2 x x^T over every activation vector (token) seen, in float32.

    Feed it a layer's inputs [..., in_features] batch by batch (e.g. from a forward hook). Each
    batch rescales the running H by n / (n + m) and adds the batch scaled by sqrt(2 / (n + m)),
    so H stays a mean (no overflow, no growth with data size) for any number of batches.
    n counts vectors (all leading dims), so [B, S, K] and [B * S, K] inputs give the same H;
    llm-compressor counts only the leading dim, which scales H by a constant GPTQ ignores.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.num_samples = 0
        # None: allocated on the first batch's device.
        self._hessian = None if device is None else self._zeros(torch.device(device))

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add_batch(self, activations: torch.Tensor) -> None:
        if activations.shape[-1] != self.in_features:
            raise ValueError(f"activations have {activations.shape[-1]} features, expected {self.in_features} "
                             f"(shape {tuple(activations.shape)})")
        if self._hessian is None:
            self._hessian = self._zeros(activations.device)
        x = activations.detach().reshape(-1, self.in_features).to(self._hessian.device, torch.float32)
        added = x.shape[0]
        if added == 0:
            return
        total = self.num_samples + added
        self._hessian.mul_(self.num_samples / total)
        x = x * math.sqrt(2.0 / total)
        self._hessian.addmm_(x.t(), x)
        self.num_samples = total

    @property
    def hessian(self) -> torch.Tensor:
        """float32 [K, K]. Raises when no activation was seen: an all-zero H would zero the layer."""
        if self.num_samples == 0:
            raise RuntimeError("no activations were accumulated; run calibration data through the layer first")
        return self._hessian

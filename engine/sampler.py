"""The sampler (rank 0, over the full vocabulary)."""

from engine.sampling_reference import ReferenceSampler as Sampler

__all__ = ["Sampler"]

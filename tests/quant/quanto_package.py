"""optimum-quanto for the tests that make checkpoints with it, without building its C++ extension.

quanto's CPU `unpack` op (2/4-bit codes out of uint8 bytes) calls a C++ extension that compiles on
first use: minutes on two cores, in every fresh virtual environment (CI's included). Its pure-torch
implementation gives the same codes; the tests serve the CPU op with this copy of it instead.
"""

from __future__ import annotations

import types

import pytest
import torch


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's packing: value i of each byte at bits [bits*i, bits*(i+1)), the values of position i of
    every byte stacked as the i-th block of rows."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(per_byte)]).to(torch.uint8)


def import_quanto():
    """optimum.quanto (the test skips where it is not installed), its CPU unpack in pure torch."""
    quanto = pytest.importorskip("optimum.quanto")
    from optimum.quanto.library.extensions import cpp

    if cpp.ext._lib is None:  # not built (or loaded) yet: never build it
        cpp.ext._lib = types.SimpleNamespace(unpack=unpack_codes)
    return quanto

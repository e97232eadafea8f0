"""Weight calibration: GPTQ and round-to-nearest, producing codes in the writers' convention.

No registration and no work at import: `quant/__init__` imports this package on `import quant`.
"""

from __future__ import annotations

from quant.calibrate.args import QuantArgs, QuantResult, largest_dividing_group_size
from quant.calibrate.gptq import gptq_quantize
from quant.calibrate.hessian import HessianAccumulator
from quant.calibrate.rtn import compute_qparams, rtn_quantize

__all__ = ["HessianAccumulator", "QuantArgs", "QuantResult", "compute_qparams", "gptq_quantize",
           "largest_dividing_group_size", "rtn_quantize"]

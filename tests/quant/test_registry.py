"""The one format table (quant.registry): every entry imports and is the class it names, and the
reading path stays off the writing path (no packer, export or calibration import for inference)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quant import QuantConfigError, get_loader, registered_methods
from quant.base import Packer, WeightsLoader
from quant.registry import FORMATS, loader_class, packer_class


def test_every_entry_imports_the_class_it_names():
    assert registered_methods() == sorted(FORMATS)
    for method, entry in FORMATS.items():
        loader = loader_class(method)
        assert issubclass(loader, WeightsLoader) and loader.method == method
        if entry.packer:
            packer = packer_class(method)
            assert issubclass(packer, Packer) and packer.method == method


def test_unknown_and_read_only_methods_are_named():
    with pytest.raises(QuantConfigError, match="unsupported quant_method 'nope'; supported: .*gptq"):
        get_loader({"quant_method": "nope"})
    with pytest.raises(QuantConfigError, match="reads quant_method 'fp8' but does not write it"):
        packer_class("fp8")


def test_loading_imports_no_writing_code():
    code = ("import sys\nfrom quant.registry import FORMATS, loader_class\n"
            "for m in FORMATS: loader_class(m)\n"
            "bad = sorted(n for n in sys.modules if n.startswith('quant.') and "
            "(n.endswith('.packer') or n.startswith('quant.calibrate') or n in ('quant.export', 'quant.output_dir')))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

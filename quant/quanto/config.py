"""Which layers of an optimum-quanto checkpoint are quantized, and to what.

optimum-quanto's `QuantizedModelForCausalLM.save_pretrained` writes model.safetensors beside
`quanto_qmap.json`: {module: {"weights": "qint4", "activations": "none"}, ...}; modules not in it
stay float. engine.config passes the file as `qmap_file`. A transformers QuantoConfig
(quantization_config {"quant_method": "quanto", "weights": "int4", "modules_to_not_convert": [...]})
gives one weight type for every linear instead. Activations must be unquantized: qshard runs
quanto weights with 16/32-bit activations only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant.base import QuantConfigError

METHOD = "quanto"
# quanto's qtype names -> (bits, kind)
WEIGHT_TYPES = {"qint2": (2, "int"), "qint4": (4, "int"), "qint8": (8, "int"), "qfloat8": (8, "e4m3fn"),
                "qfloat8_e4m3fn": (8, "e4m3fn"), "qfloat8_e4m3fnuz": (8, "e4m3fnuz"), "qfloat8_e5m2": (8, "e5m2")}
# transformers QuantoConfig's names
CONFIG_TYPES = {"int2": "qint2", "int4": "qint4", "int8": "qint8", "float8": "qfloat8"}
NO_ACTIVATIONS = (None, "none")


@dataclass(frozen=True)
class QuantoConfig:
    qmap: dict[str, str] | None  # module -> weight qtype; None: `default` for every linear
    default: str | None
    not_converted: tuple[str, ...]
    source: str  # where the map came from, for messages

    def weight_type(self, module: str) -> str | None:
        """The module's weight qtype, None when it is float."""
        if self.qmap is not None:
            return self.qmap.get(module)
        if any(module == m or module.endswith("." + m) for m in self.not_converted):
            return None
        return self.default

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "QuantoConfig":
        acts = config.get("activations")
        if acts not in NO_ACTIVATIONS:
            raise QuantConfigError(f"quanto quantization_config field activations={acts!r}: quantized activations "
                                   f"are not supported (qshard runs quanto weights with float activations)")
        if config.get("qmap_file"):
            return cls(read_qmap(Path(config["qmap_file"])), None, (), str(config["qmap_file"]))
        weights = config.get("weights", "int8")
        if weights not in CONFIG_TYPES:
            raise QuantConfigError(f"quanto quantization_config field weights={weights!r} is not supported; "
                                   f"supported: {', '.join(CONFIG_TYPES)}")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise QuantConfigError(f"quanto quantization_config field modules_to_not_convert={skip!r} must be a "
                                   f"list of module names")
        return cls(None, CONFIG_TYPES[weights], tuple(skip), "quantization_config")


def read_qmap(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise QuantConfigError(f"{path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise QuantConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise QuantConfigError(f"{path} holds a JSON {type(raw).__name__}; expected an object of "
                               f"module -> {{\"weights\": ..., \"activations\": ...}}")
    qmap = {}
    for module, entry in raw.items():
        if not isinstance(entry, dict) or "weights" not in entry:
            raise QuantConfigError(f"{path}: entry {module!r} = {entry!r} must be an object with a \"weights\" field")
        w, a = entry["weights"], entry.get("activations", "none")
        if a not in NO_ACTIVATIONS:
            raise QuantConfigError(f"{path}: layer {module} has activations={a!r}; quantized activations are not "
                                   f"supported (qshard runs quanto weights with float activations)")
        if w in NO_ACTIVATIONS:
            continue
        if w not in WEIGHT_TYPES:
            raise QuantConfigError(f"{path}: layer {module} has weights={w!r}; supported: {', '.join(WEIGHT_TYPES)}")
        qmap[module] = w
    return qmap

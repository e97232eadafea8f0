"""compressed-tensors' `quantization_config` (what llm-compressor writes), parsed once into plain
dataclasses, and the rule that picks a layer's scheme.

Shared by every compressed-tensors storage format: `quant.compressed_tensors` registers the
"compressed-tensors" quant_method and hands each quantized layer to the `FormatHandler` of its
scheme's format ("pack-quantized" today; "float-quantized" / "int-quantized" modules add their
own handler with `@register_format` and reuse this parsing unchanged).

Config facts (compressed-tensors 0.20 and the versions before it):
- `config_groups`: name -> scheme {targets, weights, input_activations, output_activations,
  format}; a value may also be a list of targets under a preset name ("W4A16": ["Linear"]).
- `targets` / `ignore` entries are exact module names, "re:<regex>" (re.match on the module
  name) or class names ("Linear" matches every linear layer). A layer matching several targets
  takes the scheme of the first match in the order exact names, regexes, class names.
- `format` is one storage format for the model, or "mixed-precision" with one per group.
- `actorder`: None, "weight" (alias "static": calibration order only, nothing stored) or the
  legacy "group" (alias "dynamic", or true): columns grouped in activation order, `weight_g_idx`
  stored. compressed-tensors 0.20 no longer accepts "group" but older checkpoints carry it.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from parallel.sharding import LinearShard, TensorSource
from quant.base import PackedLinear, QuantConfigError

METHOD = "compressed-tensors"
MIXED_PRECISION = "mixed-precision"
STATUS_COMPRESSED = "compressed"
_ACTORDER = {None: None, False: None, "none": None, "weight": "weight", "static": "weight",
             "group": "group", "dynamic": "group", True: "group"}
_GROUP_128 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
# Weight-only presets a config_groups entry may name instead of spelling out the scheme.
PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": _GROUP_128},
    "W4A16_ASYM": {"weights": {**_GROUP_128, "symmetric": False}},
    "W8A16": {"weights": {**_GROUP_128, "num_bits": 8}},
}


@dataclass(frozen=True)
class TensorArgs:
    """One `QuantizationArgs` (weights, input or output activations) of a scheme."""

    num_bits: int
    type: str  # "int" or "float"
    symmetric: bool
    strategy: str  # tensor, channel, group, block, token, tensor_group, attn_head
    group_size: int | None  # positive for group strategies, None or -1 otherwise
    actorder: str | None  # None, "weight" or "group" (aliases resolved)
    dynamic: bool | str
    block_structure: tuple[int, ...] | None

    @property
    def has_g_idx(self) -> bool:
        return self.actorder == "group"

    @classmethod
    def parse(cls, raw: Any, where: str) -> "TensorArgs":
        if not isinstance(raw, dict):
            raise QuantConfigError(f"{where} must be an object, got {raw!r}")
        num_bits = raw.get("num_bits", 8)
        if not isinstance(num_bits, int) or isinstance(num_bits, bool) or num_bits < 1:
            raise QuantConfigError(f"{where}.num_bits must be a positive integer, got {num_bits!r}")
        qtype = str(raw.get("type", "int")).lower()
        group_size = raw.get("group_size")
        strategy = raw.get("strategy")
        if strategy is None:  # compressed-tensors infers it from group_size
            strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
        strategy = str(strategy).lower()
        if strategy in ("group", "tensor_group") and (not isinstance(group_size, int) or group_size <= 0):
            raise QuantConfigError(f"{where}: strategy {strategy!r} needs a positive group_size, got {group_size!r}")
        if strategy not in ("group", "tensor_group") and group_size not in (None, -1):
            raise QuantConfigError(f"{where}: group_size={group_size} only applies to strategy 'group', "
                                   f"not {strategy!r}")
        actorder = raw.get("actorder")
        key = actorder.lower() if isinstance(actorder, str) else actorder
        if key not in _ACTORDER:
            raise QuantConfigError(f"{where}.actorder={actorder!r} is unknown; expected null, 'weight', "
                                   f"'static', 'group' or 'dynamic'")
        if _ACTORDER[key] == "group" and strategy != "group":
            raise QuantConfigError(f"{where}: actorder 'group' needs strategy 'group', got {strategy!r}")
        block = raw.get("block_structure")
        return cls(num_bits=num_bits, type=qtype, symmetric=bool(raw.get("symmetric", True)), strategy=strategy,
                   group_size=group_size, actorder=_ACTORDER[key], dynamic=raw.get("dynamic", False),
                   block_structure=tuple(block) if isinstance(block, (list, tuple)) else block)


@dataclass(frozen=True)
class Scheme:
    """One config group: the layers it targets and how their tensors are quantized and stored."""

    name: str
    targets: tuple[str, ...]
    weights: TensorArgs | None
    input_activations: TensorArgs | None
    output_activations: TensorArgs | None
    format: str  # the group's own format, else the config's


@dataclass(frozen=True)
class CompressedTensorsConfig:
    format: str
    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]
    status: str
    kv_cache_scheme: TensorArgs | None
    version: str | None

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        fmt = config.get("format")
        if not isinstance(fmt, str):
            raise QuantConfigError(f"compressed-tensors quantization_config.format must be a string, got {fmt!r}")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise QuantConfigError(f"compressed-tensors quantization_config.config_groups must be a non-empty "
                                   f"object, got {groups!r}")
        schemes = tuple(_parse_scheme(name, raw, fmt) for name, raw in groups.items())
        ignore = config.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise QuantConfigError(f"quantization_config.ignore must be a list of strings, got {ignore!r}")
        for entry in ignore + [t for s in schemes for t in s.targets]:
            _check_regex(entry)
        kv = config.get("kv_cache_scheme")
        return cls(format=fmt, schemes=schemes, ignore=tuple(ignore),
                   status=str(config.get("quantization_status", "")).lower(),
                   kv_cache_scheme=TensorArgs.parse(kv, "kv_cache_scheme") if kv else None,
                   version=config.get("version"))

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme of the linear layer `module` (None: left in float), as compressed-tensors
        resolves it: targeted and not ignored; exact names before regexes before class names."""
        if any(matches(module, entry) for entry in self.ignore):
            return None
        by_target: dict[str, Scheme] = {}
        for scheme in self.schemes:  # a later group reusing a target wins, as in compressed-tensors
            for target in scheme.targets:
                by_target[target] = scheme
        ordered = sorted(by_target, key=lambda t: ("re:" in t, t))
        hit = next((t for t in ordered if _matches_name(module, t)), None)
        if hit is None:
            hit = next((t for t in ordered if t in LINEAR_CLASSES), None)
        return by_target[hit] if hit is not None else None


# Class-name targets that match a linear layer (nn.Linear; vLLM's LinearBase answers to it too).
# Other class names match modules that are not linear layers, never one the engine asks about.
LINEAR_CLASSES = ("Linear",)


def matches(module: str, entry: str) -> bool:
    return _matches_name(module, entry) or entry in LINEAR_CLASSES


def _matches_name(module: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry == module


def _check_regex(entry: str) -> None:
    if entry.startswith("re:"):
        try:
            re.compile(entry[3:])
        except re.error as e:
            raise QuantConfigError(f"quantization_config target/ignore entry {entry!r} is not a valid regex: "
                                   f"{e}") from None


def _parse_scheme(name: str, raw: Any, default_format: str) -> Scheme:
    where = f"config_groups.{name}"
    if isinstance(raw, list):  # {"W4A16": ["Linear"]}: a preset applied to these targets
        preset = PRESETS.get(name.upper())
        if preset is None:
            raise QuantConfigError(f"{where}: preset scheme {name!r} is not supported; supported presets: "
                                   f"{', '.join(PRESETS)} (or spell the scheme out)")
        raw = {"targets": raw, **preset}
    if not isinstance(raw, dict):
        raise QuantConfigError(f"{where} must be an object or a list of targets, got {raw!r}")
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise QuantConfigError(f"{where}.targets must be a non-empty list of strings, got {targets!r}")
    fmt = raw.get("format") or default_format
    if fmt == MIXED_PRECISION:
        raise QuantConfigError(f"{where} has no format of its own but the config's format is {MIXED_PRECISION!r}")

    def args(key: str) -> TensorArgs | None:
        value = raw.get(key)
        return TensorArgs.parse(value, f"{where}.{key}") if value else None

    return Scheme(name, tuple(targets), args("weights"), args("input_activations"), args("output_activations"), fmt)


class FormatHandler(abc.ABC):
    """Loads the layers stored in one compressed-tensors format."""

    format: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def check_scheme(cls, scheme: Scheme) -> None:
        """Raise QuantConfigError, naming the field, if this format cannot load `scheme`."""

    @abc.abstractmethod
    def load_linear(self, weights: TensorSource, shard: LinearShard, scheme: Scheme) -> PackedLinear: ...


FORMATS: dict[str, type[FormatHandler]] = {}


def register_format(*names: str):
    def wrap(cls: type[FormatHandler]) -> type[FormatHandler]:
        for n in names:
            if n in FORMATS and FORMATS[n] is not cls:
                raise RuntimeError(f"compressed-tensors format {n!r} registered twice")
            FORMATS[n] = cls
        return cls

    return wrap

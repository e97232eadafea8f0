"""compressed-tensors checkpoints (llm-compressor's output): the "compressed-tensors" loader.
It resolves each layer's scheme (quant.compressed_tensors.scheme) and hands the layer to the
handler of the scheme's format: pack-quantized (quant.compressed_tensors.pack_quantized),
float-quantized and int-quantized (quant.compressed_tensors.eight_bit).
"""

from __future__ import annotations

from typing import Any

from parallel.sharding import LinearShard, TensorSource
from quant.base import PackedLinear, QuantConfigError, WeightsLoader, register
# Imported for their @register_format, pack-quantized first (errors list the formats in this order).
from quant.compressed_tensors import pack_quantized, eight_bit  # noqa: F401
from quant.compressed_tensors.scheme import FORMATS, METHOD, STATUS_COMPRESSED, CompressedTensorsConfig, Scheme
from quant.common.dense import load_dense


@register(METHOD)
class CompressedTensorsLoader(WeightsLoader):
    """Resolves each layer's scheme (targets / ignore) and hands it to its format's handler."""

    method = METHOD

    def __init__(self, config: CompressedTensorsConfig):
        self.config = config
        self.handlers = {s.format: FORMATS[s.format]() for s in config.schemes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressedTensorsLoader":
        parsed = CompressedTensorsConfig.parse(config)
        if parsed.status != STATUS_COMPRESSED:
            raise QuantConfigError(f"compressed-tensors quantization_status is {parsed.status or None!r}; only "
                                   f"'{STATUS_COMPRESSED}' checkpoints hold quantized tensors (a 'frozen' one holds "
                                   f"float weights to be fake-quantized, which qshard does not do)")
        for key in ("sparsity_config", "transform_config"):
            if config.get(key):
                raise QuantConfigError(f"compressed-tensors {key} is set ({config[key]!r}); sparse and transformed "
                                       f"(rotated) checkpoints are not supported")
        if parsed.kv_cache_scheme is not None:
            raise QuantConfigError("compressed-tensors kv_cache_scheme is set; a quantized KV cache is not supported")
        for scheme in parsed.schemes:
            if scheme.format not in FORMATS:
                raise QuantConfigError(
                    f"compressed-tensors format {scheme.format!r} (config_groups.{scheme.name}) is not supported; "
                    f"supported now: {', '.join(FORMATS)}")
            FORMATS[scheme.format].check_scheme(scheme)
        return cls(parsed)

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        schemes = {src: self.config.scheme_for(src) for src in shard.sources}
        kinds = {_storage(s) for s in schemes.values()}
        if len(kinds) > 1:
            shown = {src: (s.name if s else "not quantized") for src, s in schemes.items()}
            raise QuantConfigError(f"layers {list(shard.sources)} run as one fused matmul but are quantized "
                                   f"differently ({shown}); they must share one scheme")
        scheme = next(iter(schemes.values()))
        if scheme is None:
            return load_dense(weights, shard)
        return self.handlers[scheme.format].load_linear(weights, shard, scheme)

    def describe(self) -> str:
        return f"{METHOD} ({', '.join(f'{s.format} {_describe(s)}' for s in self.config.schemes)})"


def _storage(scheme: Scheme | None):
    """What decides how a layer is stored: everything but the group's name and targets."""
    return None if scheme is None else (scheme.format, scheme.weights, scheme.input_activations,
                                         scheme.output_activations)


def _describe(scheme: Scheme) -> str:
    w = scheme.weights
    if w is None:
        return "no weights"
    size = f" {w.group_size}" if w.strategy == "group" else ""
    return (f"W{w.num_bits}A{8 if scheme.input_activations else 16} {w.strategy}{size} {'sym' if w.symmetric else 'asym'}"
            + (" act-order" if w.has_g_idx else ""))

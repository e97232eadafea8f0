"""HQQ (mobiusml/hqq, transformers' HqqConfig): `config` (quantization_config, per-layer tags,
skip_modules), `packing` (its bit packing, read per rank), `loader`."""

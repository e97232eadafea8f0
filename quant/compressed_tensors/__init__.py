"""compressed-tensors (llm-compressor): `scheme` (config parsing and scheme choice), `loader`,
its format handlers `pack_quantized` and `eight_bit` (float-/int-quantized), and `packer`
(writing; never imported by the loader)."""

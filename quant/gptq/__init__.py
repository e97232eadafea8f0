"""GPTQ: `config` (quantization_config fields), `zeros` (v1/v2 zero points), `loader` (reading,
per rank), `packer` (writing; never imported by the loader)."""

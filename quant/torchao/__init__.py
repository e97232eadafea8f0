"""torchao safetensors checkpoints (transformers' TorchAoConfig): `config` (quant_type parsing),
`tile_packed` (tinygemm's int4 tile layout, decoded at load), `loader`."""

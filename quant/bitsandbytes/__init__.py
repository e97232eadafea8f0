"""bitsandbytes pre-quantized checkpoints: `config` (quantization_config fields), `four_bit`
(nf4/fp4 tensors and their per-rank slices), `loader` (the WeightsLoader)."""

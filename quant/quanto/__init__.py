"""optimum-quanto checkpoints: `config` (quanto_qmap.json / quantization_config), `tensors` (a layer's
stored tensors and a rank's part of them), `loader` (the WeightsLoader)."""

"""int8 weight-only, EETQ style (quantized at load): `loader`."""

"""FP8 weight checkpoints (fp8, fbgemm_fp8): `loader`."""

"""Unquantized (float) checkpoints: `loader` reads them (quant.registry's "none")."""

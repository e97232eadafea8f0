"""AWQ (GEMM packing): `loader` (reading, per rank), `packer` (writing; never imported by the loader)."""

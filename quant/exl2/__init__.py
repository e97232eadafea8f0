"""exl2 (exllamav2): `format` (its tensors and groups), `loader` (reading, per rank), `packer`
(quantizing and writing; never imported by the loader)."""

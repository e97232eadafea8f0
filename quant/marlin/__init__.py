"""Marlin (IST-DASLab packing): `layout` (its tiles and shuffles), `loader` (reading, per rank),
`packer` (writing; never imported by the loader)."""

"""Helpers shared by several formats; each module says which (no format-specific code here)."""

"""Bridges to other libraries (each imports its library, an optional extra, only when used)."""

"""Triton kernels and their launchers, one file per op.  Imported lazily (only when a
Triton backend call runs or the AOT compile check asks for it)."""

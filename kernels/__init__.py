"""Sparse-pixel operators. ``reference`` is the pure-torch specification and the CPU execution path."""

"""Benchmarks of sparse vs dense execution (``m2ae-bench``, docs/performance.md)."""

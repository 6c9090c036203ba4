"""Benchmarks of sparse vs dense execution: see issue 6."""

"""Sparse-pixel operators. ``reference`` is the pure-torch specification and the CPU execution path.

Triton kernels (imported only when used; they import ``triton``): ``triton_compact`` (mask -> sorted active
rows), ``triton_stage`` (fused gather -> GEMM -> act -> mixers -> residual), ``triton_tail`` (GEMM -> pixel-shuffle
write), ``triton_check`` (kernels vs float64 reference), ``triton_bench`` (GPU timings vs cuDNN).
"""

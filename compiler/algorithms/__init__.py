"""Mesh lowerings of single ops (GEMV, GEMM) onto a rectangular region of cores."""

"""One package per NSA op: its naive reference and its Triton kernels side by side."""

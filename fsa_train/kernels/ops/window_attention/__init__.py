"""The ``window_attention`` op: its naive reference (``naive.py``) beside its Triton kernels
(``triton.py``)."""

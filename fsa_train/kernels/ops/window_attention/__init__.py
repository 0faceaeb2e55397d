"""The ``window_attention`` op: its naive reference (``naive.py``) beside its Triton kernels
(``triton.py``, also the GPU entry point), the library paths (``cudnn.py``, ``flash.py``) and
the choice between them (``backends.py``)."""

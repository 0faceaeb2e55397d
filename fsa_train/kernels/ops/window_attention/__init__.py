"""The ``window_attention`` op: its naive reference (``naive.py``) beside its Triton kernels
(``triton.py``, also the GPU entry point), the library paths (``cudnn.py``, ``fa4.py``,
``flash.py``, sharing ``library.py``) and the choice between them (``backends.py``)."""

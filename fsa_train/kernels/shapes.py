"""The output shapes of the ops whose naive version reads the host, for ``torch.compile``.

Under compilation such an op runs as one opaque custom op (:func:`~fsa_train.kernels.registry.
define_op`), whose fake implementation must give its outputs from the inputs' shapes alone.
Each function here has its naive op's signature and returns empty tensors of the output shapes
and dtypes; the opaque op pads a data-dependent first dimension (``compress``'s compressed rows)
to the static size given here, as the Triton kernels do.
"""

from __future__ import annotations

import torch

from fsa_train.kernels.naive_attention import stat_dtype
from fsa_train.kernels.varlen import block_rows


def compress(x, weight, pe, cu_seqlens, kernel, stride, cu_seqlens_c=None):
    """``x_c [total // stride, h, d_out]`` (the Triton kernel's static rows) and ``cu_c``."""
    rows = x.shape[0] // stride
    x_c = x.new_empty((rows, x.shape[1], weight.shape[-1]))
    return x_c, cu_seqlens.new_empty(cu_seqlens.shape, dtype=torch.int32)


def compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride, scale=None,
                         max_seqlen=None):
    """``o [total, H, dv]`` in q's dtype and ``lse [H, total]`` (fp32, fp64 for fp64)."""
    total, H, _ = q.shape
    o = q.new_empty((total, H, v_c.shape[-1]))
    return o, q.new_empty((H, total), dtype=stat_dtype(q.dtype))


def select_blocks(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block, topk,
                  init_blocks, local_blocks, scale=None, selection="token"):
    """``idx [h, total, topk]`` int32, or ``[h, total // block + n_docs, topk]`` by block."""
    total = q.shape[0]
    rows = block_rows(total, cu_seqlens.shape[0] - 1, block) if selection == "block" else total
    return q.new_empty((k_c.shape[1], rows, topk), dtype=torch.int32)


def attention_output(q, k, v, *args, **kwargs):
    """``o [total, H, dv]`` in q's dtype (selected and window attention)."""
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))

"""The public NSA ops, each defined once from its naive reference (see
:mod:`fsa_train.kernels.registry`); re-exported by :mod:`fsa_train.kernels`."""

from __future__ import annotations

from fsa_train.kernels import shapes
from fsa_train.kernels.ops.compress.naive import compress as _compress
from fsa_train.kernels.ops.compressed_attention.naive import (
    compressed_attention as _compressed_attention,
)
from fsa_train.kernels.ops.gate_mix.naive import gate_mix as _gate_mix
from fsa_train.kernels.ops.gate_mix.naive import gated_projection as _gated_projection
from fsa_train.kernels.ops.select_blocks.naive import select_blocks as _select_blocks
from fsa_train.kernels.ops.selected_attention.naive import (
    selected_attention as _selected_attention,
)
from fsa_train.kernels.ops.window_attention.naive import window_attention as _window_attention
from fsa_train.kernels.registry import REGISTRY, define_op

_OPS_PACKAGE = "fsa_train.kernels.ops"

# ``fake``: these naive ops loop over the documents on the host; compiled, each runs opaque.
compress = define_op(_compress, f"{_OPS_PACKAGE}.compress.triton", shapes.compress)
compressed_attention = define_op(
    _compressed_attention, f"{_OPS_PACKAGE}.compressed_attention.triton",
    shapes.compressed_attention)
select_blocks = define_op(_select_blocks, f"{_OPS_PACKAGE}.select_blocks.triton",
                          shapes.select_blocks)
selected_attention = define_op(_selected_attention, f"{_OPS_PACKAGE}.selected_attention.triton",
                               shapes.attention_output)
window_attention = define_op(_window_attention, f"{_OPS_PACKAGE}.window_attention.triton",
                             shapes.attention_output)
gate_mix = define_op(_gate_mix, f"{_OPS_PACKAGE}.gate_mix.triton")
gated_projection = define_op(_gated_projection, f"{_OPS_PACKAGE}.gate_mix.triton")

OPS = tuple(REGISTRY)
"""The op names, in NSA order."""

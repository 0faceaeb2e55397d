"""Naive ``gate_mix`` (docs/nsa.md step 8): the gated sum of the three branch outputs."""

from __future__ import annotations

import torch


def gate_mix(
    o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Gated sum of the branch outputs (docs/nsa.md step 8), gates ``[total, H, 3]`` cast to
    o_cmp's dtype, order (cmp, sel, win)."""
    gates = gates.to(o_cmp.dtype)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win


def gated_projection(
    o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """The NSA layer's output projection of the gated sum: ``gate_mix(...)`` flattened to
    ``[total, H·d]`` times ``weight.T`` (``weight [D, H·d]``, a linear layer's), ``[total, D]``.
    The Triton op computes the same without keeping the mixed output for the backward."""
    mixed = gate_mix(o_cmp, o_sel, o_win, gates)
    return torch.nn.functional.linear(mixed.flatten(1), weight)

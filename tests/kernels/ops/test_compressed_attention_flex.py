"""compressed_attention on FlexAttention (``compressed_kernel="flex"``) against the reference.

CPU: the forward (FlexAttention has no backward there) on packed batches with documents shorter
than one compression window and empty ones; the settings switch. GPU (marker ``gpu``): compiled
FlexAttention forward and backward at real sizes, bf16/fp16, G 1-16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fsa_testing import assert_same_lse, compressed_batch, rel_error

from fsa_train.kernels import reference
from fsa_train.kernels.ops.compressed_attention import flex
from fsa_train.kernels.settings import KernelSettings, default_settings

pytest.importorskip("torch.nn.attention.flex_attention")


_inputs = compressed_batch
_compare_lse = assert_same_lse


@pytest.mark.parametrize("H,h,kernel,stride", [(2, 2, 8, 4), (4, 1, 16, 8), (16, 2, 32, 16)])
def test_cpu_forward_matches_reference(H, h, kernel, stride):
    lengths = [37, 1, 100, 7, 64, 0, 50]
    q, k, v, _, cu, cuc = _inputs(lengths, H, h, 16, kernel, stride, torch.float64, seed=H)
    with torch.no_grad():
        o, lse = flex.compressed_attention(q, k, v, cu, cuc, kernel, stride)
        o_ref, lse_ref = reference.compressed_attention(q, k, v, cu, cuc, kernel, stride)
    assert rel_error(o, o_ref, rms_floor=True) < 1e-10
    assert torch.equal(o[torch.isneginf(lse_ref).T], torch.zeros_like(o[torch.isneginf(lse_ref).T]))
    _compare_lse(lse, lse_ref.float(), 1e-5)


def test_cpu_backward_is_a_one_line_error():
    q, k, v, _, cu, cuc = _inputs([40], 2, 2, 16, 8, 4, torch.float32, seed=0)
    q.requires_grad_()
    with pytest.raises(ValueError, match="no backward on the CPU"):
        flex.compressed_attention(q, k, v, cu, cuc, 8, 4)


def test_settings_name_the_kernel():
    assert KernelSettings.from_env({"FSA_COMPRESSED_KERNEL": "flex"}).compressed_kernel == "flex"
    with pytest.raises(ValueError, match="FSA_COMPRESSED_KERNEL"):
        KernelSettings(compressed_kernel="fa4")


GPU_PACKED = [1, 100, 4096, 777, 2048, 31, 1000]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,G,d", [(torch.bfloat16, 1, 128), (torch.bfloat16, 4, 128),
                                       (torch.bfloat16, 16, 128), (torch.float16, 4, 64)])
def test_gpu_flex_matches_reference(dtype, G, d):
    from fsa_train.kernels.ops.compressed_attention import triton as ca

    h = 4 if G <= 4 else 2
    q, k, v, do, cu, cuc = _inputs(GPU_PACKED, G * h, h, d, 32, 16, dtype, G + d, "cuda", 4.0)
    settings = replace(default_settings(), compressed_kernel="flex")
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = ca.compressed_attention(q, k, v, cu, cuc, 32, 16, settings=settings)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = reference.compressed_attention(qr, kr, vr, cu, cuc, 32, 16)
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.float())
    assert o.dtype == dtype and rel_error(o, o_ref, rms_floor=True) <= 1e-2
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rel_error(a, b, rms_floor=True) <= 1e-2, name
    _compare_lse(lse, lse_ref, 0.5)


def test_block_mask_is_built_once_per_batch():
    """The layers of one step share the batch's boundaries: one mask; a new batch (or an
    in-place change) builds another, and the results stay right."""
    q, k, v, _, cu, cuc = _inputs([40, 30], 2, 2, 16, 8, 4, torch.float64, seed=1)
    first = flex._block_mask(cu, cuc, 70, k.shape[0], 8, 4)
    assert flex._block_mask(cu, cuc, 70, k.shape[0], 8, 4) is first
    other = cu.clone()
    assert flex._block_mask(other, cuc, 70, k.shape[0], 8, 4) is not first
    q2, k2, v2, _, cu2, cuc2 = _inputs([10, 60], 2, 2, 16, 8, 4, torch.float64, seed=2)
    cu.copy_(cu2)
    cuc.copy_(cuc2)  # same tensors, new boundaries: must not reuse the old mask
    with torch.no_grad():
        o, _ = flex.compressed_attention(q2, k2, v2, cu, cuc, 8, 4)
        o_ref, _ = reference.compressed_attention(q2, k2, v2, cu2, cuc2, 8, 4)
    assert rel_error(o, o_ref, rms_floor=True) < 1e-10
